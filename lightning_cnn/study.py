"""``lightning-cnn study``: one protocol over several seeds, as ordinary runs, summarised as mean ± std.

Two kinds of study:

* ``split_cifar10``, the transfer protocol: per seed, phase 1 (classes 0-4), then phase 2 (classes 5-9) three
  ways from that phase-1 run (frozen-backbone transfer, fine-tuning, from scratch), each with its config's
  phase-2 budget. Reported as continual-learning libraries do (Avalanche's accuracy matrix, forgetting,
  forward transfer), plus task- and class-incremental accuracy, trainable parameters and training time.
* any experiment config (``mnist``, ``cifar10_fast``, a YAML path): its test figures over the seeds.

A study lives in ``studies/<name>/<study id>/``: ``plan.json`` (what it runs), ``runs/<experiment>/<run id>/``
(ordinary run folders, each its own W&B run, all in one W&B group), and at the end ``study.json``,
``study.md`` and ``study.png``. The same command continues the newest unfinished study with the same plan: a
finished run is kept, an interrupted one resumes from its ``last.ckpt``, the rest run.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_cnn.errors import ConfigError, UserError
from lightning_cnn.experiments import resolve_config
from lightning_cnn.training.runs import CHECKPOINTS, point_latest

PLAN, RESULT = "plan.json", "study.json"
SPLIT = "split_cifar10"
PHASE1 = "phase1"
METHODS = ("transfer", "finetune", "scratch")  # phase-2 methods, in report order
PROTOCOL = {
    PHASE1: "split_cifar10_phase1",
    "transfer": "split_cifar10_phase2_transfer",
    "finetune": "split_cifar10_phase2_finetune",
    "scratch": "split_cifar10_phase2_scratch",
}
USES_PHASE1 = ("transfer", "finetune")  # the methods built from the phase-1 checkpoint


@dataclass(frozen=True)
class Step:
    """One run of a study: its key in the report, its config, and its seed."""

    key: str
    config: str
    seed: int

    def run_id(self, study: Path) -> str:
        """Its run folder's name and W&B id, unique across studies (W&B ids are unique within a project)."""
        return f"{study.name}-s{self.seed}-{self.key}"


def steps(target: str, seeds: Sequence[int]) -> list[Step]:
    """The runs of a study, in the order they run (phase 1 of a seed before its phase-2 runs)."""
    if target == SPLIT:
        return [Step(key, PROTOCOL[key], seed) for seed in seeds for key in (PHASE1, *METHODS)]
    return [Step("run", target, seed) for seed in seeds]


# ---------------------------------------------------------------------------------------------------- figures
def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation of the values that exist (``std`` 0 for one value), and the values."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "values": list(values)}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "values": list(values)}


def _test(summary: dict[str, Any], key: str) -> float | None:
    value = summary.get("test", {}).get(key)
    return None if value is None else float(value)


def _curve(history: list[dict[str, float]]) -> list[tuple[int, float, float]]:
    """(epochs trained, validation accuracy, training seconds so far) per epoch that validated."""
    return [
        (int(row["epoch"]) + 1, float(row["val/acc"]), float(row.get("train_seconds", math.nan)))
        for row in history
        if row.get("val/acc") is not None and not math.isnan(float(row["val/acc"]))
    ]


def time_to_reach(history: list[dict[str, float]], target: float) -> tuple[int | None, float | None]:
    """Epochs and training seconds a run took to reach ``target`` validation accuracy; ``None`` if it never did."""
    for epochs, accuracy, seconds in _curve(history):
        if accuracy >= target:
            return epochs, None if math.isnan(seconds) else seconds
    return None, None


