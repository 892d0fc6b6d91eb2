"""The evidence rerun: every table the README's method comparisons rest on, regenerated at one commit by
one resumable command, with the wall time it took (summed over interruptions) against its budget.

Stages, in order; each is resumable on its own (finished runs are read back, not retrained), and a stage
that finished is skipped when the command runs again:

- ``study``: every method's rate multiplier (and LoRA's placement) chosen on the design tasks' val200 with
  the same budget, each variant at the suite's three learning rates (extended one step at an edge) and two
  training seeds (``benchmarks/ablation.py --choose``, which writes ``recipes/offline_vtab/_tuned.yaml``);
- ``suite``: the offline suite with those options, all twelve tasks, the adaptor against the best LoRA,
  the parallel adapter and (as the booster) full fine-tuning (``adaptor-peft suite``); the study's runs of
  each chosen variant are the suite's selection runs on the design tasks, so they are shared, not
  trained again (:func:`share_study_runs`); then the runs are archived and ``suite_timing.md`` is read
  from them (``benchmarks/suite_timing.py``);
- ``backbone``: the backbone-usage comparison (``benchmarks/backbone_usage.py``);
- ``shipped``: ``vim_nano_patch4_32_adaptor`` pretrained again with its model card's recipe, and the
  demo's rows on it beside the default backbone's.

``OUT/ledger.json`` keeps each stage's wall seconds (added every minute while it runs, and when it stops)
and whether it finished, with the code version that ran it: a checkout of another version refuses to add
to it. ``benchmarks/results/evidence.md`` gets the commit, date, machine, command, and the hours per
stage against :data:`BUDGET_HOURS`.

The rerun outlasts a working session, and a fresh checkout holds only what was committed. ``--archive``
writes every finished run (the few small files that read it back, not its weights), the pretrained
backbones (:data:`BACKBONES`) and the ledger into :data:`ARCHIVE`, to be committed; a rerun first
restores from there what its output folder lacks, so that it goes on where the archive left it. The
archive is also the tables' raw data, one JSON line per run.
Usage:

    python benchmarks/evidence.py [--stages study,suite,backbone,shipped] [--output-dir runs/evidence]
        [--dry-run | --archive]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptor_peft.atomic import write_atomically
from adaptor_peft.provenance import code_version, describe_machine
from adaptor_peft.suite import SELECTION_SEEDS, selection_runs
from adaptor_peft.training.pool import stopped_by_sigterm
from adaptor_peft.training.runs import CHECKPOINTS, CONFIG, LOG, RESOLVED, as_recorded, read_config
from adaptor_peft.training.runs import RESULTS as RUN_RESULTS
from benchmarks.machine import provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HEARTBEAT_SECONDS = 60.0
"""How often a running stage's wall time is added to the ledger."""
STOP_SECONDS = 60.0
"""How long a stopped step's process group may take to wind down before it is killed."""
BUDGET_HOURS = 6.0
"""The most wall time the whole rerun may take on a 2-core machine."""
MULTIPLIERS = (1, 4, 16)
"""The rate multipliers (``lr_scale``) every method with zero-initialised parameters is tried at."""
STUDY = {
    "lora": (
        "lora r=8,lora lr_scale=4,lora lr_scale=16,lora_x_proj,lora_x_proj lr_scale=4,lora_x_proj lr_scale=16,"
        "lora_p_x,lora_p_x lr_scale=4,lora_p_x lr_scale=16",
        "ablation_lora.md",
    ),
    "parallel_adapter": ("rank=32,rank=32 lr_scale=4,rank=32 lr_scale=16", "ablation_parallel_adapter.md"),
    "adaptor": ("lr_scale=1,lr_scale=4,lr_scale=16", "adaptor_ablation.md"),
}
"""Family -> (its variants, its table): every method at each of :data:`MULTIPLIERS`, LoRA in its three
placements (``in_proj``, MambaPEFT's ``x_proj`` and LoRA_p(X)); the same budget for each method."""
SUITE_METHODS = "linear_probe,lora,lora_x_proj,lora_p_x,parallel_adapter,adaptor,adaptor_booster,full"
DEMO_METHODS = "linear_probe,bias,lora,full"
DEMO_RUNS = {"Default backbone": "demo-plain", "With built-in adaptors": "demo-adaptor"}
"""The shipped stage's two demo folders, by the backbone they transfer from."""
SHIPPED_RECIPE = ("--classes", "100", "--per-class", "100", "--epochs", "15", "--batch-size", "128", "--lr", "0.002")
"""``vim_nano_patch4_32_adaptor``'s pretraining, as the default backbone's model card gives it, seed 0."""

