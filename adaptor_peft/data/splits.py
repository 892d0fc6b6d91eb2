"""Labelled image splits from every layout the PEFT benchmarks ship in, behind one ``load_split``.

Each kind turns a recipe's ``data`` entry into a :class:`LabelledImages`: where every image comes from
(a file, or a row of a ``datasets.Dataset``), its integer label, and an opener that decodes it. Errors are
:class:`DataError` and name the list file and line, json key, row, column or option to fix, because a
benchmark run that dies on image 7,312 of 8,000 with a bare ``OSError`` costs an afternoon.

Hugging Face ``datasets`` is imported only by the ``hub`` and ``parquet`` kinds, when they read a split:
the package, its CLI and the benchmarks run on machines without it (a lent GPU box, an offline install).
"""

from __future__ import annotations

import glob
import io
import json
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from . import synthetic

if TYPE_CHECKING:
    import datasets

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FGVC_SPLITS = ("train", "val", "test", "trainval")
# What Pillow raises on unreadable files: truncated or unidentified data (OSError), broken headers
# (SyntaxError, ValueError), images too large to be safe (DecompressionBombError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_TO_TENSOR = T.ToTensor()


class DataError(ValueError):
    """A data set that cannot be read as asked; the message names the file, line, key, row, column or option."""


class _FileOpener:
    """Opens image ``i`` of a list of paths (a class, not a closure, so DataLoader workers can pickle it)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __call__(self, key: int) -> Image.Image:
        return Image.open(self.paths[key])


class _RowOpener:
    """Opens the image in row ``i`` of a ``datasets.Dataset`` column: an undecoded ``{"bytes", "path"}`` dict,
    raw bytes, or an already decoded PIL image."""

    def __init__(self, rows: datasets.Dataset, column: str) -> None:
        self.rows, self.column = rows, column

    def __call__(self, key: int) -> Image.Image:
        value = self.rows[key][self.column]
        if isinstance(value, Image.Image):
            return value.copy()
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes):
            return Image.open(io.BytesIO(value))
        if isinstance(value, str):
            return Image.open(value)
        raise ValueError(f"column {self.column!r} holds {type(value).__name__}, not an image")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL image; palette images with transparency go through RGBA as Pillow asks."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


class LabelledImages(Dataset):
    """``(image_tensor, label)`` pairs, decoded on access and converted to RGB.

    ``labels`` holds the integer labels, ``refs`` where each image comes from (used in messages),
    ``num_classes`` the known class count (or max label + 1), and ``skipped`` the ``(file_or_row, reason)``
    entries dropped by ``skip_bad_images`` so a run report can count them. Without a transform an image
    becomes a float tensor in [0, 1].
    """

    def __init__(
        self,
        name: str,
        refs: Sequence[str],
        labels: Sequence[int],
        open_image: Callable[[int], Image.Image],
        *,
        num_classes: int | None = None,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        self.name = name
        self.refs = list(refs)
        self.labels = [int(label) for label in labels]
        self.num_classes = num_classes if num_classes is not None else max(self.labels, default=-1) + 1
        self.transform = transform
        self.skipped: list[tuple[str, str]] = []
        self._open = open_image
        self._keys = list(range(len(self.refs)))

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            image = self._decode(index)
        except _DECODE_ERRORS as error:
            raise DataError(
                f"cannot decode {self.refs[index]}: {error}; fix or remove the image, or set skip_bad_images "
                "to drop unreadable images when the split is built"
            ) from error
        return (self.transform or _TO_TENSOR)(image), self.labels[index]

    def _decode(self, index: int) -> Image.Image:
        image = self._open(self._keys[index])
        try:
            return _to_rgb(image)
        finally:
            image.close()

    def drop_unreadable(self) -> None:
        """Decode every image once and drop the ones that fail, recording them in ``skipped``."""
        keep = []
        for index in range(len(self)):
            try:
                self._decode(index)
                keep.append(index)
            except _DECODE_ERRORS as error:
                self.skipped.append((self.refs[index], f"cannot decode: {error}"))
        self.refs = [self.refs[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        self._keys = [self._keys[i] for i in keep]

    def check_labels(self, num_classes: int) -> None:
        """Raise :class:`DataError` naming the first image whose label does not fit a head of ``num_classes``."""
        for ref, label in zip(self.refs, self.labels, strict=True):
            if not 0 <= label < num_classes:
                raise DataError(
                    f"{ref} has label {label}, outside the classifier head's {num_classes} classes "
                    f"(0..{num_classes - 1}): set num_classes in the recipe to match the data, or fix the label"
                )

    def describe(self) -> str:
        """One line for logs and run reports: name, size, classes, and how many images were skipped."""
        text = f"{self.name}: {len(self)} images, {self.num_classes} classes"
        return text + (f", {len(self.skipped)} skipped" if self.skipped else "")


def load_split(
    source: Mapping[str, Any],
    split: str,
    *,
    root: str | Path | None = None,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    skip_bad_images: bool = False,
) -> LabelledImages:
    """One labelled split of the data set a recipe's ``data`` entry describes.

    ``source["kind"]`` picks the layout:

    - ``"vtab1k"`` (``dir``): NOAH / RepAdapter folder with ``<split>.txt`` list files, one
      ``relative/path.jpg <int label>`` a line, paths relative to the folder.
    - ``"fgvc"`` (``dir``, ``image_dir``): VPT ``train.json`` / ``val.json`` / ``test.json`` mapping image
      path (relative to ``dir/image_dir``) to class id; ``trainval`` is train and val together. Class ids are
      mapped to 0..n-1 in sorted order over all three files, as VPT does (NABirds' ids are not contiguous).
    - ``"folder"`` (``dir``): ``dir/<split>/<class name>/*.jpg``; class ids are the sorted class names
      found under all splits, so they agree between splits.
    - ``"hub"`` (``id``, ``config``, ``splits``, ``image_column``, ``label_column``): ``datasets.load_dataset(
      id, config, split=splits[split])``; ``id`` may be a local folder. Optional ``subsample: {split: n}``
      keeps ``n`` rows drawn at random with ``subsample_seed`` (default 0), for class-sorted sets where a
      slice such as ``train[:1000]`` would hold a few classes only.
    - ``"parquet"`` (``files: {split: glob or list of globs}``, columns as for hub, ``subsample`` too).
    - ``"sklearn_digits"`` (``train_per_class``, default 50; ``seed``, default 0): scikit-learn's 1,797
      8x8 handwritten digits, which ship inside the package (no download); per class, the first
      ``train_per_class`` images of a seeded shuffle are ``train``, the rest ``test``.
    - ``"synthetic"`` (``task``, ``sizes: {train800, val200, test}``, ``seed``, default 0): a task of the
      offline transfer suite (:mod:`adaptor_peft.data.synthetic`), generated in memory; ``train800val200``
      joins the first two splits.

    A relative ``dir``, ``id`` folder or glob is resolved against ``root`` (the ``--data-root``). Missing
    image files are found here by a stat of each file; with ``skip_bad_images`` they, and images that fail
    to decode (every image is decoded once here), are dropped and listed in ``skipped`` instead of raising.
    """
    kind = source.get("kind")
    if kind not in _BUILDERS:
        raise DataError(f"unknown data kind {kind!r} in the recipe's data entry; kinds: {', '.join(_BUILDERS)}")
    base = Path(root).expanduser() if root is not None else Path.cwd()
    dataset = _BUILDERS[kind](source, split, base, skip_bad_images)
    if not len(dataset) and not dataset.skipped:
        raise DataError(f"{dataset.name} holds no images")
    dataset.transform = transform
    if skip_bad_images:
        dataset.drop_unreadable()
        if not len(dataset):
            raise DataError(f"{dataset.name}: every image was dropped as unreadable ({len(dataset.skipped)})")
    return dataset


def _option(source: Mapping[str, Any], key: str) -> Any:
    if source.get(key) is None:
        raise DataError(f"the {source['kind']} data entry needs option {key!r}; it has {sorted(source)}")
    return source[key]


def _resolve(root: Path, path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else root / path


def _folder(source: Mapping[str, Any], root: Path) -> Path:
    folder = _resolve(root, _option(source, "dir"))
    if not folder.is_dir():
        raise DataError(
            f"{source['kind']} data folder {folder} not found: point --data-root (now {root}) at the folder "
            f"that holds {source['dir']!r}, or fix the data entry's 'dir' option"
        )
    return folder


def _from_files(
    name: str, entries: Sequence[tuple[str, Path, int]], skip_bad_images: bool, num_classes: int | None = None
) -> LabelledImages:
    """A split of image files from ``(ref, path, label)`` entries; missing files raise or are skipped."""
    kept, skipped = [], []
    for ref, path, label in entries:
        if path.is_file():
            kept.append((ref, path, label))
        elif skip_bad_images:
            skipped.append((ref, f"missing file {path}"))
        else:
            raise DataError(
                f"{ref}: image file {path} not found; check --data-root and the data entry's 'dir', "
                "or set skip_bad_images to drop missing images"
            )
    refs, paths, labels = zip(*kept, strict=True) if kept else ((), (), ())
    dataset = LabelledImages(name, refs, labels, _FileOpener(paths), num_classes=num_classes)
    dataset.skipped.extend(skipped)
    return dataset


def _vtab1k(source: Mapping[str, Any], split: str, root: Path, skip_bad_images: bool) -> LabelledImages:
    folder = _folder(source, root)
    list_file = folder / f"{split}.txt"
    if not list_file.is_file():
        stems = sorted(path.stem for path in folder.glob("*.txt"))
        raise DataError(f"vtab1k list file {list_file} not found: split {split!r} is not one of {stems}")
    entries = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2:
            raise DataError(f"{list_file} line {number}: expected '<relative/path.jpg> <int label>', got {line!r}")
        relative, label = fields
        try:
            label = int(label)
        except ValueError:
            raise DataError(f"{list_file} line {number}: label {label!r} is not an integer ({line!r})") from None
        entries.append((f"{list_file} line {number} ({relative})", folder / relative, label))
    return _from_files(f"vtab1k {folder.name}/{split}", entries, skip_bad_images)


def _read_fgvc_json(path: Path) -> dict[str, int]:
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid json: {error}") from None
    if not isinstance(mapping, dict):
        raise DataError(f"{path} must map image path to class id, but holds a {type(mapping).__name__}")
    for key, label in mapping.items():
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataError(f"{path} key {key!r}: class id {label!r} is not an integer")
    return mapping


def _fgvc(source: Mapping[str, Any], split: str, root: Path, skip_bad_images: bool) -> LabelledImages:
    folder = _folder(source, root)
    if split not in FGVC_SPLITS:
        raise DataError(f"fgvc split {split!r} is not one of {list(FGVC_SPLITS)}")
    parts = ("train", "val") if split == "trainval" else (split,)
    for part in parts:
        if not (folder / f"{part}.json").is_file():
            raise DataError(f"fgvc split file {folder / f'{part}.json'} not found (VPT json layout expected)")
    present = [part for part in ("train", "val", "test") if (folder / f"{part}.json").is_file()]
    files = {part: _read_fgvc_json(folder / f"{part}.json") for part in present}
    class_ids = sorted({label for mapping in files.values() for label in mapping.values()})
    contiguous = {label: index for index, label in enumerate(class_ids)}
    image_dir = folder / source.get("image_dir", "")
    entries = [
        (f"{folder / f'{part}.json'} key {relative!r}", image_dir / relative, contiguous[label])
        for part in parts
        for relative, label in files[part].items()
    ]
    return _from_files(f"fgvc {folder.name}/{split}", entries, skip_bad_images, num_classes=len(class_ids))


def _image_folder(source: Mapping[str, Any], split: str, root: Path, skip_bad_images: bool) -> LabelledImages:
    folder = _folder(source, root)

    def subdirs(path: Path) -> list[Path]:
        return sorted(child for child in path.iterdir() if child.is_dir() and not child.name.startswith("."))

    split_dir = folder / split
    if not split_dir.is_dir():
        raise DataError(f"split folder {split_dir} not found; splits in {folder}: {[p.name for p in subdirs(folder)]}")
    classes = sorted({class_dir.name for split_path in subdirs(folder) for class_dir in subdirs(split_path)})
    ids = {name: index for index, name in enumerate(classes)}
    entries = [
        (str(path), path, ids[class_dir.name])
        for class_dir in subdirs(split_dir)
        for path in sorted(class_dir.iterdir())
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return _from_files(f"folder {folder.name}/{split}", entries, skip_bad_images, num_classes=len(classes))


def _import_datasets(kind: str) -> ModuleType:
    """The ``datasets`` package, imported on first use by the ``kind`` data kind that reads through it;
    a :class:`DataError` naming the package and the kind where it is not installed."""
    try:
        import datasets
    except ImportError as error:
        raise DataError(
            f"the {kind} data kind reads its splits with Hugging Face datasets, which is not installed "
            f"({error}): pip install datasets, or use a vtab1k, fgvc or folder data entry"
        ) from None
    return datasets


def _from_rows(name: str, rows: datasets.Dataset, source: Mapping[str, Any], split: str) -> LabelledImages:
    """A split of ``datasets`` rows; images stay undecoded until asked for, so errors name their row."""
    datasets = _import_datasets(source["kind"])
    image_column, label_column = source.get("image_column", "image"), source.get("label_column", "label")
    for option, column in (("image_column", image_column), ("label_column", label_column)):
        if column not in rows.column_names:
            raise DataError(f"{name} has no column {column!r} (option {option!r}); columns: {rows.column_names}")
    label_feature = rows.features[label_column]
    num_classes = label_feature.num_classes if isinstance(label_feature, datasets.ClassLabel) else None
    if isinstance(rows.features[image_column], datasets.Image):
        rows = rows.cast_column(image_column, datasets.Image(decode=False))
    row_ids = list(range(len(rows)))
    count = (source.get("subsample") or {}).get(split)
    if count is not None and count < len(rows):
        row_ids = sorted(random.Random(source.get("subsample_seed", 0)).sample(row_ids, count))
        rows = rows.select(row_ids)
    labels = []
    for row, label in zip(row_ids, rows[label_column], strict=True):
        if not isinstance(label, int):
            raise DataError(f"{name} row {row}: label {label!r} in column {label_column!r} is not an integer")
        labels.append(int(label))
    refs = [f"{name} row {row}" for row in row_ids]
    opener = _RowOpener(rows.select_columns([image_column]), image_column)
    return LabelledImages(name, refs, labels, opener, num_classes=num_classes)


def _hub(source: Mapping[str, Any], split: str, root: Path, skip_bad_images: bool) -> LabelledImages:
    ident, splits = _option(source, "id"), _option(source, "splits")
    if split not in splits:
        raise DataError(f"hub data entry {ident!r} has no split {split!r} in its 'splits' option: {sorted(splits)}")
    local = _resolve(root, ident)
    datasets = _import_datasets("hub")
    try:
        rows = datasets.load_dataset(str(local) if local.is_dir() else ident, source.get("config"), split=splits[split])
    except (OSError, ValueError) as error:
        raise DataError(
            f"cannot load hub data set {ident!r} (config {source.get('config')!r}, split {splits[split]!r}): {error}"
        ) from error
    return _from_rows(f"hub {ident} split {splits[split]!r}", rows, source, split)


def _parquet(source: Mapping[str, Any], split: str, root: Path, skip_bad_images: bool) -> LabelledImages:
    files = _option(source, "files")
    if split not in files:
        raise DataError(f"parquet data entry has no split {split!r} in its 'files' option: {sorted(files)}")
    patterns = [files[split]] if isinstance(files[split], str) else list(files[split])
    resolved = [str(_resolve(root, pattern)) for pattern in patterns]
    matched = sorted({path for pattern in resolved for path in glob.glob(pattern)})
    if not matched:
        raise DataError(
            f"parquet files {resolved} for split {split!r} match nothing: point --data-root (now {root}) at "
            f"their folder, or fix the data entry's files.{split} option"
        )
    rows = _import_datasets("parquet").load_dataset("parquet", data_files={split: matched}, split=split)
    return _from_rows(f"parquet {Path(patterns[0]).name} split {split!r}", rows, source, split)


class _ArrayOpener:
    """Opens image ``i`` of an (n, h, w) grayscale or (n, h, w, 3) RGB uint8 array as a PIL image (picklable,
    like _FileOpener)."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels

    def __call__(self, key: int) -> Image.Image:
        return Image.fromarray(self.pixels[key])


def _sklearn_digits(source: Mapping[str, Any], split: str, root: Path, skip_bad_images: bool) -> LabelledImages:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the sklearn_digits data kind needs scikit-learn: pip install scikit-learn") from None
    if split not in ("train", "test"):
        raise DataError(f"sklearn_digits has the splits 'train' and 'test', not {split!r}")
    digits = load_digits()
    per_class, taken = int(source.get("train_per_class", 50)), Counter()
    chosen = {"train": [], "test": []}
    for index in np.random.default_rng(source.get("seed", 0)).permutation(len(digits.target)):
        label = int(digits.target[index])
        chosen["train" if taken[label] < per_class else "test"].append(int(index))
        taken[label] += 1
    ids = sorted(chosen[split])
    pixels = np.rint(digits.images[ids] * (255 / 16)).astype(np.uint8)
    refs = [f"scikit-learn digits image {i}" for i in ids]
    name, labels = f"scikit-learn digits {split}", digits.target[ids]
    return LabelledImages(name, refs, labels, _ArrayOpener(pixels), num_classes=10)


def _synthetic(source: Mapping[str, Any], split: str, root: Path, skip_bad_images: bool) -> LabelledImages:
    task, sizes = _option(source, "task"), _option(source, "sizes")
    parts = ("train800", "val200") if split == "train800val200" else (split,)
    for part in parts:
        if part not in sizes:
            raise DataError(f"synthetic task {task!r} has no size for split {part!r} in its 'sizes' option: {sizes}")
    try:
        drawn = [synthetic.generate(task, part, int(sizes[part]), int(source.get("seed", 0))) for part in parts]
    except ValueError as error:
        raise DataError(f"synthetic data entry {dict(source)}: {error}") from None
    pixels, labels = (np.concatenate(arrays) for arrays in zip(*drawn, strict=True))
    name = f"synthetic {task}/{split}"
    refs = [f"{name} image {i}" for i in range(len(labels))]
    return LabelledImages(name, refs, labels, _ArrayOpener(pixels), num_classes=synthetic.TASKS[task].num_classes)


_BUILDERS: dict[str, Callable[[Mapping[str, Any], str, Path, bool], LabelledImages]] = {
    "hub": _hub,
    "vtab1k": _vtab1k,
    "fgvc": _fgvc,
    "folder": _image_folder,
    "parquet": _parquet,
    "sklearn_digits": _sklearn_digits,
    "synthetic": _synthetic,
}
