"""The summary plot: every method's label readable, none drawn over another."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt

from adaptor_peft.reports import summarize


def test_labels_of_close_points_do_not_overlap(tmp_path, monkeypatch):
    parameters = {"lora": 6_000, "adaptor_s": 6_100, "full": 600_000, "linear_probe": 0}
    top1 = {"lora": 94.5, "adaptor_s": 94.6, "full": 95.0, "linear_probe": 60.0}  # lora and adaptor_s: one spot
    results = [
        {"task": "digits", "model": "m", "method": method, "top1": top1[method],
         "parameters": {"trainable_without_head": n, "trainable_percent": 1.0}}
        for method, n in parameters.items()
    ]  # fmt: skip
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to measure its labels
    summarize(results).plot(tmp_path / "plot.png")
    (figure,) = figures
    renderer = figure.canvas.get_renderer()
    texts = [t for t in figure.findobj(plt.Text) if t.get_text() in parameters and t.get_visible()]
    assert sorted(t.get_text() for t in texts) == sorted(parameters)  # each method labelled once
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert not [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]