ARCHIVE = RESULTS / "evidence_runs"
"""The committed archive: ``<stage folder>.jsonl`` (one finished run per line) and ``ledger.json``."""
RUN_FILES = (CONFIG, RESOLVED, RUN_RESULTS, LOG)
"""What reads a finished run back (recipe, code version, results, training minutes): its weights are left
out, so a restored run can be reported but not evaluated again."""
OUTPUT_DIR = "<evidence output dir>"
"""What the archive writes for the output folder's absolute path (a transfer run records its backbone
file's), and a restore writes back as the restoring folder's: the rerun goes on from any checkout path."""
LEDGER = "ledger.json"
BACKBONES = ("backbone/pretrain/*.safetensors", "shipped/*.safetensors")
"""The pretrained backbones under the output folder, archived whole (about 3 MB each) with their model
cards (``.md`` beside them): transfer runs are trained from them and the reports read their pretraining
records, and a pretraining run again on another machine would not give the same bits."""

Step = list[str] | partial
"""A command line, or a function run in this process (the writing of a table from finished runs)."""


def plan(output_dir: Path) -> dict[str, list[Step]]:
    """Stage -> its steps, in order."""
    python, cli = sys.executable, [sys.executable, "-m", "adaptor_peft.cli"]
    common = ["--seeds", "42,43", "--lrs", "0.001,0.003,0.01", "--choose"]  # the suite's grid, extended alike
    study: list[Step] = []
    for family, (variants, table) in STUDY.items():
        folders = ["--output-dir", str(output_dir / f"study-{family}"), "--output", str(RESULTS / table)]
        study.append([python, "benchmarks/ablation.py", "--family", family, "--variants", variants, *common, *folders])
    suite_dir, shipped_dir = output_dir / "suite", output_dir / "shipped"
    backbone = ["--output-dir", str(output_dir / "backbone"), "--output", str(RESULTS / "backbone_usage.md")]
    weights = shipped_dir / "vim_nano_patch4_32_adaptor.safetensors"
    pretrain = [python, "examples/pretrain_tiny.py", *SHIPPED_RECIPE, "--seed", "0", "--adaptor"]
    demo = [*cli, "demo", "--methods", DEMO_METHODS, "--no-progress", "--output-dir"]
    plain_demo, adaptor_demo = (shipped_dir / folder for folder in DEMO_RUNS.values())
    return {
        "study": study,
        "suite": [
            partial(share_study_runs, output_dir),
            [*cli, "suite", "--methods", SUITE_METHODS, "--output-dir", str(suite_dir), "--no-progress"],
            partial(copy_reports, suite_dir, ("suite.md", "suite.json", "suite.png"), output_dir, "suite"),
            partial(archive, output_dir, ARCHIVE),
            [python, "benchmarks/suite_timing.py"],
        ],
        "backbone": [[python, "benchmarks/backbone_usage.py", *backbone]],
        "shipped": [
            partial(run_unless_made, [*pretrain, "--output", str(weights)], weights),
            [*demo, str(plain_demo)],
            [*demo, str(adaptor_demo), "model=vim_nano_patch4_32_adaptor", f"checkpoint={weights}"],
            partial(write_demo_rows, shipped_dir, weights),
        ],
    }


def shown(step: Step) -> str:
    """A step as the log and ``--dry-run`` print it."""
    return f"{step.func.__name__} (in this process)" if isinstance(step, partial) else shlex.join(step)


def share_study_runs(output_dir: Path) -> int:
    """Copies each finished study run into the suite's selection folder that would train the same recipe
    (weights and results; not its checkpoints), where that folder does not exist yet: the study's runs of
    each chosen variant on the design tasks are runs the suite needs, at the same rates and seeds. Returns
    the number shared."""
    shared = 0
    for results in sorted(output_dir.glob(f"study-*/select/**/{RUN_RESULTS}")):
        run = results.parent
        recorded = as_recorded(read_config(run))
        for index in range(SELECTION_SEEDS):
            [(_, folder, recipe)] = selection_runs(
                output_dir / "suite", recorded["task"], recorded["method"], [recorded["lr"]], seed_index=index
            )
            if as_recorded(recipe) == recorded and not folder.exists():  # the comparison the suite's read-back makes
                shutil.copytree(run, folder, ignore=shutil.ignore_patterns(CHECKPOINTS, "tensorboard"))
                shared += 1
    print(f"{shared} study runs shared with the suite", flush=True)
    return shared


