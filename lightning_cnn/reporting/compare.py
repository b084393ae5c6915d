"""``lightning-cnn compare RUN [RUN ...]``: a Markdown table and a validation-curve PNG of several runs.

A run is a run folder (``runs/<experiment>/<run id>``, holding ``summary.json`` and ``history.csv``), an
experiment folder (``runs/<experiment>``: its ``latest`` run), a W&B run folder inside a run folder, or,
online, a W&B run path ``entity/project/run_id`` (or its
``https://wandb.ai/entity/project/runs/run_id`` address).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from lightning_cnn.errors import UserError
from lightning_cnn.files import write_atomically
from lightning_cnn.reporting.record import SUMMARY, RunRecord, markdown_table
from lightning_cnn.training.runs import CHECKPOINTS, LATEST

COLUMNS = [
    ("test acc", lambda s: _pct(s.get("test", {}).get("test/acc"))),
    ("precision (w)", lambda s: _pct(s.get("test", {}).get("test/precision_weighted"))),
    ("recall (w)", lambda s: _pct(s.get("test", {}).get("test/recall_weighted"))),
    ("F1 (w)", lambda s: _pct(s.get("test", {}).get("test/f1_weighted"))),
    ("params", lambda s: f"{s['parameters']:,}" if "parameters" in s else "-"),
    ("trainable", lambda s: f"{s['trainable_parameters']:,}" if "trainable_parameters" in s else "-"),
    ("epochs", lambda s: str(s.get("epochs", "-"))),
    ("wall time (s)", lambda s: f"{s['fit_seconds']:.0f}" if "fit_seconds" in s else "-"),
    ("train img/s", lambda s: f"{s['train_images_per_second']:,.0f}" if "train_images_per_second" in s else "-"),
]
# Shown only when some run has them: split CIFAR-10 phase-2 runs with PhaseOneRetention.
OPTIONAL_COLUMNS = [
    ("phase-1 acc after phase 2", lambda s: _pct(s.get("test", {}).get("test/phase1_acc"))),
]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def load_run(folder: Path) -> RunRecord:
    """The record of a run folder, an experiment folder (its ``latest`` run), or a W&B run folder inside a run
    folder (``<run>/wandb/offline-run-*``, or its ``wandb`` folder), which is read from the run's own files.

    W&B's ``run-*.wandb`` files are in W&B's private record format: a W&B run elsewhere is compared through
    W&B's server (``entity/project/run_id``) once synced.
    """
    if not (folder / SUMMARY).is_file() and (folder / LATEST / SUMMARY).is_file():
        folder = folder / LATEST  # an experiment folder: its newest finished run
    wandb_runs = [p for pattern in ("run-*.wandb", "*run-*/run-*.wandb") for p in folder.glob(pattern)]
    if not (folder / SUMMARY).is_file() and wandb_runs:
        run_dir = max(wandb_runs, key=lambda p: p.stat().st_mtime).parent
        owner = next((p for p in run_dir.parents if p.name == "wandb"), None)
        if owner is not None and (owner.parent / SUMMARY).is_file():
            return RunRecord.read(owner.parent)  # the run folder's own record of the same run
        raise UserError(
            f"The W&B run in {run_dir} holds no figures that compare can read: it lies in no run folder with a "
            f"{SUMMARY}. Compare the run folder it was recorded for, or sync the run and compare "
            "entity/project/run_id."
        )
    if not (folder / SUMMARY).is_file() and any((folder / part).is_dir() for part in (CHECKPOINTS, "wandb")):
        raise UserError(
            f"{folder} is a run that did not finish: it has no {SUMMARY} yet (its W&B run and checkpoints hold "
            f"no test figures). Resume it with lightning-cnn fit ... --ckpt_path {folder}, or compare finished runs."
        )
    if not (folder / SUMMARY).is_file():
        raise UserError(
            f"{folder} is not a run folder: it has no {SUMMARY} and no W&B run. Pass a run folder "
            "(runs/<experiment>/<run id>), an experiment folder (runs/mnist: its latest run) or a W&B run folder "
            "(wandb/offline-run-*)."
        )
    return RunRecord.read(folder)


WANDB_RUN_PATH = re.compile(r"(?:https?://[^/]+/)?([\w.-]+)/([\w.-]+)/(?:runs/)?([\w-]+)/?")


def load_wandb_api_run(path: str) -> RunRecord:
    """A run's summary and validation curve from the W&B server (needs network and an API key).

    Raises:
        UserError: the server cannot be reached, refuses the key, or has no such run.
    """
    import wandb

    try:
        run = wandb.Api(timeout=30).run(path)
        summary = dict(run.summary)
        rows = list(run.scan_history(keys=["epoch", "val/acc"]))
    except Exception as err:  # wandb raises CommError, UsageError, ValueError, requests errors, ...
        raise UserError(
            f"{path} is no folder here, and reading it as a W&B run path failed ({type(err).__name__}: {err}). "
            "Check the path (entity/project/run_id), your network and `wandb login`, or pass a local run folder."
        ) from err
    summary.setdefault("run", run.name)
    summary["test"] = {k: v for k, v in summary.items() if k.startswith("test/") and isinstance(v, int | float)}
    return RunRecord(None, summary, [row for row in rows if row.get("val/acc") is not None])


def load_any(run: str) -> tuple[str, RunRecord]:
    """Name and record of a run given as a local folder or a W&B run path."""
    folder = Path(run)
    match = WANDB_RUN_PATH.fullmatch(run)
    if not folder.exists() and match:
        record = load_wandb_api_run("/".join(match.groups()))
        return record.name, record
    record = load_run(folder)
    name = folder.resolve().name
    if name == "wandb":
        return str(record.summary.get("run", name)), record
    return str(record.summary.get("experiment", name)), record


def comparison_table(runs: dict[str, dict[str, Any]]) -> str:
    columns = COLUMNS[:1] + [c for c in OPTIONAL_COLUMNS if any(c[1](s) != "-" for s in runs.values())] + COLUMNS[1:]
    rows = [[run, *(fn(s) for _, fn in columns)] for run, s in runs.items()]
    return markdown_table(["run", *(name for name, _ in columns)], rows)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lightning-cnn compare", description=__doc__)
    parser.add_argument(
        "runs", nargs="+", help="run folders (runs/cifar10_base), W&B run folders, or W&B run paths entity/project/id"
    )
    parser.add_argument("--output", type=Path, help="also write the Markdown table to this file")
    parser.add_argument("--plot", type=Path, help="write a PNG of the validation curves to this file")
    args = parser.parse_args(argv)
    loaded: dict[str, RunRecord] = {}
    for run in args.runs:
        name, record = load_any(run)
        if name in loaded:  # runs of one experiment: tell them apart by run id
            name = f"{name}/{record.summary.get('run', len(loaded))}"
        loaded[name] = record
    table = comparison_table({name: record.summary for name, record in loaded.items()})
    print(table, end="")
    # Files only where the user asked for them: a command run from any folder must not litter it.
    if args.output:
        write_atomically(args.output, table)
        print(f"Wrote {args.output}")
    if args.plot:
        from lightning_cnn.reporting.plots import plot_validation_curves

        plot_validation_curves(loaded, args.plot)
        print(f"Wrote {args.plot}")
