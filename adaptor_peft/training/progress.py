"""What a run reports while it trains, and how it is shown: one live, labelled line per running run on a
terminal, one plain labelled line per epoch elsewhere (``[lora] epoch 2/5: train_loss 0.41, ...``).

Runs that train side by side (:mod:`.pool`) report from their own processes; their updates travel to the
parent, which alone writes to the screen, so that the lines of two runs never interleave and each names its
run. The machine-readable record of every epoch is the run folder's ``log.jsonl``, not the screen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


@dataclass(frozen=True)
class Update:
    """``done`` of the ``total`` batches of epoch ``epoch`` of ``epochs`` trained, the last at ``loss``;
    ``record`` is the epoch's ``log.jsonl`` line once the epoch is finished, else None."""

    epoch: int
    epochs: int
    done: int
    total: int
    loss: float
    record: dict[str, Any] | None = None


Report = Callable[[Update], None]
"""Takes a run's updates, in the process that trains it."""
Show = Callable[[int, Update], None]
"""Takes the updates of several runs, each with the index of its run, in the process that shows them."""


def quiet(update: Update) -> None:
    """A :data:`Report` that shows nothing."""


def epoch_line(label: str, update: Update) -> str:
    """The plain line of a finished epoch: ``[label] epoch 2/5: train_loss 0.4123, lr 0.0003, ...``."""
    values = ", ".join(f"{k} {v:.4g}" for k, v in (update.record or {}).items() if k != "epoch")
    return f"[{label}] epoch {update.epoch}/{update.epochs}: {values}"


@contextmanager
def show_runs(labels: Sequence[str], *, live: bool, console: Console | None = None) -> Iterator[Show]:
    """A :data:`Show` for the runs named ``labels``: where ``live`` and the console is a terminal, a live
    display with one line per running run (its label, the epoch's batches, epoch and loss), gone when the
    block ends; otherwise one plain line per finished epoch (:func:`epoch_line`)."""
    console = console or Console()
    if not (live and console.is_terminal):

        def plain(index: int, update: Update) -> None:
            if update.record is not None:
                console.print(epoch_line(labels[index], update), markup=False, highlight=False, soft_wrap=True)

        yield plain
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
        tasks: dict[int, TaskID] = {}

        def show(index: int, update: Update) -> None:
            if index not in tasks:
                tasks[index] = bar.add_task(labels[index], total=update.total, info="")
            info = f"epoch {update.epoch}/{update.epochs} loss {update.loss:.4f}"
            bar.update(tasks[index], completed=update.done, total=update.total, info=info)
            if update.record is not None and update.epoch == update.epochs:  # trained: its line goes
                bar.remove_task(tasks.pop(index))

        yield show


@contextmanager
def reporting(report: Report | None, label: str, *, live: bool) -> Iterator[Report]:
    """``report``, or where it is None a display of one run labelled ``label`` (:func:`show_runs`)."""
    if report is not None:
        yield report
        return
    with show_runs([label], live=live) as show:
        yield partial(show, 0)
