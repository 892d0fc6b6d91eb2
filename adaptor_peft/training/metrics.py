"""Classification metrics of an evaluation, with the field's pitfalls avoided.

Three separate torchmetrics objects, not a ``MetricCollection``: a collection's compute groups may merge
top-1 and top-5 into one state and report one for the other. Top-1 and top-5 are *micro* averages (the
fraction of correct images, what papers report); torchmetrics' default is macro. Predictions arrive
already gathered from every process (``gather_for_metrics``), so the metrics do not sync again, which
would count every image once per process.
"""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassAccuracy


class ClassificationMetrics:
    """Top-1, top-5 (top-k for fewer than 5 classes) and per-class accuracy, in percent."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        options = dict(num_classes=num_classes, sync_on_compute=False)
        self.top1 = MulticlassAccuracy(top_k=1, average="micro", **options).to(device)
        self.top5 = MulticlassAccuracy(top_k=min(5, num_classes), average="micro", **options).to(device)
        self.per_class = MulticlassAccuracy(top_k=1, average=None, **options).to(device)
        self.support = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.images = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        for metric in (self.top1, self.top5, self.per_class):
            metric.update(logits, labels)
        self.images += labels.numel()
        self.support += torch.bincount(labels, minlength=len(self.support))

    def compute(self) -> dict[str, float | int | list[float | None]]:
        """Percentages; a class with no image in the evaluated set has per-class accuracy None, not 0."""
        if not self.images:
            raise ValueError("no images were evaluated: the evaluation split is empty")
        per_class = zip(self.per_class.compute().tolist(), self.support.tolist(), strict=True)
        return {
            "top1": 100 * self.top1.compute().item(),
            "top5": 100 * self.top5.compute().item(),
            "per_class": [round(100 * x, 4) if n else None for x, n in per_class],
            "images": self.images,
        }
