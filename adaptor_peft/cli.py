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

from .adaptors import METHODS, AdapterFileError, prepare_model
from .data import DataError
from .data.synthetic import TASKS
from .demo import METHODS as METHODS_OF_DEMO
from .demo import run_demo
from .models import CheckpointError, create_model, list_models
from .ops import BACKENDS, native
from .ops.dispatch import BACKEND_ENV
from .reports import parameter_report, write_summary
from .reports.results import VTAB1K_TASKS
from .suite import DEFAULT_METHODS as DEFAULT_SUITE_METHODS
from .suite import LEARNING_RATES, SuiteError, calibrate, run_suite
from .suite import METHODS as SUITE_METHODS
from .training import RecipeError, TrainingError, evaluate_run, load_recipe, train
from .training.loop import train_once
from .training.recipe import list_recipes

USER_ERRORS = (RecipeError, DataError, TrainingError, AdapterFileError, CheckpointError, FileNotFoundError, SuiteError)
"""Errors caused by what the user asked for: reported as one message, without a traceback."""
PLAIN_PROGRESS = "one plain labelled line per epoch, not live progress lines (as when stdout is not a terminal)"
OTHER_VERSION = "reuse (read back or resume) runs that another code version trained; refused by default"


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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
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


def _recipe(args: argparse.Namespace, name: str) -> dict:
    """The recipe ``name`` with the command line's named options and ``key=value`` overrides applied."""
    recipe = load_recipe(name, args.overrides)
    for key, value in {"model": args.model, "method": args.method, "checkpoint": args.checkpoint}.items():
        if value is None:
            continue
        if any(override.split("=", 1)[0] == key for override in args.overrides):
            raise RecipeError(f"{key} is given both as --{key} and as {key}=...; give it once")
        recipe[key] = value  # taken as it is: a file name is not YAML
    return recipe


def train_command(args: argparse.Namespace) -> None:
    """Trains one recipe into a run folder (resuming it if it holds the same recipe)."""
    recipe, allow = _recipe(args, args.recipe), args.allow_other_version
    results = train(recipe, args.output_dir, args.data_root, progress=not args.no_progress, allow_other_version=allow)
    print(f"{results['task']}: top-1 {results['top1']:.2f} %, top-5 {results['top5']:.2f} % -> {args.output_dir}")


def eval_command(args: argparse.Namespace) -> None:
    """Evaluates a finished run's adapter on a fresh backbone."""
    results = evaluate_run(
        args.run_dir, args.data_root, args.split, checkpoint=args.checkpoint, progress=not args.no_progress
    )
    print(f"{results['task']} {results['eval_split']}: top-1 {results['top1']:.2f} %, top-5 {results['top5']:.2f} %")


def vtab_command(args: argparse.Namespace) -> None:
    """Runs the 19 VTAB-1k tasks in a row, one run folder each, skipping finished ones, then summarises."""
    failed, tasks = [], args.tasks.split(",") if args.tasks else VTAB1K_TASKS
    unknown = sorted(set(tasks) - set(VTAB1K_TASKS))
    if unknown:
        raise SystemExit(f"adaptor-peft vtab: unknown task(s) {unknown}; VTAB-1k has {', '.join(VTAB1K_TASKS)}")
    for task in tasks:
        try:
            recipe = _recipe(args, f"vtab1k/{task}")
            _, minutes = train_once(
                recipe,
                Path(args.output_dir) / task,
                args.data_root,
                progress=not args.no_progress,
                allow_other_version=args.allow_other_version,
            )
            if minutes is None:
                print(f"{task}: finished before, skipped")
        except USER_ERRORS as error:
            print(f"{task}: failed: {error}")
            failed.append(task)
    summarize_command(argparse.Namespace(runs_dir=args.output_dir))
    if failed:
        raise SystemExit(f"adaptor-peft vtab: {len(failed)} task(s) failed: {', '.join(failed)}")


def summarize_command(args: argparse.Namespace) -> None:
    """Writes summary.md / summary.json / summary.png for every finished run under a folder."""
    try:
        summary, files = write_summary(args.runs_dir)
    except ValueError as error:  # two runs for one cell of the table, or an unreadable results.json
        raise SystemExit(f"adaptor-peft summarize: {error}") from None
    print(summary.to_markdown())
    print("written: " + ", ".join(str(path) for path in files.values()))


