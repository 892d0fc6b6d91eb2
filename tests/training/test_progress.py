"""How runs' progress is shown (adaptor_peft.training.progress): one live, labelled line per running run on a
terminal, one plain labelled line per finished epoch elsewhere."""

from __future__ import annotations

import io

from rich.console import Console

from adaptor_peft.training.progress import Update, show_runs

RECORD = {"epoch": 2, "lr": 0.001, "train_loss": 0.41234, "train_seconds": 1.5}


def test_off_a_terminal_each_finished_epoch_is_one_labelled_line():
    console = Console(record=True, width=40)  # narrow: a line is not wrapped
    with show_runs(["lora", "adaptor_s"], live=True, console=console) as show:
        show(0, Update(2, 5, 3, 4, 0.5))  # a batch: no line
        show(1, Update(2, 5, 4, 4, 0.41234, RECORD))
    lines = console.export_text().splitlines()
    assert lines == ["[adaptor_s] epoch 2/5: lr 0.001, train_loss 0.4123, train_seconds 1.5"]


def test_on_a_terminal_each_running_run_has_its_own_live_line():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with show_runs(["lora", "adaptor_s"], live=True, console=console) as show:
        show(0, Update(1, 2, 1, 4, 0.75))
        show(1, Update(1, 2, 3, 4, 0.25))
    frame = out.getvalue()
    lines = [line for line in frame.splitlines() if "epoch" in line]
    assert any("lora" in line and "1/4" in line and "loss 0.7500" in line for line in lines)
    assert any("adaptor_s" in line and "3/4" in line and "loss 0.2500" in line for line in lines)
    assert not any("lora" in line and "adaptor_s" in line for line in lines)  # never on one line
