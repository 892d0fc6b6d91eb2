"""benchmarks/gpu_check.py off a GPU: its scans take Vim's own layouts, and the whole script runs end to end on
the CPU (``torch.cuda``'s calls stubbed by :mod:`tests.offline`) without ``datasets``, writing every section."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import adaptor_peft
import adaptor_peft.models.layers
from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
MODEL = "vim_nano_patch4_32"


def test_scans_are_timed_in_the_layouts_vim_hands_them(monkeypatch):
    """Strides and storage offsets of every sequence argument equal those of Vim's forward-direction scan."""
    calls = []
    scan = adaptor_peft.models.layers.selective_scan

    def recording(u, delta, A, B, C, D, z, **kwargs):
        calls.append(dict(u=u, delta=delta, B=B, C=C, z=z))
        return scan(u, delta, A, B, C, D, z, **kwargs)

    monkeypatch.setattr(adaptor_peft.models.layers, "selective_scan", recording)
    with torch.no_grad():
        adaptor_peft.create_model(MODEL, depth=1)(torch.randn(2, 3, 32, 32))
    shape, img_size = gpu_check.vim_shapes(MODEL)
    assert img_size == 32
    timed = gpu_check.vim_layout(gpu_check.scan_inputs(2, shape), shape)
    for name, vim in calls[0].items():  # the forward direction; the reverse one reads the same views
        assert timed[name].shape == vim.shape, name
        assert (timed[name].stride(), timed[name].storage_offset()) == (vim.stride(), vim.storage_offset()), name
    assert not timed["z"].is_contiguous() and not timed["B"].is_contiguous()
    assert {k: v.stride() for k, v in calls[1].items()} == {k: v.stride() for k, v in calls[0].items()}


def test_gpu_check_runs_end_to_end_on_the_cpu_without_datasets(tmp_path):
    output = tmp_path / "made" / "gpu_check.md"  # its folder is made
    command = [sys.executable, "-m", "tests.support.offline", "--output", str(output), "--model", MODEL, "--batch", "2"]
    # One thread: on a busy two-core machine, torch's threads wait on each other for every small operation.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = output.read_text()
    assert "**failed**" not in report and "**skipped**" not in report, report
    for heading in (
        "# GPU check: CPU standing in for a GPU",
        "## Scan against the CPU float64 reference (192 channels, 65 tokens, 16 states",
        "## Scan speed, 192 channels, 65 tokens, 16 states at batch 2",
        f"## {MODEL}: one training step at batch 2, 32 px",
        f"## {MODEL}: inference at batch 2, 32 px",
        f"{MODEL}, batch 8, float32 on the cpu device: logits rel. err",
        "Total ",
    ):
        assert heading in report, heading
    rows = [line for line in report.splitlines() if line.startswith("| torch |")]
    assert len(rows) == 4  # accuracy and speed, each without and with snapshots
    assert "| adaptor, every activation kept |" in report
    assert sorted(p.name for p in output.parent.iterdir()) == ["gpu_check.md"]  # no temporary file left behind


def test_gpu_check_refuses_a_model_that_is_not_vim(tmp_path):
    command = [
        sys.executable,
        "benchmarks/gpu_check.py",
        "--output",
        str(tmp_path / "r.md"),
        "--model",
        "vmamba_tiny_s1l8",
    ]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2 and "--model vmamba_tiny_s1l8: VSSM is not a Vim model" in run.stderr, run.stderr
    assert not (tmp_path / "r.md").exists()
