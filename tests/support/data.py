"""Parquet files in the hub's layout, for the data and training-layout tests."""

from __future__ import annotations

import datasets


def write_parquet(path, images, labels, image_column="image", label_column="label", names=None):
    label_feature = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    features = datasets.Features({image_column: datasets.Image(), label_column: label_feature})
    rows = {image_column: [{"bytes": data, "path": None} for data in images], label_column: labels}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
