"""Many independent runs at once: the demo's methods, the suite's selection and seed runs.

A tiny backbone keeps two CPU cores only half busy in one run (its operations are too small to split
well), so on a CPU ``workers`` processes train one run each, with the cores shared out between them. Each
run is :func:`~adaptor_peft.training.loop.train_once`, so finished runs are read back, not retrained,
and every run gives the numbers it gives alone up to the rounding of its thread count.

Each worker sends its run's progress (:class:`~.progress.Update`) to this process, which alone shows it,
so that runs side by side never interleave their lines on the screen.

The workers are started with ``spawn``: a script that calls this (or ``run_demo`` / ``run_suite``) must
do so under ``if __name__ == "__main__":``, as for any ``multiprocessing`` code; notebooks need nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from multiprocessing.context import SpawnContext
from multiprocessing.queues import SimpleQueue
from pathlib import Path
from typing import Any

import torch

from ..adaptors.methods import METHODS
from .loop import train_once
from .progress import Show, Update, quiet

Job = tuple[dict[str, Any], Path]
"""A recipe and its run folder."""
Done = Callable[[int, dict[str, Any], float | None], None]
"""Called in the parent for each finished job: its index, results and minutes (None: read back)."""
MAX_DEFAULT_WORKERS = 8
"""The most processes started by default: each holds its own PyTorch (a few hundred MB)."""


def cores() -> int:
    """The CPU cores this process may run on (its affinity, which containers narrow; else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(jobs: int) -> int:
    """One process per core, up to one per job and :data:`MAX_DEFAULT_WORKERS`, on a CPU-only machine;
    one on a GPU machine, whose device the runs would otherwise share."""
    if torch.cuda.is_available():
        return 1
    return max(1, min(jobs, cores(), MAX_DEFAULT_WORKERS))


def expected_cost(recipe: dict[str, Any]) -> float:
    """A run's training time relative to other runs of the same data, for starting the longest first: its
    epochs times its method's :attr:`~adaptor_peft.adaptors.methods.Method.step_cost`."""
    method = METHODS.get(recipe.get("method"))  # an unknown method gets its clear error from the run itself
    return recipe.get("epochs", 1) * (method.step_cost if method is not None else 3.0)


_UPDATES: SimpleQueue | None = None
"""In a worker: where its run's updates go to the parent, None where the parent shows nothing."""


def _start_worker(threads: int, updates: SimpleQueue | None) -> None:
    global _UPDATES
    torch.set_num_threads(threads)
    _UPDATES = updates


def _send(updates: SimpleQueue, index: int, update: Update) -> None:
    """Puts a worker's update on the parent's queue; SimpleQueue writes it before ``put`` returns, so none
    is still buffered when the run's result reaches the parent."""
    updates.put((index, update))


@contextmanager
def _relayed(context: SpawnContext, show: Show | None) -> Iterator[SimpleQueue | None]:
    """A queue for the workers' ``(index, update)`` pairs, passed on to ``show`` by a thread of this process
    until the block ends and the queue is drained; None (and no thread) without ``show``."""
    if show is None:
        yield None
        return
    updates, stop = context.SimpleQueue(), threading.Event()

    def relay() -> None:
        while not (stop.is_set() and updates.empty()):
            if updates.empty():
                stop.wait(0.05)
            else:
                show(*updates.get())

    thread = threading.Thread(target=relay, name="progress relay", daemon=True)
    thread.start()
    try:
        yield updates
    finally:
        stop.set()
        thread.join(timeout=5)  # a worker killed mid-message can leave one unfinished: then it is left behind


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM (``kill``, a job scheduler) raises SystemExit here, so that it unwinds
    as an interrupt does: leaving the pool terminates its workers (by default this process would die alone
    and its workers would train on), and ``finally`` clauses run. Signals reach only the main thread:
    elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train_indexed(item: tuple[int, dict[str, Any], Path, bool]) -> tuple[int, tuple[dict[str, Any], float | None]]:
    index, recipe, run, allow = item
    report = quiet if _UPDATES is None else partial(_send, _UPDATES, index)
    return index, train_once(recipe, run, report=report, allow_other_version=allow)


def train_runs(
    jobs: Sequence[Job],
    workers: int | None = None,
    done: Done | None = None,
    *,
    show: Show | None = None,
    allow_other_version: bool = False,
) -> list[tuple[dict[str, Any], float | None]]:
    """Trains (or reads back) every job, ``workers`` at a time (default :func:`default_workers`), and
    returns ``(results, minutes)`` per job in order. ``show(index, update)`` takes each run's progress in
    this process (:func:`~.progress.show_runs`); without it the runs show nothing. With one worker the runs
    go one after another in this process. The first failure, or an interrupt, stops
    every run still going or queued and is raised; so does SIGTERM. Two jobs may not share a run folder.
    Several workers start the runs longest first (:func:`expected_cost`), which shortens the wait for the last one.
    A finished run of another code version is refused unless ``allow_other_version`` (:func:`train_once`)."""
    workers = default_workers(len(jobs)) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    folders = [Path(run).resolve() for _, run in jobs]
    shared = sorted({str(f) for f in folders if folders.count(f) > 1})
    if shared:
        raise ValueError(f"two jobs would train into the same run folder: {', '.join(shared)}")
    outcomes: list[Any] = [None] * len(jobs)
    if workers == 1 or len(jobs) <= 1:
        for index, (recipe, run) in enumerate(jobs):
            report = quiet if show is None else partial(show, index)
            outcomes[index] = train_once(recipe, run, report=report, allow_other_version=allow_other_version)
            if done:
                done(index, *outcomes[index])
        return outcomes
    workers = min(workers, len(jobs))
    context = multiprocessing.get_context("spawn")  # no forked copy of this process's threads and locks
    # Longest first: the last runs to start are short ones, so no worker is left with a long run alone.
    order = sorted(range(len(jobs)), key=lambda index: -expected_cost(jobs[index][0]))
    items = [(index, *jobs[index], allow_other_version) for index in order]
    # Leaving the block terminates the workers: on a failure or an interrupt nothing trains on behind it.
    with (
        stopped_by_sigterm(),
        _relayed(context, show) as updates,
        context.Pool(workers, _start_worker, (max(1, cores() // workers), updates)) as pool,
    ):
        for index, outcome in pool.imap_unordered(_train_indexed, items):
            outcomes[index] = outcome
            if done:
                done(index, *outcome)
    return outcomes
