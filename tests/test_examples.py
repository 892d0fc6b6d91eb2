"""The example scripts under examples/, run through their ``main(argv)`` with tiny settings and no network.

The embedded backbone's shipped weights may or may not exist yet; the examples use them when they do
and random weights otherwise, and these tests pass either way.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType

import datasets
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from adaptor_peft import create_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str) -> ModuleType:
    """Imports examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_official_checkpoint_hub_offline_demo_trains_and_saves_an_adapter(tmp_path, capsys):
    folder = example("official_checkpoint_hub").main(
        ["--offline-demo", "--steps", "2", "--batch-size", "8", "--output", str(tmp_path / "adapter")]
    )
    out = capsys.readouterr().out
    assert "Adaptor-T" in out and "Adaptor-S" in out and "step 2/2: loss" in out
    config = json.loads((folder / "adaptor_config.json").read_text())
    assert config["method"] == "adaptor" and config["base_model"] == "vim_nano_patch4_32"
    assert config["num_classes"] == 10 and (folder / "adaptor.safetensors").is_file()


def test_official_checkpoint_hub_reads_a_checkpoint_file_and_a_hub_data_set(tmp_path, monkeypatch, capsys):
    """The non-demo path, offline: a hub data set in a local folder (parquet) and a checkpoint file."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a", "b", "c"])})
    rows = {"img": [Image.new("RGB", (20, 16), (80 * (i % 3), 90, 40)) for i in range(9)], "fine_label": [0, 1, 2] * 3}
    (tmp_path / "hubset").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "hubset" / "train.parquet")
    torch.manual_seed(0)
    weights = {k: v.contiguous() for k, v in create_model("vim_nano_patch4_32").state_dict().items()}
    save_file(weights, tmp_path / "nano.safetensors")
    argv = ["--model", "vim_nano_patch4_32", "--checkpoint", str(tmp_path / "nano.safetensors"), "--dataset",
            str(tmp_path / "hubset"), "--split", "train[:6]", "--steps", "2", "--batch-size", "4"]  # fmt: skip
    folder = example("official_checkpoint_hub").main([*argv, "--output", str(tmp_path / "adapter")])
    assert "6 images, 3 classes" in capsys.readouterr().out
    assert json.loads((folder / "adaptor_config.json").read_text())["num_classes"] == 3


def test_official_checkpoint_hub_needs_a_checkpoint_without_the_offline_demo(capsys):
    with pytest.raises(SystemExit):
        example("official_checkpoint_hub").main([])
    assert "--checkpoint" in capsys.readouterr().err


def vtab_folder(root: Path, task: str = "cifar") -> Path:
    """A VTAB-1k task in the NOAH layout: three classes of plain colours, list files of relative paths."""
    rng, colours = random.Random(0), [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for split, count in {"train800val200": 12, "test": 6}.items():
        lines = []
        for i in range(count):
            name = f"images/{split}_{i}.png"
            (root / task / name).parent.mkdir(parents=True, exist_ok=True)
            colour = tuple(c + rng.randint(-25, 25) for c in colours[i % 3])
            Image.new("RGB", (20, 16), colour).save(root / task / name)
            lines.append(f"{name} {i % 3}")
        (root / task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_vtab_task_trains_a_recipe_on_the_noah_layout(tmp_path, capsys):
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pth"
    torch.save({"model": create_model("vim_tiny_patch16_224", depth=2, img_size=32).state_dict()}, checkpoint)
    run = tmp_path / "run"
    tiny = ["model=vim_tiny_patch16_224", "model_options.depth=2", "img_size=32", "num_classes=3", "epochs=1",
            "warmup_epochs=0", "batch_size=8", "eval_batch_size=8", "num_workers=0", "drop_path=0"]  # fmt: skip
    argv = ["--task", "cifar", "--data-root", str(vtab_folder(tmp_path / "vtab-1k")), "--checkpoint", str(checkpoint)]
    results = example("vtab_task").main([*argv, "--output-dir", str(run), "--no-progress", *tiny])
    assert results["task"] == "cifar" and results["train_images"] == 12 and results["checkpoint"] == str(checkpoint)
    assert 0 <= results["top1"] <= 100
    assert json.loads((run / "results.json").read_text())["top1"] == results["top1"]
    assert (run / "adapter" / "adaptor.safetensors").is_file()
    assert "cifar: top-1" in capsys.readouterr().out


def test_share_adapter_reloads_identically_and_refuses_other_weights(tmp_path, capsys):
    out = example("share_adapter").main(["--steps", "2", "--batch-size", "8", "--output", str(tmp_path / "adapter")])
    assert set(out["files"]) == {"adaptor.safetensors", "adaptor_config.json"}
    assert out["max_abs_diff"] == 0.0
    assert out["refused"] is not None and "other backbone weights" in out["refused"]
    assert "refused on another backbone" in capsys.readouterr().out


def test_adaptor_with_lora_merge_keeps_the_logits_and_drops_lora(capsys):
    out = example("adaptor_with_lora").main(["--steps", "2", "--batch-size", "8"])
    assert set(out["groups"]) == {"Adaptor-T", "Adaptor-S", "LoRA", "head"}
    assert out["lora_before"] > 0 and out["lora_after"] == 0
    assert out["weight_update"] > 0  # the merge changed in_proj: LoRA had learned something
    assert out["max_abs_diff"] < 1e-4
    assert "LoRA" in capsys.readouterr().out


def test_pretrain_tiny_resumes_an_interrupted_run_as_if_it_had_not_stopped(tmp_path, monkeypatch):
    """Stopped in its second epoch, the run restarts after the first from ``<output>.resume.pt`` and ends
    with the weights of an uninterrupted run, even with the output spelled another way; a run of other
    settings refuses that file, naming both."""
    from safetensors.torch import load_file

    module = example("pretrain_tiny")

    def run(output: Path, *extra: str) -> None:
        argv = ["pretrain_tiny.py", "--classes", "3", "--per-class", "4", "--epochs", "3", "--batch-size", "4",
                "--output", str(output), *extra]  # fmt: skip
        monkeypatch.setattr("sys.argv", argv)
        module.main()

    run(tmp_path / "straight.safetensors")
    accuracy, calls = module.accuracy, []

    def stops_in_epoch_two(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return accuracy(*args)

    output = tmp_path / "resumed.safetensors"
    monkeypatch.setattr(module, "accuracy", stops_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run(output)
    resume = tmp_path / "resumed.safetensors.resume.pt"
    assert resume.exists() and not output.exists()
    with pytest.raises(SystemExit, match=r"resumed.safetensors.resume.pt.*lr: 0.002 there, 0.001 here"):
        run(output, "--lr", "0.001")
    monkeypatch.setattr(module, "accuracy", accuracy)
    monkeypatch.chdir(tmp_path)
    run(Path("resumed.safetensors"))  # relative now, absolute when it stopped: the same run
    assert not resume.exists()
    straight, resumed = load_file(tmp_path / "straight.safetensors"), load_file(output)
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)
    card = output.with_suffix(".md").read_text()
    assert "| 1 |" in card and "| 3 |" in card  # the history of every epoch, the first session's included


def test_pretrain_tiny_trains_the_backbone_with_adaptors_from_scratch(tmp_path, monkeypatch, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from adaptor_peft.provenance import code_version, describe_machine

    output = tmp_path / "nano.safetensors"
    argv = ["pretrain_tiny.py", "--classes", "3", "--per-class", "4", "--epochs", "1", "--batch-size", "4",
            "--adaptor", "--output", str(output)]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    example("pretrain_tiny").main()
    state = load_file(output)
    trained = [k for k in state if ".adaptor_t." in k or ".adaptor_s." in k]
    assert trained and any(state[k].abs().sum() > 0 for k in trained if k.endswith("gamma"))  # trained, not init
    assert state["head.weight"].shape[0] == 3
    create_model("vim_nano_patch4_32_adaptor", checkpoint=str(output))  # the shipped model's layout, strictly
    card = output.with_suffix(".md").read_text()
    assert card.startswith("# vim_nano_patch4_32_adaptor\n")
    assert "--adaptor`" in card and "built into every block" in card and "parameters at 10x the rate" in card
    assert '"held_out_top1"' in capsys.readouterr().out
    with safe_open(str(output), "pt") as weights:  # the code that pretrained it, in the file and on its card
        assert weights.metadata()["code"] == code_version()
        assert weights.metadata()["machine"] == describe_machine()  # minutes mean little without it
    assert f"adaptor_peft {code_version()}, finished on" in card and f"minutes on {describe_machine()}." in card
