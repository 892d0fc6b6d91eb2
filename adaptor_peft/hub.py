"""Sharing an adapter: ``save_adaptor`` writes it and, if asked, pushes it to the Hugging Face hub with a
model card.

The card carries the parameter report, so this sits above both the adapter files
(:mod:`adaptor_peft.adaptors.files`) and the reports; loading from the hub needs no card and stays with
the files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .adaptors.files import CONFIG, WEIGHTS, write_adaptor
from .reports import parameter_report

CARD = "README.md"
HUB_URL = re.compile(r"https://huggingface\.co/([\w.-]+/[\w.-]+)/")


def model_card(model: nn.Module, config: dict[str, Any], repo_id: str) -> str:
    """The hub README of the adapter ``config`` of ``model`` in ``repo_id``: HF model-card front matter
    (library, base model where it is on the hub, tags), how to load it, its fingerprints and the
    parameter report."""
    hub = HUB_URL.match(getattr(model, "pretrained_cfg", {}).get("url") or "")
    front = {
        "library_name": "adaptor-peft",
        **({"base_model": hub.group(1), "base_model_relation": "adapter"} if hub else {}),
        "tags": ["adaptor-peft", "mamba-adaptor", "image-classification", config["method"]],
    }
    fingerprints = "\n".join(f"- {dtype}: `{digest}`" for dtype, digest in config["backbone_fingerprints"].items())
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# {config['method']} adapter for {config['base_model']}\n\n"
        f"An adaptor_peft adapter: method `{config['method']}` with "
        f"options `{json.dumps(config['options'])}`, {config['num_classes']} classes, on the backbone "
        f"`{config['base_model']}`{f' ({hub.group(1)})' if hub else ''}. It holds only the trained weights "
        f"({config['parameters']:,} values).\n\n"
        "```python\nimport adaptor_peft\n\n"
        f'model = adaptor_peft.create_model("{config["base_model"]}", checkpoint=...)  # its backbone\n'
        f'adaptor_peft.load_adaptor(model, "{repo_id}")\n```\n\n'
        "`load_adaptor` refuses other backbone weights: the frozen weights must have these fingerprints "
        f"(SHA-256 per dtype; a copy cast to bfloat16 or float16 matches too):\n\n{fingerprints}\n\n"
        f"## Parameters\n\n{parameter_report(model).to_markdown()}"
    )


def _push(directory: Path, repo_id: str, card: str, method: str) -> None:
    """Uploads the adapter files and ``card`` (as README.md) to the hub model repo ``repo_id`` in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    files = [CommitOperationAdd(name, str(directory / name)) for name in (WEIGHTS, CONFIG)]
    api.create_commit(
        repo_id, [*files, CommitOperationAdd(CARD, card.encode())], commit_message=f"adaptor-peft {method} adapter"
    )


def save_adaptor(model: nn.Module, directory: str | Path, push_to_hub: str | None = None) -> Path:
    """Writes the adapter of a model prepared with :func:`~adaptor_peft.prepare_model` (or
    :func:`~adaptor_peft.inject_adaptor`) to ``directory`` and returns it. ``push_to_hub="user/name"`` then
    uploads it to that hub model repo (created if needed) with a model card as its README.md, replacing the
    repo's files of those names."""
    config = write_adaptor(model, directory)
    if push_to_hub is not None:
        _push(Path(directory), push_to_hub, model_card(model, config, push_to_hub), config["method"])
    return Path(directory)
