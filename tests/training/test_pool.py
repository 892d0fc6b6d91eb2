"""Runs side by side: the same results as one after another, in job order, and failures raised."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time

import pytest

from adaptor_peft.adaptors import METHODS
from adaptor_peft.suite import QUICK
from adaptor_peft.training import load_recipe
from adaptor_peft.training.pool import default_workers, expected_cost, train_runs


def jobs(tmp_path, folder, methods):
    return [(load_recipe("offline_vtab/count", [f"method={m}", *QUICK]), tmp_path / folder / m) for m in methods]


def test_parallel_runs_match_sequential_ones_in_order_and_are_read_back(tmp_path, capfd):
    methods = ["linear_probe", "bias", "adaptor_s"]
    calls, shown = [], {"two": [], "one": []}
    parallel = train_runs(
        jobs(tmp_path, "two", methods),
        2,
        lambda i, r, m: calls.append((i, r["method"], m)),
        show=lambda i, update: shown["two"].append((i, update)),
    )
    sequential = train_runs(jobs(tmp_path, "one", methods), 1, show=lambda i, u: shown["one"].append((i, u)))
    for updates in shown.values():  # each run's progress reaches the parent, by run, ending with its epoch's line
        assert {i for i, _ in updates} == {0, 1, 2}
        last = {i: update for i, update in updates}
        assert all(u.record is not None and u.record["epoch"] == u.epochs == 1 for u in last.values())
    assert not [line for line in capfd.readouterr().out.splitlines() if line.startswith("{")]  # no bare JSON
    assert [r["method"] for r, _ in parallel] == methods
    assert sorted(i for i, _, _ in calls) == [0, 1, 2] and all(methods[i] == m for i, m, _ in calls)
    assert all(minutes is not None for _, _, minutes in calls)  # trained, not read back
    for (p, _), (s, _), method in zip(parallel, sequential, methods, strict=True):
        assert p["top1"] == pytest.approx(s["top1"], abs=1e-6) and p["images"] == s["images"] == 8
        losses = [
            json.loads((tmp_path / f / method / "log.jsonl").read_text().splitlines()[-1]) for f in ("two", "one")
        ]
        assert losses[0]["train_loss"] == pytest.approx(losses[1]["train_loss"], rel=1e-4)  # the same training
    again = train_runs(jobs(tmp_path, "two", methods), 2)
    assert [m for _, m in again] == [None, None, None]  # finished runs are read back
    assert [r for r, _ in again] == [json.loads((tmp_path / "two" / m / "results.json").read_text()) for m in methods]


def test_a_failing_run_stops_the_queued_ones_and_bad_jobs_are_refused(tmp_path):
    bad = jobs(tmp_path, "bad", ["adaptor+lora", "linear_probe", "bias", "adaptor_s", "adaptor_t", "adaptor", "full"])
    bad[0][0]["method_options"] = {"r": "eight"}
    with pytest.raises(Exception, match=r"option lora\.r='eight' must be of type int"):
        train_runs(bad, 2)
    assert not (tmp_path / "bad" / "full" / "results.json").exists()  # queued behind the failure: never ran
    with pytest.raises(ValueError, match="workers must be at least 1"):
        train_runs(bad, 0)
    twice = jobs(tmp_path, "twice", ["bias", "bias"])
    with pytest.raises(ValueError, match=f"same run folder: {tmp_path / 'twice' / 'bias'}"):
        train_runs(twice, 2)
    assert not (tmp_path / "twice").exists()
    assert 1 <= default_workers(3) <= 3 and default_workers(100) <= 8


def test_runs_are_started_longest_first_by_their_expected_cost(tmp_path):
    recipes = {m: recipe for (recipe, _), m in zip(jobs(tmp_path, "c", list(METHODS)), METHODS, strict=True)}
    cost = {m: expected_cost(recipe) for m, recipe in recipes.items()}
    assert cost["linear_probe"] < cost["lora"] == cost["full"] == cost["adaptor_s"] < cost["adaptor_t"]
    assert cost["adaptor"] == cost["adaptor_booster"] == cost["adaptor_t"]
    longer = dict(recipes["lora"], epochs=recipes["lora"]["epochs"] * 2)
    assert expected_cost(longer) == 2 * cost["lora"]
    assert expected_cost(dict(recipes["lora"], method="no_such_method")) == cost["lora"]  # the run will say why


STOPPED = """
import sys
from adaptor_peft.suite import QUICK
from adaptor_peft.training import load_recipe
from adaptor_peft.training.pool import train_runs

if __name__ == "__main__":
    recipe = load_recipe("offline_vtab/count", ["method=full", *QUICK, "epochs=1000"])
    train_runs([(recipe, sys.argv[1] + "/a"), (dict(recipe, seed=1), sys.argv[1] + "/b")], 2)
"""


def test_sigterm_stops_the_workers_with_the_parent(tmp_path):
    psutil = pytest.importorskip("psutil")  # installed with accelerate
    script = tmp_path / "stopped.py"
    script.write_text(STOPPED)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=tmp_path)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / run / "log.jsonl").is_file() for run in "ab"):  # both workers are training
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        workers = psutil.Process(parent.pid).children(recursive=True)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        assert not psutil.wait_procs(workers, timeout=30)[1]  # none alive
    finally:
        for process in [*workers, parent]:  # whatever failed, nothing trains on after the test
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
