"""Without Hugging Face ``datasets`` (a lent GPU box, an offline install): the package and its CLI import and
run, and only the data kinds that read through ``datasets`` fail, with an error naming the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from adaptor_peft.data import DataError, load_split

ROOT = Path(__file__).resolve().parents[1]


def test_package_and_cli_import_and_run_without_datasets():
    code = (
        "from tests.support.offline import hide_datasets; hide_datasets()\n"
        "import sys, adaptor_peft, adaptor_peft.cli, adaptor_peft.training\n"
        f"assert adaptor_peft.__file__.startswith({str(ROOT)!r}), adaptor_peft.__file__\n"
        "assert sys.modules['datasets'] is None\n"
        "adaptor_peft.cli.main(['params', 'vim_nano_patch4_32', '--method', 'lora', '--format', 'json'])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert '"trainable' in run.stdout


@pytest.mark.parametrize("kind", ["hub", "parquet"])
def test_hub_and_parquet_splits_name_the_missing_datasets_package(kind, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what ``import datasets`` meets where it is not installed
    (tmp_path / "train.parquet").touch()
    source = {
        "hub": {"kind": "hub", "id": "uoft-cs/cifar100", "splits": {"train": "train[:800]"}},
        "parquet": {"kind": "parquet", "files": {"train": "train.parquet"}},
    }[kind]
    with pytest.raises(DataError, match=rf"the {kind} data kind .* datasets, which is not installed.*pip install"):
        load_split(source, "train", root=tmp_path)