def run_unless_made(command: list[str], made: Path) -> None:
    """Runs ``command`` unless its output ``made`` exists: a stage run again, after a later step of it failed
    or was stopped, keeps what it made (a pretraining otherwise starts again and replaces its weights)."""
    if made.exists():
        print(f"{made} exists: not made again", flush=True)
        return
    run_command(command)


def run_command(command: list[str]) -> None:
    """Runs ``command`` in the checkout's root with the checkout's package first on the path (a script
    under ``examples/`` would otherwise import whatever package is installed, perhaps another checkout's),
    in a process group of its own that is stopped whole when this process stops: a pretraining or pool
    worker it started must not train on as an orphan, racing the resumed rerun for the same files."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    try:
        code = process.wait()
    except BaseException:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        raise
    if code:
        raise subprocess.CalledProcessError(code, command)


def copy_file(source: Path, target: Path) -> None:
    """Writes ``source``'s bytes to ``target`` (by temp file and rename), making its folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, source.read_bytes())


def copy_reports(folder: Path, names: tuple[str, ...], output_dir: Path, stage: str) -> None:
    """Copies a stage's finished report files into ``benchmarks/results/``. A Markdown report made by the
    package (which knows no commit or machine) gets, under its title, the rerun's command, date, commit,
    code version and machine, and the machines that trained the stage's runs, from the ledger."""
    ledger = json.loads((output_dir / LEDGER).read_text()) if (output_dir / LEDGER).is_file() else {}
    entry = ledger.get("stages", {}).get(stage)
    made_on = f" Its runs were trained on: {by_machine(entry)} (hours)." if entry else ""
    for name in names:
        if name.endswith(".md"):
            title, _, rest = (folder / name).read_text().partition("\n")
            write_atomically(RESULTS / name, f"{title}\n\n{provenance()}.{made_on}\n{rest}")
        else:
            copy_file(folder / name, RESULTS / name)


def write_demo_rows(shipped_dir: Path, weights: Path) -> None:
    """``demo_builtin_adaptor.md``: the demo's rows on the default backbone and on the adaptor backbone; and
    the weights' model card gets its "## Transfer" section (:func:`transfer_section`)."""
    parts = [
        "# The demo's transfer from the two embedded backbones, side by side",
        "",
        provenance(),
        "",
        f"The adaptor backbone: `{weights.name}`, pretrained by the evidence rerun's `shipped` stage "
        f"(`python examples/pretrain_tiny.py {' '.join(SHIPPED_RECIPE)} --seed 0 --adaptor`); its adaptors "
        "are backbone weights here, trained by `full` and frozen by the others. One task, one seed.",
    ]
    for title, folder in DEMO_RUNS.items():
        parts += ["", f"## {title}", "", (shipped_dir / folder / "demo.md").read_text().strip()]
    write_atomically(RESULTS / "demo_builtin_adaptor.md", "\n".join(parts) + "\n")
    card = weights.with_suffix(".md")
    text = card.read_text().split(TRANSFER)[0].rstrip()
    write_atomically(card, f"{text}\n\n{transfer_section(shipped_dir)}")


TRANSFER = "## Transfer"
"""The model card's section that :func:`write_demo_rows` writes (again, on a second run)."""


def transfer_section(shipped_dir: Path) -> str:
    """The shipped card's transfer figures: the demo's test top-1 per method on both backbones, read from
    the demo runs' records, and where the controlled comparison lies."""
    methods = DEMO_METHODS.split(",")
    results = {
        (folder, method): json.loads((shipped_dir / folder / method / RUN_RESULTS).read_text())
        for folder in DEMO_RUNS.values()
        for method in methods
    }
    rows = [
        f"| {m} | " + " | ".join(f"{results[f, m]['top1']:.2f}" for f in DEMO_RUNS.values()) + " |" for m in methods
    ]
    images = results[next(iter(results))]["images"]
    error = 100 * (0.9 * 0.1 / images) ** 0.5  # binomial, at 90 %
    return "\n".join(
        [
            TRANSFER,
            "",
            f"The demo's task (scikit-learn's digits, 30 training images per class, {images:,} test images; "
            f"`adaptor-peft demo --methods {DEMO_METHODS}`, once with `model=vim_nano_patch4_32_adaptor`), one "
            f"seed, test top-1 %. A top-1 near 90 % on {images:,} images has a standard error of about {error:.1f} "
            "points.",
            "",
            "| method | `vim_nano_patch4_32` | `vim_nano_patch4_32_adaptor` |",
            "|---|---:|---:|",
            *rows,
            "",
            "Over three pretraining seeds, at equal epochs and at equal compute, on the offline suite's design "
            "tasks: `benchmarks/results/backbone_usage.md`.",
            "",
        ]
    )