def _workers_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=_positive,
        help="runs trained at once, each in its own process (default: one per CPU core, at most 8; 1 with a GPU)",
    )


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def demo_command(args: argparse.Namespace) -> None:
    """Transfers the embedded backbone to scikit-learn's digits with every method, offline."""
    methods = args.methods.split(",") if args.methods else METHODS_OF_DEMO
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"adaptor-peft demo: unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    run_demo(args.output_dir, methods, args.overrides, workers=args.workers, progress=not args.no_progress)


def suite_command(args: argparse.Namespace) -> None:
    """Runs the offline transfer suite's protocol (or its calibration), resuming what is there."""
    split = {key: getattr(args, key).split(",") for key in ("methods", "tasks") if getattr(args, key)}
    if args.methods == "all":
        split["methods"] = SUITE_METHODS
    common = dict(quick=args.quick, workers=args.workers, allow_other_version=args.allow_other_version, **split)
    if args.calibrate:
        calibrate(args.output_dir, overrides=args.overrides, **common)
    else:
        run_suite(
            args.output_dir,
            seeds=args.seeds,
            learning_rates=args.lrs,
            overrides=args.overrides,
            progress=not args.no_progress,
            **common,
        )


def _learning_rates(text: str) -> list[float]:
    """``--lrs``: comma-separated positive numbers."""
    try:
        rates = [float(lr) for lr in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(lr > 0 for lr in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: learning rates must be positive")
    return rates


def _training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=list_models(), metavar="MODEL", help="backbone (default: the recipe's)")
    p.add_argument("--checkpoint", help="backbone weights: file, https URL or 'pretrained' (default: the recipe's)")
    p.add_argument("--method", choices=list(METHODS), help="transfer method (default: the recipe's)")
    p.add_argument("--data-root", help="folder holding the recipe's local data layout (default: its hub copy)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--no-progress", action="store_true", help=PLAIN_PROGRESS)
    p.add_argument("--allow-other-version", action="store_true", help=OTHER_VERSION)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. epochs=1 lr=5e-4")


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
    p = commands.add_parser("train", help="train one recipe into a run folder (resumes an interrupted run)")
    p.add_argument("--recipe", required=True, help=f"a recipe name ({', '.join(list_recipes()[:3])}, ...) or YAML")
    _training_options(p)
    p.set_defaults(run=train_command)
    p = commands.add_parser("eval", help="evaluate a finished run's adapter on a fresh backbone")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data-root")
    p.add_argument("--split", help="split to evaluate (default: the recipe's eval split)")
    p.add_argument("--checkpoint", help="backbone weights, where they are now (default: the file the run records)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=eval_command)
    p = commands.add_parser("vtab", help="run all 19 VTAB-1k tasks, one run folder each under --output-dir")
    p.add_argument("--tasks", help="comma-separated subset of the tasks (default: all 19)")
    _training_options(p)
    p.set_defaults(run=vtab_command)
    p = commands.add_parser("demo", help="offline: transfer the embedded backbone to digits with every method")
    p.add_argument("--output-dir", default="adaptor-peft-demo")
    p.add_argument("--methods", help=f"comma-separated methods (default: {','.join(METHODS_OF_DEMO)})")
    _workers_option(p)
    p.add_argument("--no-progress", action="store_true", help=PLAIN_PROGRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. epochs=5")
    p.set_defaults(run=demo_command)
    p = commands.add_parser("suite", help="offline VTAB-1k-style suite: lr chosen on val200, 3 seeds on test, report")
    p.add_argument("--output-dir", default="runs/suite")
    p.add_argument("--methods", help=f"comma-separated methods or 'all' (default: {','.join(DEFAULT_SUITE_METHODS)})")
    p.add_argument("--tasks", help=f"comma-separated tasks (default: {','.join(TASKS)})")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the test runs (default: 3)")
    p.add_argument(
        "--lrs",
        type=_learning_rates,
        default=LEARNING_RATES,
        help=f"learning-rate grid (default: {','.join(f'{lr:g}' for lr in LEARNING_RATES)})",
    )
    p.add_argument("--quick", action="store_true", help="tiny splits and one epoch: a smoke test of the protocol")
    p.add_argument("--calibrate", action="store_true", help="only linear_probe and full at the recipe lr, on val200")
    p.add_argument("--allow-other-version", action="store_true", help=OTHER_VERSION)
    _workers_option(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every run")
    p.set_defaults(run=suite_command)
    p = commands.add_parser("summarize", help="results table (Markdown, JSON, PNG) of every run under a folder")
    p.add_argument("runs_dir", metavar="RUNS_DIR")
    p.set_defaults(run=summarize_command)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        raise SystemExit(f"adaptor-peft {args.command}: {type(error).__name__}: {error}") from None


if __name__ == "__main__":
    main()
