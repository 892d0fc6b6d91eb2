"""The ``adaptor-peft`` command line."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .adaptors import METHODS, prepare_model
from .models import create_model, list_models
from .ops import BACKENDS, native
from .ops.dispatch import BACKEND_ENV
from .reports import parameter_report


def _parts(model: torch.nn.Module) -> dict[str, int]:
    """Parameter count per top-level part, in the order the model registers them."""
    counts: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        counts[name.split(".")[0]] += p.numel()
    return dict(counts)


def info(args: argparse.Namespace) -> None:
    """Builds a backbone, prints its parameters by part and times one forward pass on random images."""
    if args.backend:
        os.environ[BACKEND_ENV] = args.backend
    model = create_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size).eval()
    size = args.img_size or model.pretrained_cfg["input_size"][-1]
    images = torch.randn(args.batch_size, 3, size, size)
    with torch.no_grad():
        model(images)  # first call builds the compiled scan if needed
        start = time.perf_counter()
        logits = model(images)
        elapsed = time.perf_counter() - start
    table = Table(title=f"{args.model} ({type(model).__name__})")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    total = sum(p.numel() for p in model.parameters())
    for part, count in _parts(model).items():
        table.add_row(part, f"{count:,}", f"{100 * count / total:.2f} %")
    table.add_row("total", f"{total:,}", "100.00 %", style="bold")
    console = Console()
    console.print(table)
    backend = os.environ.get(BACKEND_ENV) or ("native" if native.available() else "torch")
    console.print(
        f"forward: batch {args.batch_size} at {size}x{size} -> logits {tuple(logits.shape)} in "
        f"{elapsed * 1000:.0f} ms on {images.device} (scan: {backend}, {torch.get_num_threads()} threads)"
    )


def _options(text: str | None) -> dict:
    """Method options from ``--config``: a JSON file or an inline JSON object."""
    if not text:
        return {}
    is_file = os.path.isfile(text)
    source = f"--config file {text}" if is_file else "--config"
    try:
        options = json.loads(Path(text).read_text() if is_file else text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"adaptor-peft params: {source} is not valid JSON: {err}") from None
    if not isinstance(options, dict):
        raise SystemExit(f"adaptor-peft params: {source} must be a JSON object of method options")
    return options


def params(args: argparse.Namespace) -> None:
    """Prepares a backbone with a transfer method and prints what it trains."""
    model = create_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes)
    try:
        prepare_model(model, args.method, **_options(args.config))
    except (TypeError, ValueError) as err:
        raise SystemExit(f"adaptor-peft params: {err}") from None
    report = parameter_report(model)
    if args.format == "json":
        print(report.to_json())
    elif args.format == "markdown":
        print(report.to_markdown(), end="")
    else:
        Console().print(report)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adaptor-peft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("info", help="build a backbone, print its parameters and time a forward pass")
    p.add_argument("model", nargs="?", default="vim_small_patch16_224", choices=list_models(), metavar="MODEL")
    p.add_argument("--checkpoint", help="official .pth, plain state dict or .safetensors file")
    p.add_argument("--img-size", type=int)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--backend", choices=BACKENDS, help=f"selective scan backend (default: ${BACKEND_ENV} or auto)")
    p.set_defaults(run=info)
    p = commands.add_parser("params", help="prepare a backbone with a transfer method and report what it trains")
    p.add_argument("model", choices=list_models(), metavar="MODEL")
    p.add_argument("--method", default="adaptor", choices=list(METHODS))
    p.add_argument("--config", help="method options as a JSON object or JSON file (e.g. AdaptorConfig fields, LoRA r)")
    p.add_argument("--checkpoint", help="official .pth, plain state dict or .safetensors file")
    p.add_argument("--num-classes", type=int, help="head size (default: the backbone's)")
    p.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    p.set_defaults(run=params)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
