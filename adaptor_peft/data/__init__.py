"""Labelled image splits in every benchmark layout (VTAB-1k lists, VPT json, folders, parquet, the hub)."""

from .splits import DataError, LabelledImages, load_split
from .transforms import PRESETS, build_transform, data_config

__all__ = ["PRESETS", "DataError", "LabelledImages", "build_transform", "data_config", "load_split"]
