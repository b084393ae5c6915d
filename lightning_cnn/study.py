"""``lightning-cnn study``: one protocol over several seeds, as ordinary runs, summarised as mean ± std.

Two kinds of study:

* ``split_cifar10``, the transfer protocol: per seed, phase 1 (classes 0-4), then phase 2 (classes 5-9) three
  ways from that phase-1 run (frozen-backbone transfer, fine-tuning, from scratch), each with its config's
  phase-2 budget.
* any experiment config (``mnist``, ``cifar10_fast``, a YAML path): its test figures over the seeds.

A study lives in ``studies/<name>/<study id>/``: ``plan.json`` (what it runs), ``runs/<experiment>/<run id>/``
(ordinary run folders, each its own W&B run, all in one W&B group), and at the end ``study.json``,
``study.md`` and ``study.png`` (:mod:`lightning_cnn.reporting.study_report`). Each run is a call of
:func:`lightning_cnn.launch.fit`. The same command continues the newest unfinished study with the same plan:
a finished run is kept, an interrupted one resumes from its ``last.ckpt``, the rest run.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_cnn import launch
from lightning_cnn.errors import ConfigError, UserError
from lightning_cnn.experiments import resolve_config
from lightning_cnn.files import write_json
from lightning_cnn.reporting.record import RunRecord
from lightning_cnn.reporting.study_report import PHASE1, RESULT, SPLIT, USES_PHASE1, link_lineage, write_report
from lightning_cnn.training.runs import CHECKPOINTS, point_latest

PLAN = "plan.json"
PROTOCOL = {
    PHASE1: "split_cifar10_phase1",
    "transfer": "split_cifar10_phase2_transfer",
    "finetune": "split_cifar10_phase2_finetune",
    "scratch": "split_cifar10_phase2_scratch",
}
# How a study trains one run: launch.fit's signature (config, overrides, args, group) -> its record.
Fit = Callable[[str, Mapping[str, Any], Sequence[str], str], RunRecord]


@dataclass(frozen=True)
class Step:
    """One run of a study: its key in the report, its config, and its seed."""

    key: str
    config: str
    seed: int

    def run_id(self, study: Path) -> str:
        """Its run id, unique across studies (W&B ids are unique within a project)."""
        return f"{study.name}-s{self.seed}-{self.key}"


def steps(target: str, seeds: Sequence[int]) -> list[Step]:
    """The runs of a study, in the order they run (phase 1 of a seed before its phase-2 runs)."""
    if target == SPLIT:
        return [Step(key, PROTOCOL[key], seed) for seed in seeds for key in PROTOCOL]  # phase 1 first
    return [Step("run", target, seed) for seed in seeds]


def _fit(config: str, overrides: Mapping[str, Any], args: Sequence[str], group: str) -> RunRecord:
    return launch.fit(config, overrides, args, group=group)


def run_step(
    step: Step, study: Path, group: str, phase1: RunRecord | None, forwarded: Sequence[str], fit: Fit
) -> RunRecord:
    """Run (or resume, or keep when finished) one step of the study; return its record."""
    experiment_dir = study / "runs" / Path(step.config).stem
    folder = experiment_dir / step.run_id(study)  # where a run with this id lives (training/runs.py)
    try:
        done = RunRecord.read(folder)
        if done.finished:
            return done
    except UserError:
        pass
    overrides: dict[str, Any] = {"seed_everything": step.seed, "trainer.default_root_dir": str(experiment_dir)}
    if any((folder / CHECKPOINTS).glob("last*.ckpt")):
        print(f"lightning-cnn study: resuming {folder}")
        overrides["ckpt_path"] = str(folder)
    else:
        shutil.rmtree(folder, ignore_errors=True)  # a run that failed before its first checkpoint: start again
        overrides["run_id"] = step.run_id(study)
    if phase1 is not None and step.key in USES_PHASE1:
        assert phase1.folder is not None
        overrides["model.network.init_args.checkpoint_path"] = str(phase1.folder / CHECKPOINTS / "best.ckpt")
    record = fit(step.config, overrides, forwarded, group)
    if not record.finished:
        raise UserError(f"The study's run {record.folder} ended without test figures; see its output above.")
    return record


def _study_folder(root: Path, plan: dict[str, Any], new: bool) -> tuple[Path, bool]:
    """The newest unfinished study with this plan (continued), else a new folder."""
    if not new and root.is_dir():
        for folder in sorted((p for p in root.iterdir() if p.is_dir() and not p.is_symlink()), reverse=True):
            try:
                same = json.loads((folder / PLAN).read_text()) == plan
            except (OSError, ValueError):
                continue
            if same and not (folder / RESULT).is_file():
                return folder, True
            break  # only the newest study is continued
    folder = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    folder.mkdir(parents=True)
    write_json(folder / PLAN, plan)
    return folder, False


def run_study(
    target: str,
    seeds: Sequence[int],
    forwarded: Sequence[str] = (),
    root: Path = Path("studies"),
    new: bool = False,
    fit: Fit = _fit,
) -> Path:
    """Run a study (or continue it) and write its report; return the study folder.

    Args:
        target: ``split_cifar10`` or a config (a shipped experiment's name or a file).
        seeds: the seeds, one run (or protocol) each.
        forwarded: options for every run, as on the command line (``--data.data_dir=/data``).
        root: where studies go.
        new: start a new study even if the newest one with the same plan is unfinished.
        fit: trains one run (:func:`lightning_cnn.launch.fit`; a test passes its own).
    """
    if target != SPLIT:
        resolve_config(target)  # an unknown config stops here, before any folder is made
    name = SPLIT if target == SPLIT else Path(target).stem
    plan = {"target": target, "seeds": list(seeds), "forwarded": list(forwarded)}
    study, continued = _study_folder(root / name, plan, new)
    print(f"lightning-cnn study: {'continuing' if continued else 'starting'} {study}")
    group = f"{name}-{study.name}"
    runs: dict[int, dict[str, RunRecord]] = {}
    for step in steps(target, seeds):
        phase1 = runs.get(step.seed, {}).get(PHASE1)
        runs.setdefault(step.seed, {})[step.key] = run_step(step, study, group, phase1, list(forwarded), fit)
    print(write_report(study, plan, runs, group))
    print(f"Study folder: {study}")
    point_latest(study)
    return study


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-cnn study",
        description="Run a protocol over several seeds and report mean ± std. Options after the known ones "
        "(--data.data_dir, --trainer.max_epochs, ...) go to every run.",
        exit_on_error=False,
    )
    parser.add_argument(
        "target", nargs="?", help=f"'{SPLIT}' (the transfer protocol) or an experiment config (name or YAML)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--first_seed", type=int, default=0, help="seeds are first_seed, first_seed+1, ...")
    parser.add_argument("--dir", type=Path, default=Path("studies"), help="where studies go (default ./studies)")
    parser.add_argument("--new", action="store_true", help="start a new study instead of continuing one")
    parser.add_argument("--link", type=Path, metavar="STUDY", help="after wandb sync of an offline study: link "
                        "each phase-2 run to the phase-1 model artifact it used, on the W&B server")  # fmt: skip
    parser.add_argument("--project", default="lightning-cnn", help="W&B project of the study's runs (with --link)")
    try:
        known, forwarded = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise ConfigError(f"{err}. See lightning-cnn study --help") from None
    if known.link is not None:
        link_lineage(known.link, known.project)
        return
    if known.target is None:
        raise ConfigError("Name what to study: split_cifar10 or a config. See lightning-cnn study --help")
    if known.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {known.seeds}")
    seeds = list(range(known.first_seed, known.first_seed + known.seeds))
    run_study(known.target, seeds, forwarded, known.dir, known.new)
