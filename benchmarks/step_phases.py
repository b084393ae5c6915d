"""Where a training step's milliseconds go, in the bare loop and in ``lightning-cnn fit``, phase by phase.

``train_throughput.py`` compares whole rates. On a CPU with bf16 those move by 10-20% from one process to
the next (2026-11-29: the forward of the same batch took 11 ms in one process and 23 ms in the next, in the
bare loop and in ``fit`` alike), which can hide a gap between ``fit`` and the bare loop or show one that is
not there. Split into phases, a step shows Lightning's own per-step cost apart from the kernels' speed:

* data: fetching and augmenting the batch (in ``fit`` also Lightning's loop between two batches);
* forward: forward and loss (in ``fit`` the whole ``training_step``: metric update and logging too);
* backward;
* step: the optimizer step (in ``fit`` also the batch-end hooks).

Each run is a fresh process (bare and ``fit`` alternate); per run the median of each phase over its steps
(the first 10 left out), then the median over runs. Usage::

    python benchmarks/step_phases.py --data-dir ../shared/data --batches 150 --repeats 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
from fit_rate import fit_summary
from train_throughput import bare_steps, in_fresh_process

PHASES = ("data", "forward", "backward", "step")
WARM_UP = 10  # steps left out: the first ones pick and compile kernels
OUT_ENV = "STEP_PHASES_OUT"


class PhaseTimer(L.Callback):
    """Times each training step's phases through Lightning's hooks; writes the medians to ``$STEP_PHASES_OUT``."""

    def __init__(self) -> None:
        self.rows: list[list[float]] = []
        self.marks: list[float] = []
        self.last_end: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        now = time.perf_counter()  # the batch was fetched and augmented (on_after_batch_transfer) before this
        self.marks = [self.last_end if self.last_end is not None else now, now]

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Any) -> None:
        self.marks.append(time.perf_counter())

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.marks.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.last_end = time.perf_counter()
        self.rows.append(phase_seconds([*self.marks, self.last_end]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path(os.environ[OUT_ENV]).write_text(json.dumps(medians(self.rows)))


def phase_seconds(marks: list[float]) -> list[float]:
    """Five clock readings of a step -> the seconds of its four phases.

    >>> phase_seconds([0.0, 1.0, 3.0, 6.0, 10.0])
    [1.0, 2.0, 3.0, 4.0]
    """
    return [b - a for a, b in itertools.pairwise(marks)]


def medians(rows: list[list[float]]) -> list[float]:
    """Each phase's median over the steps after the warm-up, in milliseconds."""
    kept = rows[WARM_UP:] or rows
    return [1000 * statistics.median(row[k] for row in kept) for k in range(len(PHASES))]


def bare_phases(data_dir: str, batches: int, bf16: bool, batch: int) -> list[float]:
    return medians([phase_seconds(marks) for _, marks in bare_steps(data_dir, batches, bf16, batch, sync=True)])


def fit_phases(data_dir: str, batches: int, precision: str, batch: int) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        result = Path(out) / "phases.json"
        os.environ[OUT_ENV] = str(result)
        fit_summary("cifar10_base", data_dir, batches, f"--trainer.precision={precision}",
                    f"--data.batch_size={batch}", "--trainer.callbacks+=step_phases.PhaseTimer")  # fmt: skip
        return list(json.loads(result.read_text()))


def main() -> None:
    from lightning_cnn.training.hardware import choose_precision

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--batches", type=int, default=150, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each, alternating; medians shown")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default=None, help="32-true or bf16-mixed (default: this machine's pick)")
    args = parser.parse_args()
    choice = choose_precision("auto")
    precision = args.precision or (choice.precision if choice else "32-true")
    if precision not in ("32-true", "bf16-mixed"):
        sys.exit(f"step_phases: --precision must be 32-true or bf16-mixed (the bare loop's two), got {precision}")
    bf16 = precision == "bf16-mixed"
    here = str(Path(__file__).resolve().parent)  # where fit's process finds step_phases.PhaseTimer
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    runs: dict[str, list[list[float]]] = {"bare": [], "fit": []}
    for repeat in range(args.repeats):
        for name in ("bare", "fit") if repeat % 2 == 0 else ("fit", "bare"):
            if name == "bare":
                ms = in_fresh_process(bare_phases, args.data_dir, args.batches, bf16, args.batch_size)
            else:
                ms = fit_phases(args.data_dir, args.batches, precision, args.batch_size)
            runs[name].append(ms)
    print(f"CIFAR CNN, {precision}, batch {args.batch_size}, {args.batches} steps per run, {args.repeats} runs each "
          f"(fresh processes, alternating); ms per step, median of the runs' medians")  # fmt: skip
    print("| phase | bare loop | fit | fit - bare | bare, each run | fit, each run |")
    print("|---|---:|---:|---:|---|---|")
    rows = [*PHASES, "whole step"]
    for k, phase in enumerate(rows):
        each = {name: [sum(r) if phase == "whole step" else r[k] for r in runs[name]] for name in runs}
        bare, fit = statistics.median(each["bare"]), statistics.median(each["fit"])
        listed = {name: ", ".join(f"{v:.1f}" for v in values) for name, values in each.items()}
        print(f"| {phase} | {bare:.2f} | {fit:.2f} | {fit - bare:+.2f} | {listed['bare']} | {listed['fit']} |")


if __name__ == "__main__":
    main()
