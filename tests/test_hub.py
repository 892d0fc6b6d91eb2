"""Adapters on the Hugging Face hub, offline: pushes go to a stand-in for huggingface_hub's upload calls,
loads read a local folder laid out as the hub cache (HF_HUB_OFFLINE, HF_HUB_CACHE in tmp_path)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import constants

import adaptor_peft as ap
from tests.support.models import images_for, logits, perturb, tiny

REPO = "someone/vim-digits"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, with every hub call offline."""
    cache = tmp_path / "hub"
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads both when imported
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Puts ``files`` in the hub cache as a download of ``repo_id``'s main branch leaves them."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(b"".join(files.values())).hexdigest()
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name, data in files.items():
        (repo / "snapshots" / commit / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def trained(kind: str = "vim", seed: int = 0) -> torch.nn.Module:
    model = ap.prepare_model(tiny(kind), "adaptor")
    torch.manual_seed(seed)
    perturb(model, ".adaptor_")
    return model


@pytest.fixture
def pushes(monkeypatch) -> list[dict]:
    """Records what save_adaptor sends to the hub instead of sending it."""
    calls: list[dict] = []
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append({"repo": repo_id, **kw})
    )

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        files = {}
        for op in operations:
            data = op.path_or_fileobj
            files[op.path_in_repo] = data if isinstance(data, bytes) else Path(data).read_bytes()
        calls.append({"commit": repo_id, "files": files, "message": commit_message})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    return calls


@pytest.mark.parametrize("kind, base_model", [("vim", "hustvl/Vim-tiny-midclstok"), ("vmamba_v2", None)])
def test_push_uploads_the_adapter_with_a_model_card(tmp_path, pushes, kind, base_model):
    model = trained(kind)
    folder = ap.save_adaptor(model, tmp_path / "adapter", push_to_hub=REPO)
    assert sorted(p.name for p in folder.iterdir()) == ["adaptor.safetensors", "adaptor_config.json"]
    create, commit = pushes
    assert create == {"repo": REPO, "exist_ok": True} and commit["commit"] == REPO
    files = commit["files"]
    assert sorted(files) == ["README.md", "adaptor.safetensors", "adaptor_config.json"]
    assert all(files[p.name] == p.read_bytes() for p in folder.iterdir())
    card = files["README.md"].decode()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "adaptor-peft" and meta.get("base_model") == base_model
    assert {"adaptor-peft", "mamba-adaptor", "adaptor"} <= set(meta["tags"])
    assert ap.parameter_report(model).to_markdown() in body
    assert f'load_adaptor(model, "{REPO}")' in body and model.pretrained_cfg["architecture"] in body


def test_an_adapter_pushed_to_the_hub_loads_by_its_repo_id(tmp_path, pushes, hub_cache):
    model = trained()
    ap.save_adaptor(model, tmp_path / "adapter", push_to_hub=REPO)
    cache_repo(hub_cache, REPO, pushes[1]["files"])
    loaded = ap.load_adaptor(tiny("vim"), REPO)
    torch.testing.assert_close(logits(loaded, images_for("vim")), logits(model, images_for("vim")), rtol=0, atol=0)


def test_a_local_folder_wins_over_a_repo_id(tmp_path, pushes, hub_cache, monkeypatch):
    ap.save_adaptor(trained(seed=1), tmp_path / "adapter", push_to_hub=REPO)
    cache_repo(hub_cache, REPO, pushes[1]["files"])
    monkeypatch.chdir(tmp_path)
    local = trained(seed=2)
    ap.save_adaptor(local, REPO)  # the folder someone/vim-digits under the working directory
    loaded = ap.load_adaptor(tiny("vim"), REPO)
    torch.testing.assert_close(logits(loaded, images_for("vim")), logits(local, images_for("vim")), rtol=0, atol=0)


def test_a_repo_that_is_neither_local_nor_on_the_hub_is_named(hub_cache):
    with pytest.raises(ap.AdapterFileError, match="no adapter at someone/missing: no such folder, nor a readable hub"):
        ap.load_adaptor(tiny("vim"), "someone/missing")
