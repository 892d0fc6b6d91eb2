"""Test-session set-up: Triton kernels run in Triton's CPU interpreter, so the GPU scan is tested here too;
the tiny backbone weights and recipes that the training tests share.

Set before anything imports Triton's ``jit``: it decides at decoration time whether a kernel is compiled
for a GPU or interpreted. The compile tests build GPU kernels from the same functions explicitly.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("TRITON_INTERPRET", "1")  # torch and yaml do not import Triton; adaptor_peft may


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Weights of the tiny backbone, standing in for a pretrained checkpoint."""
    from adaptor_peft import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save({"model": create_model("vim_tiny_patch16_224", depth=2, img_size=32).state_dict()}, path)
    return path


@pytest.fixture
def recipes(tmp_path, monkeypatch) -> Path:
    """A recipes folder with the real defaults and tiny 3-class cifar / dtd recipes."""
    folder = tmp_path / "recipes"
    shutil.copytree(Path(__file__).resolve().parents[1] / "recipes", folder)
    for task in ("cifar", "dtd"):
        recipe = yaml.safe_load((folder / "vtab1k" / f"{task}.yaml").read_text())
        recipe["num_classes"] = 3
        (folder / "vtab1k" / f"{task}.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setenv("ADAPTOR_PEFT_RECIPES", str(folder))
    return folder


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """Keep ``datasets`` off the network and its cache inside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
