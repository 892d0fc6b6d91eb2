"""Labelled splits in every layout, built from tiny images the tests draw themselves, and their errors."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from adaptor_peft import create_model
from adaptor_peft.data import DataError, build_transform, data_config, load_split
from tests.support.data import write_parquet

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
pytestmark = pytest.mark.usefixtures("offline_datasets")


def draw(path, colour=RED, mode="RGB", size=(12, 10)):
    """A constant-colour PNG in ``mode`` (PNG keeps the colour exact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path)
    return path


def png_bytes(colour=RED, mode="RGB"):
    buffer = io.BytesIO()
    Image.new("RGB", (9, 8), colour).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def vtab_root(tmp_path):
    """``vtab-1k/cifar`` in the NOAH layout: six images (one grayscale, one RGBA) and four list files."""
    root = tmp_path / "vtab-1k"
    images = [("0.png", RED, "RGB", 0), ("1.png", GREEN, "L", 1), ("2.png", BLUE, "RGBA", 2)]
    images += [("3.png", RED, "P", 0), ("sub dir/4.png", GREEN, "RGB", 1), ("5.png", BLUE, "RGB", 2)]
    for name, colour, mode, _ in images:
        draw(root / "cifar" / "images" / name, colour, mode)
    lines = [f"images/{name} {label}" for name, _, _, label in images]
    for stem, chosen in {
        "train800": lines[:4],
        "val200": lines[4:],
        "train800val200": lines,
        "test": lines[:3],
    }.items():
        (root / "cifar" / f"{stem}.txt").write_text("\n".join(chosen) + "\n")
    return root


def vtab(root, split="train800val200", **kwargs):
    return load_split({"kind": "vtab1k", "dir": "cifar"}, split, root=root, **kwargs)


def test_vtab1k_labels_rgb_and_shapes(vtab_root):
    split = vtab(vtab_root)
    assert len(split) == 6 and split.labels == [0, 1, 2, 0, 1, 2] and split.num_classes == 3
    assert "6 images, 3 classes" in split.describe() and split.skipped == []
    for index in range(6):
        image, label = split[index]
        assert image.shape == (3, 10, 12) and image.dtype == torch.float32 and label == split.labels[index]
    gray, _ = split[1]  # grayscale green: three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2]) and gray.max() > 0
    rgba, _ = split[2]
    assert torch.allclose(rgba[2], torch.ones(10, 12)) and rgba[:2].abs().max() == 0
    assert len(vtab(vtab_root, "train800")) == 4 and len(vtab(vtab_root, "test")) == 3

    split.transform = build_transform("vtab", True, 16, MEAN, STD)
    assert split[4][0].shape == (3, 16, 16)  # path with a space


def test_constant_colour_normalises_to_c_minus_mean_over_std(vtab_root):
    split = vtab(vtab_root, transform=build_transform("vtab", False, 8, MEAN, STD))
    image, _ = split[0]  # pure red
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(image, expected[:, None, None].expand(3, 8, 8), atol=1e-5)


def test_vtab_preset_deterministic_fgvc_train_random_eval_deterministic():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    vtab_train = build_transform("vtab", True, 16, MEAN, STD)
    assert torch.equal(vtab_train(noise), vtab_train(noise))
    fgvc_eval = build_transform("fgvc", False, 16, MEAN, STD)
    assert fgvc_eval(noise).shape == (3, 16, 16) and torch.equal(fgvc_eval(noise), fgvc_eval(noise))
    fgvc_train = build_transform("fgvc", True, 16, MEAN, STD)
    torch.manual_seed(0)
    outputs = [fgvc_train(noise) for _ in range(4)]
    assert outputs[0].shape == (3, 16, 16) and any(not torch.equal(outputs[0], out) for out in outputs[1:])


def test_build_transform_errors_list_the_choices():
    with pytest.raises(ValueError, match="presets: vtab, fgvc"):
        build_transform("imagenet", True, 16, MEAN, STD)
    with pytest.raises(ValueError, match="bicubic"):
        build_transform("vtab", True, 16, MEAN, STD, interpolation="cubic")


def test_data_config_reads_the_backbone_pretrained_cfg():
    config = data_config(create_model("vim_tiny_patch16_224", num_classes=3, depth=2))
    assert config == {"img_size": 224, "mean": MEAN, "std": STD, "interpolation": "bicubic"}
    transform = build_transform("fgvc", False, config["img_size"], config["mean"], config["std"])
    assert transform(Image.new("RGB", (20, 30), RED)).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="pretrained_cfg"):
        data_config(torch.nn.Linear(2, 2))


