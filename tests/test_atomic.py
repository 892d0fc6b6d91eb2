"""write_atomically: all or nothing, with the usual file permissions."""

from __future__ import annotations

import os
import stat

import pytest

from adaptor_peft.atomic import write_atomically


def test_writes_text_and_bytes_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomically(tmp_path / "a.txt", "hello")
        write_atomically(tmp_path / "b.bin", b"\x00\x01")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").read_text() == "hello" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]  # no temporary files left


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    write_atomically(target, "old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
