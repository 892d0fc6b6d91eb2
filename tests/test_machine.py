"""The lines benchmark and results files open with: the machine, the commit and the code version."""

from __future__ import annotations

import subprocess

from adaptor_peft.provenance import code_version
from benchmarks import machine


def test_vector_isa_is_the_widest_listed():
    assert machine.vector_isa("fpu sse4_2 avx2 avx512f") == "AVX-512"
    assert machine.vector_isa("fpu sse4_2 avx2") == "AVX2"
    assert machine.vector_isa("fp asimd") == "NEON"
    assert machine.vector_isa("fpu") == "scalar"


def test_commit_is_the_checkouts_with_edits_marked(monkeypatch):
    answers = {"rev-parse": "abc1234\n", "status": " M adaptor_peft/suite.py\n"}

    def git(command, **kwargs):
        return subprocess.CompletedProcess(command, 0, stdout=answers[command[1]], stderr="")

    monkeypatch.setattr(machine.subprocess, "run", git)
    assert machine.commit() == "abc1234+edits"
    answers["status"] = ""
    assert machine.commit() == "abc1234"


def test_commit_outside_git_is_unknown(monkeypatch):
    def no_git(command, **kwargs):
        raise subprocess.CalledProcessError(128, command)

    monkeypatch.setattr(machine.subprocess, "run", no_git)
    assert machine.commit() == "unknown"


def test_provenance_names_command_commit_code_version_and_machine(monkeypatch):
    monkeypatch.setattr(machine, "commit", lambda: "abc1234")
    line = machine.provenance(["--family", "lora"])
    assert "--family lora`" in line and "commit abc1234" in line
    assert f"code version {code_version()}" in line and line.endswith(machine.describe())