def test_fgvc_json_maps_class_ids_and_joins_train_val(tmp_path):
    folder = tmp_path / "nabirds"
    ids = {"train": {"a/0.png": 295, "b/1.png": 1010}, "val": {"a/2.png": 295}, "test": {"c/3.png": 400}}
    for part, mapping in ids.items():
        for name in mapping:
            draw(folder / "images" / name, GREEN)
        (folder / f"{part}.json").write_text(json.dumps(mapping))
    source = {"kind": "fgvc", "dir": "nabirds", "image_dir": "images"}
    trainval = load_split(source, "trainval", root=tmp_path)
    assert trainval.labels == [0, 2, 0] and trainval.num_classes == 3  # 295, 400, 1010 -> 0, 1, 2
    assert load_split(source, "test", root=tmp_path).labels == [1]
    assert load_split(source, "val", root=tmp_path)[0][0].shape == (3, 10, 12)
    with pytest.raises(DataError, match="'trainval'"):
        load_split(source, "validation", root=tmp_path)
    (folder / "test.json").write_text(json.dumps({"c/3.png": "four hundred"}))
    with pytest.raises(DataError, match=r"test\.json key 'c/3\.png'.*not an integer"):
        load_split(source, "test", root=tmp_path)


def test_image_folder_class_ids_agree_between_splits(tmp_path):
    for split, classes in {"train": ["daisy", "rose"], "test": ["daisy", "rose", "tulip"]}.items():
        for index, name in enumerate(classes):
            draw(tmp_path / "flowers" / split / name / f"{index}.png", BLUE)
    (tmp_path / "flowers" / "train" / "rose" / "notes.txt").write_text("not an image")
    source = {"kind": "folder", "dir": str(tmp_path / "flowers")}  # an absolute dir ignores root
    train, test = load_split(source, "train"), load_split(source, "test")
    assert train.labels == [0, 1] and test.labels == [0, 1, 2] and train.num_classes == test.num_classes == 3
    with pytest.raises(DataError, match=r"splits in .*\['test', 'train'\]"):
        load_split(source, "val")


def test_parquet_files_with_class_label(tmp_path):
    images = [png_bytes(RED), png_bytes(GREEN, "L"), png_bytes(BLUE, "RGBA")]
    write_parquet(tmp_path / "data" / "train-00000.parquet", images, [0, 1, 2], names=list("abcde"))
    source = {"kind": "parquet", "files": {"train": "data/train-*.parquet"}}
    split = load_split(source, "train", root=tmp_path)
    assert split.labels == [0, 1, 2] and split.num_classes == 5  # from the ClassLabel, not max + 1
    assert [tuple(split[i][0].shape) for i in range(3)] == [(3, 8, 9)] * 3
    with pytest.raises(DataError, match=r"match nothing.*--data-root"):
        load_split({"kind": "parquet", "files": {"train": "elsewhere/*.parquet"}}, "train", root=tmp_path)
    with pytest.raises(DataError, match="no split 'test'"):
        load_split(source, "test", root=tmp_path)


@pytest.fixture
def hub_dir(tmp_path):
    """A local copy of a hub data set: ``data/{train,test}-*.parquet`` with cifar-like column names."""
    data, columns = tmp_path / "hubset" / "data", {"image_column": "img", "label_column": "fine_label"}
    train_images = [png_bytes(colour) for colour in (RED, GREEN, BLUE, RED, GREEN, BLUE)]
    write_parquet(data / "train-00000-of-00001.parquet", train_images, [0, 1, 2, 0, 1, 2], **columns)
    write_parquet(data / "test-00000-of-00001.parquet", [png_bytes(RED), b"not a png"], [0, 1], **columns)
    return tmp_path


HUB = {
    "kind": "hub",
    "id": "hubset",
    "config": None,
    "splits": {"train800val200": "train", "test": "test"},
    "image_column": "img",
    "label_column": "fine_label",
}


def test_hub_local_directory_and_seeded_subsample(hub_dir):
    split = load_split(HUB, "train800val200", root=hub_dir, transform=build_transform("vtab", True, 8, MEAN, STD))
    assert split.labels == [0, 1, 2, 0, 1, 2] and split[1][0].shape == (3, 8, 8)
    sampled = load_split({**HUB, "subsample": {"train800val200": 3}}, "train800val200", root=hub_dir)
    again = load_split({**HUB, "subsample": {"train800val200": 3}}, "train800val200", root=hub_dir)
    assert len(sampled) == 3 and sampled.refs == again.refs and sampled.num_classes == 3
    rows = [int(ref.rsplit(" ", 1)[1]) for ref in sampled.refs]
    assert sampled.labels == [[0, 1, 2, 0, 1, 2][row] for row in rows]
    with pytest.raises(DataError, match=r"no split 'val200'.*\['test', 'train800val200'\]"):
        load_split(HUB, "val200", root=hub_dir)
    with pytest.raises(
        DataError, match=r"no column 'label' \(option 'label_column'\); columns: \['img', 'fine_label'\]"
    ):
        load_split({**HUB, "label_column": "label"}, "test", root=hub_dir)
    with pytest.raises(DataError, match="cannot load hub data set 'hubset'"):
        load_split({**HUB, "splits": {"test": "validation"}}, "test", root=hub_dir)


