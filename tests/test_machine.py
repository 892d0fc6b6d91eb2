"""The lines benchmark and results files open with: the machine, the commit and the code version."""

from __future__ import annotations

import subprocess

from adaptor_peft import provenance
from adaptor_peft.provenance import code_version, cpu_flags, describe_machine, vector_isa
from benchmarks import machine


def test_vector_isa_is_the_widest_listed():
    assert vector_isa("fpu sse4_2 avx2 avx512f") == "AVX-512"
    assert vector_isa("fpu sse4_2 avx2") == "AVX2"
    assert vector_isa("fp asimd") == "NEON"
    assert vector_isa("fpu") == "scalar"


def test_cpu_flags_are_x86s_flags_or_arms_features():
    assert cpu_flags({"flags": "fpu avx2", "model name": "x"}) == "fpu avx2"
    assert cpu_flags({"Features": "fp asimd"}) == "fp asimd"
    assert cpu_flags({}) == ""


def test_the_machine_is_named_by_model_architecture_widest_isa_and_cores(monkeypatch):
    fields = {"model name": "AMD EPYC 9004", "flags": "fpu sse4_2 avx2"}
    monkeypatch.setattr(provenance, "cpu_fields", lambda: fields)
    monkeypatch.setattr(provenance.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(provenance.os, "cpu_count", lambda: 2)
    assert describe_machine() == "AMD EPYC 9004, x86_64, AVX2, 2 cores"
    fields.clear()
    fields.update({"CPU part": "0xd0c", "Features": "fp asimd"})  # an Arm /proc/cpuinfo
    monkeypatch.setattr(provenance.platform, "machine", lambda: "aarch64")
    assert describe_machine() == "0xd0c, aarch64, NEON, 2 cores"


def test_cpu_fields_are_the_first_processors(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: First CPU\n\nprocessor\t: 1\nmodel name\t: Second CPU\n")
    assert provenance.cpu_fields(info)["model name"] == "First CPU"
    assert provenance.cpu_fields(tmp_path / "absent") == {}


def test_commit_is_the_checkouts_with_its_edited_files_named(monkeypatch):
    answers = {"rev-parse": "abc1234\n", "diff": "recipes/offline_vtab/_tuned.yaml\n"}

    def git(command, **kwargs):
        return subprocess.CompletedProcess(command, 0, stdout=answers[command[1]], stderr="")

    monkeypatch.setattr(machine.subprocess, "run", git)
    assert machine.commit() == "abc1234+edits (recipes/offline_vtab/_tuned.yaml)"
    answers["diff"] = "a.py\nb.py\nc.py\nd.py\ne.py\n"
    assert machine.commit() == "abc1234+edits (a.py, b.py, c.py and 2 more)"
    answers["diff"] = ""
    assert machine.commit() == "abc1234"


def test_commit_names_the_edits_of_a_real_checkout(tmp_path, monkeypatch):
    """Against git itself: a tracked file changed is named, an untracked one is not."""

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "tracked.txt").write_text("one\n")
    git("add", "tracked.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    (tmp_path / "benchmarks").mkdir()
    monkeypatch.setattr(machine, "__file__", str(tmp_path / "benchmarks" / "machine.py"))
    head = machine.commit()
    assert "+" not in head and len(head) >= 7
    (tmp_path / "untracked.txt").write_text("new\n")
    (tmp_path / "tracked.txt").write_text("two\n")
    assert machine.commit() == f"{head}+edits (tracked.txt)"


def test_commit_outside_git_is_unknown(monkeypatch):
    def no_git(command, **kwargs):
        raise subprocess.CalledProcessError(128, command)

    monkeypatch.setattr(machine.subprocess, "run", no_git)
    assert machine.commit() == "unknown"


def test_provenance_names_command_commit_code_version_and_machine(monkeypatch):
    monkeypatch.setattr(machine, "commit", lambda: "abc1234")
    line = machine.provenance(["--family", "lora"])
    assert "--family lora`" in line and "commit abc1234" in line
    assert f"code version {code_version()}" in line and line.endswith(describe_machine())