def split_figures(phase1: dict[str, Any], phase2: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The transfer study's figures for one seed.

    Args:
        phase1: the phase-1 run's ``summary`` (its ``summary.json``) and ``history`` (rows of ``history.csv``).
        phase2: the same for each method in :data:`METHODS`.

    The accuracy matrix ``R[i][j]`` is the accuracy on phase ``j+1``'s test classes after training phase
    ``i+1``. ``R[0][1]`` is not defined (phase 1 has no head for phase-2 classes). ``R[1][0]`` is the phase-1
    head on the network phase 2 leaves: the shared backbone for transfer and fine-tuning; from scratch trains a
    second network and leaves the phase-1 network as it was, so its ``R[1][0]`` is ``R[0][0]`` (with twice the
    parameters kept). Forgetting is the drop the phase-2 run measured on its phase-1 head (before and after,
    one computation), so ``R[1][0] = R[0][0] - forgetting``.
    """
    r11 = _test(phase1["summary"], "test/acc")
    scratch = phase2["scratch"]
    scratch_curve = _curve(scratch["history"])
    scratch_final = scratch_curve[-1][1] if scratch_curve else None
    figures: dict[str, Any] = {}
    for method in METHODS:
        run = phase2[method]
        r22 = _test(run["summary"], "test/acc")
        forgetting: float | None = 0.0
        if method != "scratch":  # before and after by one computation in the run (PhaseOneRetention): exact
            before, after = _test(run["summary"], "test/phase1_acc_before"), _test(run["summary"], "test/phase1_acc")
            forgetting = None if before is None or after is None else before - after
        r21 = None if r11 is None or forgetting is None else r11 - forgetting
        epochs, seconds = time_to_reach(run["history"], scratch_final) if scratch_final is not None else (None, None)
        figures[method] = {
            "accuracy_matrix": [[r11, None], [r21, r22]],
            "forgetting": forgetting,
            "forward_transfer": None if r22 is None else r22 - (_test(scratch["summary"], "test/acc") or 0.0),
            "task_incremental_acc": None if r21 is None or r22 is None else (r21 + r22) / 2,
            "class_incremental_acc": _test(run["summary"], "test/all_classes_acc"),
            "epochs_to_scratch_final": epochs,
            "seconds_to_scratch_final": seconds,
            "trainable_parameters": run["summary"].get("trainable_parameters"),
            "train_seconds": run["summary"].get("train_seconds"),
            "epochs": run["summary"].get("epochs"),
        }
    return figures


def aggregate(per_seed: list[dict[str, Any]]) -> Any:
    """Mean ± std over seeds of every number in the per-seed figures, keeping their nesting."""
    first = per_seed[0]
    if isinstance(first, dict):
        return {key: aggregate([figures[key] for figures in per_seed]) for key in first}
    if isinstance(first, list):
        return [aggregate([figures[i] for figures in per_seed]) for i in range(len(first))]
    return mean_std(per_seed)


# ---------------------------------------------------------------------------------------------------- running
def _read_run(folder: Path) -> dict[str, Any]:
    from lightning_cnn.reporting.report import read_history, read_summary

    return {"folder": str(folder), "summary": read_summary(folder), "history": read_history(folder)}


def _finished(folder: Path) -> bool:
    from lightning_cnn.reporting.report import read_summary

    try:
        return "test" in read_summary(folder)
    except UserError:
        return False


RunCommand = Callable[[list[str]], None]


def _run_in_process(args: list[str]) -> None:
    from lightning_cnn.cli import run

    run(args)


def run_step(step: Step, study: Path, group: str, phase1: Path | None, forwarded: list[str], run: RunCommand) -> Path:
    """Run (or resume, or skip when finished) one step of the study; return its run folder."""
    experiment_dir = study / "runs" / Path(step.config).stem
    folder = experiment_dir / step.run_id(study)
    if _finished(folder):
        return folder
    args = [
        "fit",
        "--config",
        step.config,
        f"--seed_everything={step.seed}",
        f"--trainer.default_root_dir={experiment_dir}",
    ]
    if folder.is_dir() and any((folder / CHECKPOINTS).glob("last*.ckpt")):
        print(f"lightning-cnn study: resuming {folder}")
        args.append(f"--ckpt_path={folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)  # a run that failed before its first checkpoint: start again
        args.append(f"--run_id={step.run_id(study)}")
    if phase1 is not None and step.key in USES_PHASE1:
        args.append(f"--model.network.init_args.checkpoint_path={phase1 / CHECKPOINTS / 'best.ckpt'}")
    if not any(a.startswith("--trainer.logger") for a in forwarded):
        args.append(f"--trainer.logger.init_args.group={group}")
    run([*args, *forwarded])
    if not _finished(folder):
        raise UserError(f"The study's run {folder} ended without test figures; see its output above.")
    return folder


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
    (folder / PLAN).write_text(json.dumps(plan, indent=2))
    return folder, False


def run_study(
    target: str,
    seeds: Sequence[int],
    forwarded: Sequence[str] = (),
    root: Path = Path("studies"),
    new: bool = False,
    run: RunCommand = _run_in_process,
) -> Path:
    """Run a study (or continue it) and write its report; return the study folder."""
    if target != SPLIT:
        resolve_config(target)  # an unknown config stops here, before any folder is made
    name = SPLIT if target == SPLIT else Path(target).stem
    plan = {"target": target, "seeds": list(seeds), "forwarded": list(forwarded)}
    study, continued = _study_folder(root / name, plan, new)
    print(f"lightning-cnn study: {'continuing' if continued else 'starting'} {study}")
    group = f"{name}-{study.name}"
    folders: dict[int, dict[str, Path]] = {}
    for step in steps(target, seeds):
        phase1 = folders.get(step.seed, {}).get(PHASE1)
        folders.setdefault(step.seed, {})[step.key] = run_step(step, study, group, phase1, list(forwarded), run)
    report(study, plan, folders, group)
    point_latest(study)
    return study


# ---------------------------------------------------------------------------------------------------- report
def report(study: Path, plan: dict[str, Any], folders: dict[int, dict[str, Path]], group: str) -> None:
    """Write ``study.json``, ``study.md`` and ``study.png``, and log them to a W&B run of job type ``study``."""
    from lightning_cnn.reporting.report import write_json_atomically

    target, seeds = plan["target"], plan["seeds"]
    runs = {seed: {key: _read_run(folder) for key, folder in by_key.items()} for seed, by_key in folders.items()}
    if target == SPLIT:
        per_seed = [split_figures(runs[s][PHASE1], {m: runs[s][m] for m in METHODS}) for s in seeds]
    else:
        per_seed = [{"test": {k: float(v) for k, v in runs[s]["run"]["summary"].get("test", {}).items()},
                     "train_seconds": runs[s]["run"]["summary"].get("train_seconds"),
                     "epochs": runs[s]["run"]["summary"].get("epochs")} for s in seeds]  # fmt: skip
    result = {
        **plan,
        "group": group,
        "runs": {str(s): {k: str(f) for k, f in by_key.items()} for s, by_key in folders.items()},
        "per_seed": {str(s): figures for s, figures in zip(seeds, per_seed, strict=True)},
        "mean_std": aggregate(per_seed),
        "uses_artifact": {
            str(folders[s][m]): f"model-{folders[s][PHASE1].name}:best" for s in seeds for m in USES_PHASE1
        }
        if target == SPLIT
        else {},
    }
    from lightning_cnn.reporting.plots import plot_study

    plot_study(result, runs, study / "study.png")
    markdown = split_markdown(result) if target == SPLIT else config_markdown(result)
    (study / "study.md").write_text(markdown)
    write_json_atomically(study / RESULT, result)  # last: its presence marks the study finished
    _log_study_to_wandb(study, result, group)
    print(markdown)
    print(f"Study folder: {study}")


def _pm(figure: dict[str, Any], scale: float = 100.0, digits: int = 2, unit: str = "") -> str:
    if figure["mean"] is None:
        return "-"
    return f"{figure['mean'] * scale:.{digits}f} ± {figure['std'] * scale:.{digits}f}{unit}"


def split_markdown(result: dict[str, Any]) -> str:
    agg, seeds = result["mean_std"], result["seeds"]
    lines = [
        f"# Split CIFAR-10 transfer study ({len(seeds)} seeds: {', '.join(map(str, seeds))})",
        "",
        "Mean ± sample std over seeds, accuracies in %. R[i][j]: accuracy on phase j's test classes after phase "
        "i (phase 1: classes 0-4, phase 2: classes 5-9). From scratch trains a second network and keeps the "
        "phase-1 one, so it forgets nothing at twice the parameters.",
        "",
        "| phase 2 by | R[1][1] | R[2][1] | R[2][2] | forgetting | forward transfer | task-IL | class-IL "
        "| epochs to scratch's final val acc | seconds to it | trainable | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        m = agg[method]
        lines.append(
            f"| {method} | {_pm(m['accuracy_matrix'][0][0])} | {_pm(m['accuracy_matrix'][1][0])} "
            f"| {_pm(m['accuracy_matrix'][1][1])} | {_pm(m['forgetting'])} | {_pm(m['forward_transfer'])} "
            f"| {_pm(m['task_incremental_acc'])} | {_pm(m['class_incremental_acc'])} "
            f"| {_pm(m['epochs_to_scratch_final'], 1, 1)} | {_pm(m['seconds_to_scratch_final'], 1, 0)} "
            f"| {_pm(m['trainable_parameters'], 1, 0)} | {_pm(m['train_seconds'], 1, 0)} |"
        )
    lines += ["", "Per seed (R[2][2], phase-2 test accuracy, %):", "", "| seed | " + " | ".join(METHODS) + " |",
              "|---|" + "---:|" * len(METHODS)]  # fmt: skip
    for seed in seeds:
        figures = result["per_seed"][str(seed)]
        cells = [f"{figures[m]['accuracy_matrix'][1][1] * 100:.2f}" for m in METHODS]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", "Forward transfer: phase-2 test accuracy minus from scratch's at the same budget. Epochs and "
              "seconds: training until the validation accuracy first reaches the from-scratch run's final one "
              "(- when it never does).", ""]  # fmt: skip
    return "\n".join(lines)


def config_markdown(result: dict[str, Any]) -> str:
    agg, seeds = result["mean_std"], result["seeds"]
    lines = [
        f"# {Path(result['target']).stem} over {len(seeds)} seeds ({', '.join(map(str, seeds))})",
        "",
        "| figure | mean ± std | per seed |",
        "|---|---:|---|",
    ]
    for key, figure in sorted(agg["test"].items()):
        scale, unit = (1.0, "") if key.endswith("loss") else (100.0, " (%)")  # losses are not shares
        values = ", ".join("-" if v is None else f"{v * scale:.2f}" for v in figure["values"])
        lines.append(f"| {key}{unit} | {_pm(figure, scale)} | {values} |")
    for key, digits in (("train_seconds", 0), ("epochs", 0)):
        values = ", ".join("-" if v is None else f"{v:.{digits}f}" for v in agg[key]["values"])
        lines.append(f"| {key} | {_pm(agg[key], 1, digits)} | {values} |")
    return "\n".join([*lines, ""])


def _log_study_to_wandb(study: Path, result: dict[str, Any], group: str) -> None:
    """The study's table and picture into a W&B run of job type ``study`` in the runs' group."""
    import os

    if os.environ.get("WANDB_MODE") == "disabled" or any(a.startswith("--trainer.logger") for a in result["forwarded"]):
        return
    from lightning_cnn.reporting.wandb_logger import WandbLogger, current_wandb_run, finish_wandb_run_started_since

    before = current_wandb_run()
    logger = WandbLogger(name=f"{group}-study", group=group, job_type="study", save_dir=str(study), id=f"{group}-study")
    rows = [[key, json.dumps(value)] for key, value in result["mean_std"].items()]
    logger.log_table("study/mean_std", columns=["figure", "mean ± std"], data=rows)
    logger.log_image("study/picture", [str(study / "study.png")])
    logger.experiment.summary["study"] = str(study)
    finish_wandb_run_started_since(before, failed=False)


def link_lineage(study: Path, project: str = "lightning-cnn", entity: str | None = None) -> int:
    """After ``wandb sync`` of an offline study: make each phase-2 run use its phase-1 model artifact on the server.

    W&B refuses ``use_artifact`` in an offline run, so the study keeps the references (``study.json``,
    ``uses_artifact``); W&B's public API declares them on the synced runs. Returns how many were linked.

    Raises:
        UserError: the folder holds no finished study, or the server cannot be reached.
    """
    try:
        uses = json.loads((study / RESULT).read_text())["uses_artifact"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{study} holds no finished study ({RESULT}): {err}") from err
    import wandb

    try:
        api = wandb.Api()
        entity = entity or api.default_entity
        for folder, reference in uses.items():
            artifact = api.artifact(f"{entity}/{project}/{reference}", type="model")
            api.run(f"{entity}/{project}/{Path(folder).name}").use_artifact(artifact)
            print(f"{Path(folder).name} uses {reference}")
    except (wandb.errors.CommError, wandb.errors.UsageError, ValueError) as err:
        raise UserError(
            f"W&B could not link the study's runs ({err}). "
            f"Sync them first: wandb sync {study}/runs/*/*/wandb/offline-run-*"
        ) from err
    return len(uses)


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
