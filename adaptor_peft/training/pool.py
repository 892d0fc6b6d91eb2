"""Many independent runs at once: the demo's methods, the suite's selection and seed runs.

A tiny backbone keeps two CPU cores only half busy in one run (its operations are too small to split
well), so on a CPU ``workers`` processes train one run each, with the cores shared out between them. Each
run is :func:`~adaptor_peft.training.loop.train_once`, so finished runs are read back, not retrained,
and every run gives the numbers it gives alone up to the rounding of its thread count.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from .loop import train_once

Job = tuple[dict[str, Any], Path]
"""A recipe and its run folder."""
Done = Callable[[int, dict[str, Any], float | None], None]
"""Called in the parent for each finished job: its index, results and minutes (None: read back)."""


def cores() -> int:
    """The CPU cores this process may run on (its affinity, which containers narrow; else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(jobs: int) -> int:
    """One process per core up to one per job on a CPU-only machine; one on a GPU machine, whose device
    the runs would otherwise share."""
    if torch.cuda.is_available():
        return 1
    return max(1, min(jobs, cores()))


def _share_cores(threads: int) -> None:
    torch.set_num_threads(threads)


def train_runs(
    jobs: Sequence[Job], workers: int | None = None, done: Done | None = None, *, progress: bool = False
) -> list[tuple[dict[str, Any], float | None]]:
    """Trains (or reads back) every job, ``workers`` at a time (default :func:`default_workers`), and
    returns ``(results, minutes)`` per job in order. With one worker the runs go one after another in
    this process, with a progress bar each if ``progress``; the first failure stops the rest and is raised."""
    workers = default_workers(len(jobs)) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    outcomes: list[Any] = [None] * len(jobs)
    if workers == 1 or len(jobs) <= 1:
        for index, (recipe, run) in enumerate(jobs):
            outcomes[index] = train_once(recipe, run, progress=progress)
            if done:
                done(index, *outcomes[index])
        return outcomes
    threads = max(1, cores() // workers)
    context = multiprocessing.get_context("spawn")  # no forked copy of this process's threads and locks
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_share_cores, initargs=(threads,)) as pool:
        futures = {pool.submit(train_once, recipe, run): index for index, (recipe, run) in enumerate(jobs)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                if future.exception() is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise future.exception()
                outcomes[futures[future]] = future.result()
                if done:
                    done(futures[future], *outcomes[futures[future]])
    return outcomes
