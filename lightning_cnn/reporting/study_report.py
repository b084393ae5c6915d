"""A study's figures over seeds, its report (``study.json``, ``study.md``, ``study.png``) and its W&B summary run.

The split CIFAR-10 transfer protocol is reported as continual-learning libraries do (Avalanche's accuracy
matrix, forgetting, forward transfer), plus task- and class-incremental accuracy, trainable parameters and
training time; any other config by its test figures. Every figure is given as mean ± sample std over seeds.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_cnn.errors import UserError
from lightning_cnn.files import write_atomically, write_json
from lightning_cnn.reporting.record import RunRecord, markdown_table
from lightning_cnn.reporting.wandb_logger import wandb_disabled

SPLIT = "split_cifar10"
PHASE1 = "phase1"
METHODS = ("transfer", "finetune", "scratch")  # phase-2 methods, in report order
USES_PHASE1 = ("transfer", "finetune")  # the methods built from the phase-1 checkpoint
RESULT = "study.json"


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation of the values that exist (``std`` 0 for one value), and the values."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "values": list(values)}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "values": list(values)}


def time_to_reach(record: RunRecord, target: float) -> tuple[int | None, float | None]:
    """Epochs and training seconds a run took to reach ``target`` validation accuracy; ``None`` if it never did."""
    for epochs, accuracy, seconds in record.curve():
        if accuracy >= target:
            return epochs, None if seconds != seconds else seconds  # NaN: the run did not record its time
    return None, None


def split_figures(phase1: RunRecord, phase2: dict[str, RunRecord]) -> dict[str, Any]:
    """The transfer study's figures for one seed.

    Args:
        phase1: the phase-1 run's record.
        phase2: the record of each method in :data:`METHODS`.

    The accuracy matrix ``R[i][j]`` is the accuracy on phase ``j+1``'s test classes after training phase
    ``i+1``. ``R[0][1]`` is not defined (phase 1 has no head for phase-2 classes). ``R[1][0]`` is the phase-1
    head on the network phase 2 leaves: the shared backbone for transfer and fine-tuning; from scratch trains a
    second network and leaves the phase-1 network as it was, so its ``R[1][0]`` is ``R[0][0]`` (with twice the
    parameters kept). Forgetting is the drop the phase-2 run measured on its phase-1 head (before and after,
    one computation), so ``R[1][0] = R[0][0] - forgetting``.
    """
    r11 = phase1.test("test/acc")
    scratch = phase2["scratch"]
    scratch_curve = scratch.curve()
    scratch_final = scratch_curve[-1][1] if scratch_curve else None
    figures: dict[str, Any] = {}
    for method in METHODS:
        run = phase2[method]
        r22 = run.test("test/acc")
        forgetting: float | None = 0.0
        if method != "scratch":  # before and after by one computation in the run (PhaseOneRetention): exact
            before, after = run.test("test/phase1_acc_before"), run.test("test/phase1_acc")
            forgetting = None if before is None or after is None else before - after
        r21 = None if r11 is None or forgetting is None else r11 - forgetting
        epochs, seconds = time_to_reach(run, scratch_final) if scratch_final is not None else (None, None)
        figures[method] = {
            "accuracy_matrix": [[r11, None], [r21, r22]],
            "forgetting": forgetting,
            "forward_transfer": None if r22 is None else r22 - (scratch.test("test/acc") or 0.0),
            "task_incremental_acc": None if r21 is None or r22 is None else (r21 + r22) / 2,
            "class_incremental_acc": run.test("test/all_classes_acc"),
            "epochs_to_scratch_final": epochs,
            "seconds_to_scratch_final": seconds,
            "trainable_parameters": run.summary.get("trainable_parameters"),
            "train_seconds": run.summary.get("train_seconds"),
            "epochs": run.summary.get("epochs"),
        }
    return figures


def config_figures(record: RunRecord) -> dict[str, Any]:
    """A single config's figures for one seed: its test figures, training time and epochs."""
    test = {k: float(v) for k, v in record.summary.get("test", {}).items()}
    return {"test": test, "train_seconds": record.summary.get("train_seconds"), "epochs": record.summary.get("epochs")}


def aggregate(per_seed: list[dict[str, Any]]) -> Any:
    """Mean ± std over seeds of every number in the per-seed figures, keeping their nesting."""
    first = per_seed[0]
    if isinstance(first, dict):
        return {key: aggregate([figures[key] for figures in per_seed]) for key in first}
    if isinstance(first, list):
        return [aggregate([figures[i] for figures in per_seed]) for i in range(len(first))]
    return mean_std(per_seed)


