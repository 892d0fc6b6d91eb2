"""benchmarks/params.py: the trainable-parameter table, against the package's parameter report."""

from __future__ import annotations

import pytest

from adaptor_peft import create_model
from adaptor_peft.adaptors import prepare_model
from adaptor_peft.provenance import code_version
from adaptor_peft.reports import parameter_report
from benchmarks import params


def test_the_table_gives_each_methods_report_and_opens_with_its_provenance(tmp_path):
    output = tmp_path / "params.md"
    text = params.main(["--models", "Vim-T", "--output", str(output)])
    written = output.read_text()
    assert written.startswith("`python ") and f"code version {code_version()}" in written.splitlines()[0]
    assert written.endswith(text)
    assert "| method | Vim-T (7.0 M) |" in text  # one column: the models asked for
    assert "Vim-T (vim_tiny_patch16_224, 100-class head) in detail" in text  # Vim-S not asked for: the first
    for method in ("lora", "adaptor", "full"):
        report = parameter_report(prepare_model(create_model("vim_tiny_patch16_224", num_classes=100), method))
        share = f"{report.trainable_without_head / 1e6:.3f} M ({report.trainable_percent:.2f} %)"
        assert f"| {method} | {share} |" in text
        assert f"| {method} | {report.trainable_without_head:,} | {report.trainable_percent:.2f} % |" in text


def test_an_unknown_model_is_refused_with_the_known_ones(capsys):
    with pytest.raises(SystemExit):
        params.main(["--models", "Vim-T,Vim-X"])
    assert "--models: unknown Vim-X; choose from Vim-T, Vim-S" in capsys.readouterr().err


def test_a_method_placed_on_modules_an_architecture_lacks_is_not_applicable_there():
    assert params.report("vmamba_tiny_s1l8", "lora_x_proj") is None  # VMamba's x_proj is a parameter, not a Linear
    applicable = params.report("vim_tiny_patch16_224", "lora_x_proj")
    assert applicable is not None and applicable.trainable_without_head > 0
