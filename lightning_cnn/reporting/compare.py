"""``lightning-cnn compare RUN [RUN ...]``: a Markdown table and a validation-curve PNG of several runs.

A run is a run folder (``runs/<experiment>/<run id>``, holding ``summary.json`` and ``history.csv``), an
experiment folder (``runs/<experiment>``: its ``latest`` run), a local W&B run folder (offline or synced), or,
online, a W&B run path ``entity/project/run_id`` (or its
``https://wandb.ai/entity/project/runs/run_id`` address).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path
from typing import Any

from lightning_cnn.errors import UserError
from lightning_cnn.reporting.report import HISTORY, SUMMARY
from lightning_cnn.training.runs import LATEST

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


def load_run(folder: Path) -> tuple[dict[str, Any], list[tuple[float, float]]]:
    """A run's summary and its validation-accuracy curve ``[(epoch, val/acc), ...]``.

    ``folder`` is a run folder (``summary.json``), or a local W&B run folder (``run-*.wandb``, offline or
    synced), or a folder holding W&B runs (the newest is read).
    """
    if not (folder / SUMMARY).is_file() and (folder / LATEST / SUMMARY).is_file():
        folder = folder / LATEST  # an experiment folder: its newest finished run
    if not (folder / SUMMARY).is_file():
        wandb_runs = [p for pattern in ("run-*.wandb", "*run-*/run-*.wandb") for p in folder.glob(pattern)]
        if wandb_runs:
            return _load_wandb_run(max(wandb_runs, key=lambda p: p.stat().st_mtime).parent)
        raise UserError(
            f"{folder} is not a run folder: it has no {SUMMARY} and no W&B run. Pass a run folder "
            "(runs/<experiment>/<run id>), an experiment folder (runs/mnist: its latest run) or a W&B run folder "
            "(wandb/offline-run-*)."
        )
    try:
        summary = json.loads((folder / SUMMARY).read_text())
    except ValueError as err:
        raise UserError(f"{folder / SUMMARY} is not valid JSON ({err}); the run may have been cut off.") from err
    _check_summary(summary, folder / SUMMARY)
    curve: list[tuple[float, float]] = []
    if (folder / HISTORY).is_file():
        with open(folder / HISTORY) as f:
            curve = [(float(r["epoch"]) + 1, float(r["val/acc"])) for r in csv.DictReader(f) if r.get("val/acc")]
    return summary, curve


def _check_summary(summary: Any, source: Path | str) -> None:
    """Refuse a summary that is not the object a run writes (a hand-edited or foreign file)."""
    if not isinstance(summary, dict) or not isinstance(summary.get("test", {}), dict):
        raise UserError(
            f"{source} is not a run summary of lightning-cnn (expected an object with a 'test' object of figures)."
        )
    numbers = ("parameters", "trainable_parameters", "epochs", "fit_seconds", "train_images_per_second")
    wrong = [k for k in numbers if k in summary and not isinstance(summary[k], int | float)]
    wrong += [k for k, v in summary.get("test", {}).items() if not isinstance(v, int | float)]
    if wrong:
        raise UserError(f"{source}: {', '.join(wrong)} should be numbers. The file is damaged or not a run summary.")


def _load_wandb_run(run_dir: Path) -> tuple[dict[str, Any], list[tuple[float, float]]]:
    from lightning_cnn.reporting.wandb_files import read_run

    record = read_run(run_dir)
    if not record["summary"] and not record["history"]:
        raise UserError(
            f"The W&B run in {run_dir} holds no figures: its .wandb file is empty or cut short. Compare the run "
            "folder instead, or sync the run again."
        )
    summary = dict(record["summary"])
    summary["test"] = {k: v for row in record["history"] for k, v in row.items() if k.startswith("test/")}
    curve = [(float(row["epoch"]) + 1, float(row["val/acc"])) for row in record["history"] if "val/acc" in row]
    return summary, curve


WANDB_RUN_PATH = re.compile(r"(?:https?://[^/]+/)?([\w.-]+)/([\w.-]+)/(?:runs/)?([\w-]+)/?")


def load_wandb_api_run(path: str) -> tuple[dict[str, Any], list[tuple[float, float]]]:
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
    curve = [(float(row["epoch"]) + 1, float(row["val/acc"])) for row in rows if row.get("val/acc") is not None]
    return summary, curve


def load_any(run: str) -> tuple[str, dict[str, Any], list[tuple[float, float]]]:
    """Name, summary and validation curve of a run given as a local folder or a W&B run path."""
    folder = Path(run)
    match = WANDB_RUN_PATH.fullmatch(run)
    if not folder.exists() and match:
        summary, curve = load_wandb_api_run("/".join(match.groups()))
        return str(summary["run"]), summary, curve
    summary, curve = load_run(folder)
    name = folder.resolve().name
    if name == "wandb":
        return summary.get("run", name), summary, curve
    return str(summary.get("experiment", name)), summary, curve


def markdown_table(runs: dict[str, dict[str, Any]]) -> str:
    columns = COLUMNS[:1] + [c for c in OPTIONAL_COLUMNS if any(c[1](s) != "-" for s in runs.values())] + COLUMNS[1:]
    header = "| run | " + " | ".join(name for name, _ in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = [f"| {run} | " + " | ".join(fn(s) for _, fn in columns) + " |" for run, s in runs.items()]
    return "\n".join([header, rule, *rows]) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lightning-cnn compare", description=__doc__)
    parser.add_argument(
        "runs", nargs="+", help="run folders (runs/cifar10_base), W&B run folders, or W&B run paths entity/project/id"
    )
    parser.add_argument("--output", type=Path, help="also write the Markdown table to this file")
    parser.add_argument("--plot", type=Path, help="write a PNG of the validation curves to this file")
    args = parser.parse_args(argv)
    loaded: dict[str, tuple[dict[str, Any], list[tuple[float, float]]]] = {}
    for run in args.runs:
        name, summary, curve = load_any(run)
        if name in loaded:  # runs of one experiment: tell them apart by run id
            name = f"{name}/{summary.get('run', len(loaded))}"
        loaded[name] = (summary, curve)
    table = markdown_table({name: summary for name, (summary, _) in loaded.items()})
    print(table, end="")
    # Files only where the user asked for them: a command run from any folder must not litter it.
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
        print(f"Wrote {args.output}")
    if args.plot:
        from lightning_cnn.reporting.plots import plot_validation_curves

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_validation_curves({name: curve for name, (_, curve) in loaded.items()}, args.plot)
        print(f"Wrote {args.plot}")