def finished_runs(output_dir: Path) -> dict[str, list[dict[str, str]]]:
    """Stage folder -> a record per finished run under it (a folder with a recipe and results): its path
    relative to ``output_dir`` and its :data:`RUN_FILES` as text, ``output_dir`` itself written as
    :data:`OUTPUT_DIR`."""
    found: dict[str, list[dict[str, str]]] = {}
    for results in sorted(output_dir.glob(f"*/**/{RUN_RESULTS}")):
        run = results.parent
        if (run / CONFIG).is_file():
            files = {
                name: (run / name).read_text().replace(str(output_dir.resolve()), OUTPUT_DIR)
                for name in RUN_FILES
                if (run / name).is_file()
            }
            relative = run.relative_to(output_dir).as_posix()
            found.setdefault(relative.split("/")[0], []).append({"run": relative, "files": files})
    return found


def read_archive(path: Path) -> dict[str, dict]:
    """Run path -> its record, from one ``.jsonl`` file of the archive."""
    records = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            records[record["run"]] = record
        except (ValueError, KeyError, TypeError) as error:
            raise SystemExit(f"{path}, line {number}: not a run record ({error}); restore the file from git") from None
    return records


def archive(output_dir: Path, into: Path) -> int:
    """Adds every finished run under ``output_dir``, and its ledger, to the archive ``into``; runs the
    archive holds and the folder no longer does are kept. Returns the number of runs archived now."""
    count = 0
    for stage, records in finished_runs(output_dir).items():
        path = into / f"{stage}.jsonl"
        merged = read_archive(path) if path.exists() else {}
        merged.update((record["run"], record) for record in records)
        into.mkdir(parents=True, exist_ok=True)
        write_atomically(path, "".join(json.dumps(merged[run], sort_keys=True) + "\n" for run in sorted(merged)))
        count += len(records)
    for weights in (file for pattern in BACKBONES for file in sorted(output_dir.glob(pattern))):
        for file in (weights, weights.with_suffix(".md")):
            copy = into / "backbones" / file.relative_to(output_dir)
            if file.is_file() and not (copy.is_file() and copy.read_bytes() == file.read_bytes()):
                copy_file(file, copy)
    if (output_dir / LEDGER).is_file():
        copy_file(output_dir / LEDGER, into / LEDGER)
    return count


def restore(output_dir: Path, source: Path) -> int:
    """Writes each archived run whose folder ``output_dir`` lacks, and each archived backbone file it lacks;
    what exists is left as it is. Returns the number of runs restored."""
    for file in sorted((source / "backbones").rglob("*")):
        target = output_dir / file.relative_to(source / "backbones")
        if file.is_file() and not target.exists():
            copy_file(file, target)
    count = 0
    for path in sorted(source.glob("*.jsonl")):
        for record in read_archive(path).values():
            run = output_dir / record["run"]
            if run.exists():
                continue
            run.mkdir(parents=True)
            for name, text in record["files"].items():
                write_atomically(run / name, text.replace(OUTPUT_DIR, str(output_dir.resolve())))
            count += 1
    return count


