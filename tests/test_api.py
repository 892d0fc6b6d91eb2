"""The public API at the top level, loading an adapter onto a model that carries its method already, and
method options that are wrong: one-line errors naming the option, from Python and from the CLI."""

from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import pytest
import torch

import adaptor_peft as ap
from adaptor_peft import adaptors, hub, reports
from adaptor_peft.cli import main
from tests.support.models import images_for, logits, perturb, tiny

PACKAGE = Path(ap.__file__).parent


def test_the_workflow_is_at_the_top_level():
    names = ("inject_adaptor", "prepare_model", "AdaptorConfig", "load_adaptor", "merge_adaptor", "register_method")
    for name in names:
        assert name in ap.__all__ and getattr(ap, name) is getattr(adaptors, name)
    assert "save_adaptor" in ap.__all__ and ap.save_adaptor is hub.save_adaptor
    assert "parameter_report" in ap.__all__ and ap.parameter_report is reports.parameter_report


def test_docstrings_name_only_what_exists():
    """``adaptor_peft.x`` in any docstring of the package is a top-level name or a module."""
    named = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
                named |= set(re.findall(r"adaptor_peft\.(\w+)", ast.get_docstring(node)))
    assert {"inject_adaptor", "save_adaptor"} <= named
    missing = sorted(n for n in named if not hasattr(ap, n) and importlib.util.find_spec(f"adaptor_peft.{n}") is None)
    assert not missing


def trained_adapter(tmp_path: Path, config: ap.AdaptorConfig | None = None) -> Path:
    model = ap.inject_adaptor(tiny("vim"), config)
    torch.manual_seed(3)
    perturb(model, ".adaptor_")
    return ap.save_adaptor(model, tmp_path / "adapter")


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("prepare", ["inject_adaptor", "prepare_model"])
def test_load_into_a_model_that_carries_the_same_adaptors(tmp_path, prepare):
    folder = trained_adapter(tmp_path)
    reference = ap.load_adaptor(tiny("vim"), folder)
    model = ap.inject_adaptor(tiny("vim")) if prepare == "inject_adaptor" else ap.prepare_model(tiny("vim"), "adaptor")
    assert ap.load_adaptor(model, folder) is model  # as peft's load_adapter: inject, then restore a saved state
    torch.testing.assert_close(logits(model, images_for("vim")), logits(reference, images_for("vim")), rtol=0, atol=0)
    assert trainable(model) == trainable(reference)


@pytest.mark.parametrize(
    "prepare, message",
    [
        (lambda m: ap.inject_adaptor(m, ap.AdaptorConfig(t_rank=2)), r"adaptor\.t_rank: model 2, adapter 4"),
        (lambda m: ap.inject_adaptor(m, ap.AdaptorConfig(t_anchor="static")), r"adaptor\.t_anchor: model 'static'"),
        (lambda m: ap.prepare_model(m, "adaptor_t"), r"method: model 'adaptor_t', adapter 'adaptor'"),
        (
            lambda m: ap.prepare_model(m, "lora"),
            r"method: model 'lora', adapter 'adaptor'.*lora\.r: model 8, adapter None",
        ),
    ],
)
def test_load_into_a_model_with_another_method_is_refused_and_changes_nothing(tmp_path, prepare, message):
    folder = trained_adapter(tmp_path)
    model = prepare(tiny("vim"))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(
        ap.AdapterFileError, match=f"does not match the transfer method already on the model.*{message}"
    ):
        ap.load_adaptor(model, folder)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())


def test_an_adapter_trained_with_another_lr_scale_loads_the_same_weights(tmp_path):
    """lr_scale is an optimizer setting: the modules and weights are the same, so the load goes through."""
    folder = trained_adapter(tmp_path, ap.AdaptorConfig(lr_scale=1.0))
    other = ap.AdaptorConfig(lr_scale=3.0, extra={"note": "another run"})
    model = ap.load_adaptor(ap.inject_adaptor(tiny("vim"), other), folder)
    torch.testing.assert_close(
        logits(model, images_for("vim")), logits(ap.load_adaptor(tiny("vim"), folder), images_for("vim"))
    )
    with pytest.raises(ap.AdapterFileError, match=r"adaptor\.t_rank: model 2, adapter 4"):  # shapes still count
        ap.load_adaptor(ap.inject_adaptor(tiny("vim"), ap.AdaptorConfig(t_rank=2, lr_scale=1.0)), folder)


