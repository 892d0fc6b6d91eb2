"""The adaptor-peft command."""

from __future__ import annotations

import pytest

from adaptor_peft.cli import main


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
