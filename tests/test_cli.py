"""The adaptor-peft command."""

from __future__ import annotations

import json
import re

import pytest

from adaptor_peft.adaptors import prepare_model
from adaptor_peft.cli import main
from adaptor_peft.models import create_model
from adaptor_peft.reports import parameter_report


def test_info_prints_parameters_and_a_timed_forward(capsys, monkeypatch):
    monkeypatch.setenv("ADAPTOR_PEFT_SCAN_BACKEND", "auto")  # restored afterwards: --backend sets it
    main(["info", "vim_tiny_patch16_224", "--img-size", "64", "--batch-size", "2", "--backend", "torch"])
    out = capsys.readouterr().out
    # Vim-T has 7,148,008 parameters at 224; at 64 its position embedding is 180 tokens x 192 shorter.
    assert f"{7_148_008 - 180 * 192:,}" in out
    assert "logits (2, 1000)" in out and "scan: torch" in out


def test_info_rejects_unknown_models():
    with pytest.raises(SystemExit):
        main(["info", "vit_base_patch16_224"])


# --- adaptor-peft params -----------------------------------------------------------------------------------

# Vim-T: 7,148,008 parameters with its 1000-class head (192 x 1000 + 1000); 24 blocks, width 192, in_proj 192 -> 768.
VIM_T_BACKBONE = 7_148_008 - 193_000


def run_params(capsys, *args: str) -> str:
    main(["params", "vim_tiny_patch16_224", *args])
    return capsys.readouterr().out


def test_params_json_matches_the_report_of_the_same_model(capsys):
    out = run_params(capsys, "--method", "lora", "--config", '{"r": 4}', "--format", "json", "--num-classes", "10")
    data = json.loads(out)
    lora, head = 24 * 4 * (192 + 768), 192 * 10 + 10
    assert data["method"] == "lora" and data["model"] == "vim_tiny_patch16_224"
    assert data["backbone"] == VIM_T_BACKBONE and data["head"] == head and data["added"] == lora
    assert data["trainable"] == lora + head and data["total"] == VIM_T_BACKBONE + lora + head
    assert data["groups"] == {"LoRA": lora, "head": head}
    assert data["trainable_percent"] == pytest.approx(100 * lora / VIM_T_BACKBONE)
    model = prepare_model(create_model("vim_tiny_patch16_224", num_classes=10), "lora", r=4)
    assert data == json.loads(parameter_report(model).to_json())


def test_params_reads_options_from_a_json_file(capsys, tmp_path):
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"r": 2, "targets": ["out_proj"]}))
    data = json.loads(run_params(capsys, "--method", "lora", "--config", str(options), "--format", "json"))
    lora = 24 * 2 * (384 + 192)  # out_proj: 384 -> 192
    assert data["added"] == lora and data["groups"] == {"LoRA": lora, "head": 193_000}
    options.write_text(json.dumps({"t_rank": 2, "blocks": [0, 23], "spatial": False}))
    data = json.loads(run_params(capsys, "--method", "adaptor_t", "--config", str(options), "--format", "json"))
    nonzero = {name: count for name, count in data["blocks"].items() if count}
    assert list(nonzero) == ["layers.0", "layers.23"] and set(data["groups"]) == {"Adaptor-T", "head"}


def test_params_markdown_and_table(capsys):
    out = run_params(capsys, "--method", "bias", "--format", "markdown", "--num-classes", "10")
    model = prepare_model(create_model("vim_tiny_patch16_224", num_classes=10), "bias")
    report = parameter_report(model)
    assert out == report.to_markdown()
    assert "method `bias`" in out and f"| trainable | {report.trainable:,} |" in out
    out = run_params(capsys, "--method", "bias", "--num-classes", "10")  # the default: a rich table
    assert "vim_tiny_patch16_224" in out and f"{report.trainable:,}" in out


@pytest.mark.parametrize(
    "method, config, message",
    [
        ("lora", "{r: 4", "--config is not valid JSON"),
        ("lora", "[4]", "--config must be a JSON object"),
        ("lora", '{"rank": 4}', r"'lora'.* option.*rank"),
        ("adaptor", '{"t_anchor": "sideways"}', "AdaptorConfig.t_anchor"),
        ("adaptor", '{"t_groups": 5}', "t_groups=5"),
        ("adaptor_t", '{"spatial": true}', r"spatial=True.*method sets (spatial=)?False"),
    ],
)
def test_params_rejects_bad_options_with_a_message(capsys, method, config, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["params", "vim_tiny_patch16_224", "--method", method, "--config", config])
    assert isinstance(exit_info.value.code, str) and re.search(message, exit_info.value.code)
    assert exit_info.value.code.startswith("adaptor-peft params: ")


def test_params_rejects_a_bad_json_file(tmp_path):
    options = tmp_path / "options.json"
    options.write_text('{"r": }')
    with pytest.raises(SystemExit, match=f"--config file {options} is not valid JSON"):
        main(["params", "vim_tiny_patch16_224", "--method", "lora", "--config", str(options)])
    options.write_bytes(b'{"r": "\xff\xfe"}')
    with pytest.raises(SystemExit, match="is not valid JSON"):
        main(["params", "vim_tiny_patch16_224", "--method", "lora", "--config", str(options)])
    with pytest.raises(SystemExit) as exit_info:  # argparse: unknown method
        main(["params", "vim_tiny_patch16_224", "--method", "lorra"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("method_options.t_groups=5", r"method='adaptor' with method_options=\{'t_groups': 5\}: .*t_groups"),
        ("method_options.rank=4", r"method='adaptor' with method_options=\{'rank': 4\}: .*rank"),
        ("model_options.dpeth=2", r"model='vim_nano_patch4_32' with model_options=\{'dpeth': 2\}: .*'dpeth'"),
    ],
)
def test_train_reports_a_model_that_cannot_be_built_in_one_line(tmp_path, override, message):
    with pytest.raises(SystemExit, match=message) as exit_info:
        main(["train", "--recipe", "demo/digits", "--output-dir", str(tmp_path / "run"), "--no-progress", override])
    assert exit_info.value.code.startswith("adaptor-peft train: RecipeError: ") and "\n" not in exit_info.value.code
    assert not (tmp_path / "run").exists()