def test_lora_settings_are_compared_with_their_defaults(tmp_path):
    trained = ap.prepare_model(tiny("vim"), "lora", alpha=16)
    folder = ap.save_adaptor(trained, tmp_path / "lora")
    ap.load_adaptor(ap.prepare_model(tiny("vim"), "lora"), folder)  # alpha 16 is the default: the same LoRA
    with pytest.raises(ap.AdapterFileError, match=r"lora\.alpha: model 32, adapter 16"):
        ap.load_adaptor(ap.prepare_model(tiny("vim"), "lora", alpha=32), folder)


# --- method options that are wrong ---------------------------------------------------------------------------

BAD_OPTIONS = [
    ("adaptor", dict(t_rnak=2), r"method 'adaptor' has no option t_rnak \(did you mean t_rank\?\); it takes: blocks, "),
    ("bias", dict(r=4), r"method 'bias' has no option r; it takes: none"),
    ("adaptor", dict(t_rank="4"), r"option t_rank='4' must be of type int"),
    ("adaptor", dict(t_rank=True), r"option t_rank=True must be of type int"),
    ("adaptor", dict(blocks=[0, "1"]), r"option blocks=\[0, '1'\] must be of type list\[int\] \| None"),
    ("adaptor", dict(config={"t_rank": "4"}), r"option config\.t_rank='4' must be of type int"),
    ("adaptor", dict(config={"t_rnak": 4}), r"has no option config\.t_rnak \(did you mean config\.t_rank\?\)"),
    ("adaptor", dict(config=3), r"option config=3 must be of type AdaptorConfig \| dict\[str, Any\]$"),
    ("lora", dict(targets="in_proj"), r"option targets='in_proj' must be of type list\[str\]"),
    ("lora", dict(alpha="high"), r"option alpha='high' must be of type float"),
    ("parallel_adapter", dict(rank=2.5), r"option rank=2.5 must be of type int"),
    ("adaptor", dict(t_locations=0), r"AdaptorConfig\.t_locations: invalid value 0"),
    ("adaptor", dict(t_groups=5), r"AdaptorConfig\.t_groups=5 does not divide the scan width"),
    ("lora", dict(targets=["in_prj"]), r"in_prj"),
]


@pytest.mark.parametrize("method, options, message", BAD_OPTIONS)
def test_a_wrong_option_is_a_one_line_error_naming_it(method, options, message):
    with pytest.raises(ap.MethodOptionError, match=message) as error:
        ap.prepare_model(tiny("vim"), method, **options)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


def test_a_failed_prepare_leaves_the_model_as_it_was():
    """A LoRA target that is not there is found before the adaptors go in, so a corrected call can follow."""
    model = tiny("vim")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ap.MethodOptionError, match=r"LoRA targets \['in_prj'\] match no module"):
        ap.prepare_model(model, "adaptor+lora", targets=["in_prj"])
    assert model.state_dict().keys() == before.keys()
    ap.prepare_model(model, "adaptor+lora", targets=["in_proj"])


def test_an_adapter_that_does_not_fit_leaves_the_head_alone(tmp_path):
    """The method goes on before the head is replaced, so a file whose method cannot go on changes nothing."""
    trained = ap.prepare_model(tiny("vim"), "lora")
    trained.reset_classifier(7)
    folder = ap.save_adaptor(trained, tmp_path / "lora")
    config = json.loads((folder / "adaptor_config.json").read_text())
    config["options"]["targets"] = ["in_prj"]
    (folder / "adaptor_config.json").write_text(json.dumps(config))
    model = tiny("vim")
    head = model.head.weight
    with pytest.raises(ap.MethodOptionError, match="in_prj"):
        ap.load_adaptor(model, folder)
    assert model.head.weight is head and getattr(model, "peft_method", None) is None


def one_line_exit(argv: list[str]) -> str:
    """The message the CLI exits with on ``argv``, which must be a single line."""
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert isinstance(error.value.code, str) and "\n" not in error.value.code
    return error.value.code


def test_a_wrong_option_in_the_params_command_is_one_line():
    message = one_line_exit(["params", "vim_tiny_patch16_224", "--config", '{"t_rank": "4"}'])
    assert message.startswith("adaptor-peft params: method 'adaptor': option t_rank='4' must be of type int")


def test_a_wrong_method_option_in_a_recipe_is_one_line(tmp_path):
    run = ["train", "--recipe", "demo/digits", "--method", "adaptor", "--output-dir", str(tmp_path / "run")]
    message = one_line_exit([*run, "--no-progress", "method_options.t_rnak=2"])
    assert re.match(r"adaptor-peft train: .*'adaptor' has no option t_rnak \(did you mean t_rank\?\)", message)
    assert not (tmp_path / "run").exists()
