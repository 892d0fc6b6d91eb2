"""A run records the code version that trained it; a rerun refuses a run of other code unless allowed."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from adaptor_peft import provenance
from adaptor_peft.adaptors.methods import resolved_settings
from adaptor_peft.cli import main
from adaptor_peft.suite import QUICK
from adaptor_peft.training import TrainingError, load_recipe
from adaptor_peft.training.loop import train, train_once
from adaptor_peft.training.runs import UNRECORDED, as_recorded
from tests.support.training import interrupt

OLD = "0.2.0+0123456789ab"


def finished_run(folder, recipe, code: str | None):
    """A run folder as a finished run of ``recipe`` leaves it, recorded by code version ``code`` (None: a run
    from before the record)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(as_recorded(recipe), sort_keys=False))
    record = {"method": resolved_settings(recipe["method"], dict(recipe["method_options"]))}
    (folder / "resolved.json").write_text(json.dumps({**record, **({"code": code} if code else {})}))
    (folder / "results.json").write_text(json.dumps({"task": "count", "top1": 12.5}))
    return folder


def test_code_version_is_the_package_version_and_a_hash_of_its_source(tmp_path, monkeypatch):
    version = provenance.code_version()
    assert version.startswith("0.") and len(version.split("+")[1]) == 12
    (tmp_path / "ops").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "ops" / "k.c").write_text("int x;\n")
    monkeypatch.setattr(provenance, "PACKAGE", tmp_path)
    provenance.code_version.cache_clear()
    try:
        first = provenance.code_version()
        provenance.code_version.cache_clear()
        assert provenance.code_version() == first  # reproducible
        (tmp_path / "ops" / "k.c").write_text("int y;\n")  # a kernel change is a new version
        provenance.code_version.cache_clear()
        assert provenance.code_version() != first
    finally:
        provenance.code_version.cache_clear()


@pytest.mark.parametrize("code", [OLD, None])
def test_a_finished_run_of_other_code_is_refused_unless_allowed(tmp_path, code):
    recipe = load_recipe("offline_vtab/count", ["method=linear_probe", *QUICK])
    run = finished_run(tmp_path / "run", recipe, code)
    recorded = code or UNRECORDED
    message = f"{run} was trained by code version {recorded}, not this one ({provenance.code_version()})"
    with pytest.raises(TrainingError, match=re.escape(message) + ".*--allow-other-version"):
        train_once(recipe, run)
    results, minutes = train_once(recipe, run, allow_other_version=True)
    assert (results["top1"], results["code"], minutes) == (12.5, recorded, None)  # read back, not trained


def test_a_finished_run_of_this_code_is_read_back(tmp_path):
    recipe = load_recipe("offline_vtab/count", ["method=linear_probe", *QUICK])
    run = finished_run(tmp_path / "run", recipe, provenance.code_version())
    assert train_once(recipe, run) == ({"task": "count", "top1": 12.5, "code": provenance.code_version()}, None)


def test_a_run_resumed_by_other_code_records_both_versions(tmp_path, monkeypatch):
    recipe = load_recipe("offline_vtab/count", ["method=linear_probe", *QUICK, "epochs=2"])
    run, now = tmp_path / "run", provenance.code_version()
    monkeypatch.setattr("adaptor_peft.training.runs.code_version", lambda: OLD)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, run, progress=False, after_epoch=interrupt)
    monkeypatch.undo()
    with pytest.raises(TrainingError, match=re.escape(f"code version {OLD}, not this one ({now})")):
        train_once(recipe, run)
    mixed = f"{OLD}, resumed by {now}"
    assert train_once(recipe, run, allow_other_version=True)[0]["code"] == mixed
    with pytest.raises(TrainingError, match=re.escape(f"code version {mixed}, not this one")):
        train_once(recipe, run)  # a finished run of mixed code passes for neither version
    assert train_once(recipe, run, allow_other_version=True)[0]["code"] == mixed  # read back, recorded once


def test_suite_passes_allow_other_version_on(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("adaptor_peft.cli.run_suite", lambda *a, **k: calls.append(k))
    main(["suite", "--quick", "--output-dir", str(tmp_path)])
    main(["suite", "--quick", "--output-dir", str(tmp_path), "--allow-other-version"])
    assert [c["allow_other_version"] for c in calls] == [False, True]