def test_corrupt_hub_row_names_the_row_or_is_skipped(hub_dir):
    test = load_split(HUB, "test", root=hub_dir)
    assert test[0][1] == 0
    with pytest.raises(DataError, match=r"hub hubset split 'test' row 1"):
        test[1]
    kept = load_split(HUB, "test", root=hub_dir, skip_bad_images=True)
    assert len(kept) == 1 and kept.skipped[0][0].endswith("row 1") and "1 skipped" in kept.describe()


def test_splits_pickle_for_dataloader_workers(vtab_root, hub_dir):
    for split in (vtab(vtab_root), load_split(HUB, "test", root=hub_dir)):
        copy = pickle.loads(pickle.dumps(split))
        assert torch.equal(copy[0][0], split[0][0])


def test_missing_image_names_file_and_line_or_is_skipped(vtab_root):
    (vtab_root / "cifar" / "images" / "5.png").unlink()
    with pytest.raises(DataError, match=r"train800val200\.txt line 6 \(images/5\.png\).*5\.png not found"):
        vtab(vtab_root)
    split = vtab(vtab_root, skip_bad_images=True)
    assert len(split) == 5 and split.skipped[0][0].endswith("line 6 (images/5.png)")
    assert "missing file" in split.skipped[0][1]


def test_corrupt_image_names_file_and_line_or_is_skipped(vtab_root):
    (vtab_root / "cifar" / "images" / "2.png").write_bytes(b"\x89PNG but not really")
    split = vtab(vtab_root)
    with pytest.raises(DataError, match=r"cannot decode .*train800val200\.txt line 3 \(images/2\.png\)"):
        split[2]
    kept = vtab(vtab_root, skip_bad_images=True)
    assert len(kept) == 5 and kept.labels == [0, 1, 0, 1, 2] and len(kept.skipped) == 1
    assert "cannot decode" in kept.skipped[0][1] and "5 images, 3 classes, 1 skipped" in kept.describe()


@pytest.mark.parametrize(
    ("line", "message"),
    [("images/0.png zero", r"line 2: label 'zero' is not an integer"), ("images/0.png", r"line 2: expected")],
)
def test_bad_list_file_line(vtab_root, line, message):
    (vtab_root / "cifar" / "val200.txt").write_text(f"images/1.png 1\n{line}\n")
    with pytest.raises(DataError, match=r"val200\.txt " + message):
        vtab(vtab_root, "val200")


def test_check_labels_names_the_first_offending_image(vtab_root):
    split = vtab(vtab_root)
    split.check_labels(3)
    with pytest.raises(DataError, match=r"line 3 \(images/2\.png\) has label 2, outside .* 2 classes \(0\.\.1\)"):
        split.check_labels(2)


def test_unknown_kind_split_and_missing_folder(vtab_root):
    with pytest.raises(DataError, match=r"unknown data kind 'zip'.*hub, vtab1k, fgvc, folder, parquet"):
        load_split({"kind": "zip"}, "train")
    with pytest.raises(
        DataError, match=r"split 'train' is not one of \['test', 'train800', 'train800val200', 'val200'\]"
    ):
        vtab(vtab_root, "train")
    with pytest.raises(DataError, match=r"folder .*vtab-1k/cifar100 not found: point --data-root .* 'dir'"):
        load_split({"kind": "vtab1k", "dir": "cifar100"}, "test", root=vtab_root)
    with pytest.raises(DataError, match="needs option 'dir'"):
        load_split({"kind": "fgvc"}, "test", root=vtab_root)
    (vtab_root / "cifar" / "test.txt").write_text("\n")
    with pytest.raises(DataError, match="holds no images"):
        vtab(vtab_root, "test")


def test_sklearn_digits_split_per_class_without_download():
    train = load_split({"kind": "sklearn_digits", "train_per_class": 7, "seed": 1}, "train")
    test = load_split({"kind": "sklearn_digits", "train_per_class": 7, "seed": 1}, "test")
    assert len(train) == 70 and len(test) == 1797 - 70 and train.num_classes == 10
    assert sorted(train.labels) == sorted(list(range(10)) * 7)
    assert not set(train.refs) & set(test.refs)
    image, label = train[0]
    assert image.shape == (3, 8, 8) and torch.equal(image[0], image[1]) and image.max() <= 1  # grey as RGB
    assert label == train.labels[0]
    again = load_split({"kind": "sklearn_digits", "train_per_class": 7, "seed": 1}, "train")
    assert again.refs == train.refs
    with pytest.raises(DataError, match="splits 'train' and 'test'"):
        load_split({"kind": "sklearn_digits"}, "val")