class Ledger:
    """Each stage's wall seconds (summed over interruptions), how many of them each machine gave, and whether
    it finished, in one JSON file owned by one code version. A rerun spans working sessions, and sessions
    may get different machines."""

    def __init__(self, path: Path, version: str, machine: str):
        self.path, self.machine, self.lock = path, machine, threading.Lock()
        self.data = json.loads(path.read_text()) if path.exists() else {"code_version": version, "stages": {}}
        if self.data["code_version"] != version:
            raise SystemExit(
                f"{path}: the rerun there was made by code version {self.data['code_version']}, this checkout is "
                f"{version}; run it from that version's commit, or start a fresh --output-dir"
            )

    def stage(self, name: str) -> dict[str, float | bool]:
        return self.data["stages"].setdefault(name, {"seconds": 0.0, "done": False})

    def add(self, name: str, seconds: float, done: bool = False) -> None:
        with self.lock:
            entry = self.stage(name)
            entry["seconds"] = round(float(entry["seconds"]) + seconds, 1)
            machines = entry.setdefault("machines", {})
            machines[self.machine] = round(machines.get(self.machine, 0.0) + seconds, 1)
            entry["done"] = bool(entry["done"] or done)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, json.dumps(self.data, indent=2) + "\n")

    @contextmanager
    def clock(self, name: str) -> Iterator[None]:
        """Adds the wall time of the block to stage ``name``: every :data:`HEARTBEAT_SECONDS` while it runs, so
        that a process killed outright loses at most that much, and the rest when it ends, however it ends."""
        stop, last, every = threading.Event(), [time.perf_counter()], HEARTBEAT_SECONDS

        def tick() -> None:
            now = time.perf_counter()
            self.add(name, now - last[0])
            last[0] = now

        def beat() -> None:
            while not stop.wait(every):
                tick()

        beating = threading.Thread(target=beat, daemon=True)
        beating.start()
        try:
            yield
        finally:
            stop.set()
            beating.join()
            tick()

    def hours(self) -> float:
        return sum(float(s["seconds"]) for s in self.data["stages"].values()) / 3600


def run_stage(ledger: Ledger, name: str, steps: list[Step]) -> None:
    """Runs a stage's steps, adding their wall time to the ledger as they run (:meth:`Ledger.clock`)."""
    for step in steps:
        print(f"[{name}] {shown(step)}", flush=True)
        with ledger.clock(name):
            if isinstance(step, partial):
                step()
            else:
                run_command(step)
    ledger.add(name, 0.0, done=True)


def by_machine(entry: dict) -> str:
    """A stage's hours on each machine; time from ledgers older than the machine record is "unrecorded"."""
    hours = {machine: seconds / 3600 for machine, seconds in entry.get("machines", {}).items()}
    unrecorded = (float(entry["seconds"]) - sum(entry.get("machines", {}).values())) / 3600
    if unrecorded >= 0.005:
        hours["unrecorded"] = unrecorded
    return "; ".join(f"{machine}: {h:.2f}" for machine, h in hours.items())


def report(ledger: Ledger, stages: list[str], argv: list[str] | None) -> str:
    lines = [
        "# The evidence rerun: wall time against its budget",
        "",
        provenance(argv),
        "",
        "| stage | hours (wall, over every session) | finished | hours per machine |",
        "|---|---:|---|---|",
    ]
    for name in stages:
        entry = ledger.stage(name)
        done = "yes" if entry["done"] else "no"
        lines.append(f"| {name} | {float(entry['seconds']) / 3600:.2f} | {done} | {by_machine(entry)} |")
    total = ledger.hours()
    verdict = "within" if total <= BUDGET_HOURS else "over"
    lines += ["", f"Total {total:.2f} h, {verdict} the budget of {BUDGET_HOURS:g} h on 2 cores.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="study,suite,backbone,shipped")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/evidence"))
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    parser.add_argument(
        "--archive", action="store_true", help="add the finished runs to benchmarks/results/evidence_runs, run nothing"
    )
    args = parser.parse_args(argv)
    steps = plan(args.output_dir.resolve())
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in steps]
    if unknown:
        raise SystemExit(f"--stages: unknown stage(s) {unknown}; the stages: {', '.join(steps)}")
    if args.dry_run:
        text = "\n".join(f"[{name}] {shown(step)}" for name in stages for step in steps[name])
        print(text)
        return text
    if args.archive:
        text = f"{archive(args.output_dir, ARCHIVE)} finished runs of {args.output_dir} archived in {ARCHIVE}"
        print(text)
        return text
    if (ARCHIVE / LEDGER).is_file() and not (args.output_dir / LEDGER).exists():
        copy_file(ARCHIVE / LEDGER, args.output_dir / LEDGER)
    # refuses another version's archive too
    ledger = Ledger(args.output_dir / LEDGER, code_version(), describe_machine())
    restored = restore(args.output_dir, ARCHIVE)
    if restored:
        print(f"{restored} finished runs restored from {ARCHIVE}", flush=True)
    with stopped_by_sigterm():  # a stop unwinds, so that the running step's time is added
        for name in stages:
            if not ledger.stage(name)["done"]:
                run_stage(ledger, name, steps[name])
    text = report(ledger, list(steps), argv)
    write_atomically(RESULTS / "evidence.md", text)
    print(text)
    return text


if __name__ == "__main__":
    main()