def write_report(study: Path, plan: dict[str, Any], runs: dict[int, dict[str, RunRecord]], group: str) -> str:
    """Write ``study.json``, ``study.md`` and ``study.png`` and log them to a W&B run; return the Markdown."""
    from lightning_cnn.reporting.plots import plot_study

    target, seeds = plan["target"], plan["seeds"]
    if target == SPLIT:
        per_seed = [split_figures(runs[s][PHASE1], {m: runs[s][m] for m in METHODS}) for s in seeds]
    else:
        per_seed = [config_figures(runs[s]["run"]) for s in seeds]
    folders = {s: {k: record.folder for k, record in by_key.items()} for s, by_key in runs.items()}
    result = {
        **plan,
        "group": group,
        "runs": {str(s): {k: str(f) for k, f in by_key.items()} for s, by_key in folders.items()},
        "per_seed": {str(s): figures for s, figures in zip(seeds, per_seed, strict=True)},
        "mean_std": aggregate(per_seed),
        "uses_artifact": {str(folders[s][m]): f"model-{runs[s][PHASE1].name}:best" for s in seeds for m in USES_PHASE1}
        if target == SPLIT
        else {},
    }
    plot_study(result, runs, study / "study.png")
    markdown = split_markdown(result) if target == SPLIT else config_markdown(result)
    write_atomically(study / "study.md", markdown)
    write_json(study / RESULT, result)  # last: its presence marks the study finished
    logged = [f for by_key in folders.values() for f in by_key.values() if f is not None and (f / "wandb").is_dir()]
    if logged and not wandb_disabled():  # the runs kept W&B runs: the study's summary run joins them
        _log_study_to_wandb(study, result, group)
    return markdown


def _pm(figure: dict[str, Any], scale: float = 100.0, digits: int = 2, unit: str = "") -> str:
    if figure["mean"] is None:
        return "-"
    return f"{figure['mean'] * scale:.{digits}f} ± {figure['std'] * scale:.{digits}f}{unit}"


def split_markdown(result: dict[str, Any]) -> str:
    agg, seeds = result["mean_std"], result["seeds"]
    header = ["phase 2 by", "R[1][1]", "R[2][1]", "R[2][2]", "forgetting", "forward transfer", "task-IL",
              "class-IL", "epochs to scratch's final val acc", "seconds to it", "trainable", "train s"]  # fmt: skip
    rows = []
    for method in METHODS:
        m = agg[method]
        matrix = m["accuracy_matrix"]
        rows.append([method, _pm(matrix[0][0]), _pm(matrix[1][0]), _pm(matrix[1][1]), _pm(m["forgetting"]),
                     _pm(m["forward_transfer"]), _pm(m["task_incremental_acc"]), _pm(m["class_incremental_acc"]),
                     _pm(m["epochs_to_scratch_final"], 1, 1), _pm(m["seconds_to_scratch_final"], 1, 0),
                     _pm(m["trainable_parameters"], 1, 0), _pm(m["train_seconds"], 1, 0)])  # fmt: skip
    per_seed = [[str(seed), *(f"{result['per_seed'][str(seed)][m]['accuracy_matrix'][1][1] * 100:.2f}"
                              for m in METHODS)] for seed in seeds]  # fmt: skip
    return "\n".join([
        f"# Split CIFAR-10 transfer study ({len(seeds)} seeds: {', '.join(map(str, seeds))})", "",
        "Mean ± sample std over seeds, accuracies in %. R[i][j]: accuracy on phase j's test classes after phase "
        "i (phase 1: classes 0-4, phase 2: classes 5-9). From scratch trains a second network and keeps the "
        "phase-1 one, so it forgets nothing at twice the parameters.", "",
        markdown_table(header, rows), "Per seed (R[2][2], phase-2 test accuracy, %):", "",
        markdown_table(["seed", *METHODS], per_seed),
        "Forward transfer: phase-2 test accuracy minus from scratch's at the same budget. Epochs and seconds: "
        "training until the validation accuracy first reaches the from-scratch run's final one (- when it never "
        "does).", "",
    ])  # fmt: skip


def config_markdown(result: dict[str, Any]) -> str:
    agg, seeds = result["mean_std"], result["seeds"]
    rows = []
    for key, figure in sorted(agg["test"].items()):
        scale, unit = (1.0, "") if key.endswith("loss") else (100.0, " (%)")  # losses are not shares
        values = ", ".join("-" if v is None else f"{v * scale:.2f}" for v in figure["values"])
        rows.append([f"{key}{unit}", _pm(figure, scale), values])
    for key in ("train_seconds", "epochs"):
        rows.append([key, _pm(agg[key], 1, 0), ", ".join("-" if v is None else f"{v:.0f}" for v in agg[key]["values"])])
    title = f"# {Path(result['target']).stem} over {len(seeds)} seeds ({', '.join(map(str, seeds))})"
    return "\n".join([title, "", markdown_table(["figure", "mean ± std", "per seed"], rows)])


def _log_study_to_wandb(study: Path, result: dict[str, Any], group: str) -> None:
    """The study's table and picture into a W&B run of job type ``study`` in the runs' group."""
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
