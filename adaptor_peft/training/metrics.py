"""Classification metrics of an evaluation, as papers report them.

Top-1 and top-5 are *micro* averages: the fraction of correct images (torchmetrics' ``MulticlassAccuracy``
defaults to the macro average, another number). The state is three integer counts, so batches and the
order they come in change nothing. Predictions arrive already gathered from every process
(``gather_for_metrics``), so nothing here syncs again, which would count every image once per process.
Counted here rather than by torchmetrics, whose import (it pulls in scipy, matplotlib and transformers
where installed) took longer than the rest of the package.
"""

from __future__ import annotations

import torch


class ClassificationMetrics:
    """Top-1, top-5 (top-k for fewer than 5 classes) and per-class accuracy, in percent."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes, self.k = num_classes, min(5, num_classes)
        self.correct = torch.zeros(num_classes, dtype=torch.long, device=device)  # top-1 hits per true class
        self.support = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.top_k_hits = torch.zeros((), dtype=torch.long, device=device)
        self.images = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Counts one batch: ``logits`` (images, classes), ``labels`` (images,) class indices. The top-1
        prediction is the first largest logit (``argmax``)."""
        if logits.dim() != 2 or logits.shape != (labels.numel(), self.num_classes):
            raise ValueError(
                f"metrics: logits must be (images={labels.numel()}, classes={self.num_classes}), "
                f"got {tuple(logits.shape)}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"metrics: labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        logits = logits.float()
        hit = logits.argmax(1) == labels
        self.correct += torch.bincount(labels[hit], minlength=self.num_classes)
        self.support += torch.bincount(labels, minlength=self.num_classes)
        self.top_k_hits += (logits.topk(self.k, dim=1).indices == labels[:, None]).any(1).sum()
        self.images += labels.numel()

    def compute(self) -> dict[str, float | int | list[float | None]]:
        """Percentages; a class with no image in the evaluated set has per-class accuracy None, not 0."""
        if not self.images:
            raise ValueError("no images were evaluated: the evaluation split is empty")
        per_class = zip(self.correct.tolist(), self.support.tolist(), strict=True)
        return {
            "top1": 100 * self.correct.sum().item() / self.images,
            "top5": 100 * self.top_k_hits.item() / self.images,
            "per_class": [round(100 * hits / n, 4) if n else None for hits, n in per_class],
            "images": self.images,
        }
