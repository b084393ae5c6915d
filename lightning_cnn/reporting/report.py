"""What a run leaves beside its checkpoints for people and for ``lightning-cnn compare``.

Its :class:`~lightning_cnn.reporting.record.RunRecord` (``summary.json``, ``history.csv``),
``learning_curves.png`` and, after test, ``confusion_matrix.png``, ``per_class.csv`` and ``test_samples.png``.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from lightning_cnn import __version__
from lightning_cnn.data import ResidentDataModule
from lightning_cnn.errors import UserError
from lightning_cnn.models import ImageClassifier
from lightning_cnn.reporting.record import RunRecord
from lightning_cnn.reporting.wandb_logger import tracking, wandb_disabled
from lightning_cnn.training.runs import Run


def _float(value: Any) -> float:
    return float(value.detach().cpu()) if isinstance(value, torch.Tensor) else float(value)


class RunReport(L.Callback):
    """Records a run's figures, timing and per-epoch history, and writes them into the run folder.

    Args:
        run: the run it reports (the CLI hands it over); ``None``: the run folder is ``trainer.default_root_dir``
            and the run is named after it, for a Trainer of your own.

    Its history and
    timing travel in the checkpoints (``state_dict``), so a run resumed with ``--ckpt_path``, even from the
    mid-epoch checkpoint an interruption leaves, reports all its epochs and its training time and images
    over every part, not just the last.

    Written here rather than taken from Lightning: its ``Timer`` times the "train" stage with the validation
    inside it and keeps only the latest validation's duration, so it cannot give training time without
    validation, which the speed figures (images/s) need; a ``CSVLogger`` writes per-step rows and, on a resume,
    starts from what it holds in memory, while ``history.csv`` is one row per epoch that survives a resume.
    """

    def __init__(self, run: Run | None = None) -> None:
        self.run = run
        self.summary: dict[str, Any] = {}
        self.history: list[dict[str, float]] = []
        self._train_seconds = 0.0
        self._train_images = 0
        self._fit_seconds_before = 0.0  # wall time of the parts of this run before a resume
        self._epoch_start: float | None = None  # set while a training epoch runs
        # this process's first training step, from its epoch's start: torch.compile and first-kernel set-up
        self._first_step_seconds: float | None = None
        self._val_start = 0.0
        self._fit_start = 0.0
        self._val: dict[str, float] = {}

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        now = time.perf_counter()
        in_epoch = 0.0 if self._epoch_start is None else now - self._epoch_start
        return {
            "history": [dict(row) for row in self.history],
            "train_seconds": self._train_seconds + in_epoch,
            "train_images": self._train_images,
            "fit_seconds": self._fit_seconds_before + now - self._fit_start,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after setup() and, depending on the strategy, before or after
        # on_fit_start; setup() is where the counters start, so restoring adds to them in either order.
        self.history = [dict(row) for row in state_dict["history"]] + self.history
        self._train_seconds += float(state_dict["train_seconds"])
        self._train_images += int(state_dict["train_images"])
        self._fit_seconds_before += float(state_dict["fit_seconds"])

    # ------------------------------------------------------------------ timing
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.history, self._train_seconds, self._train_images, self._fit_seconds_before = [], 0.0, 0, 0.0
            self._epoch_start, self._first_step_seconds = None, None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        folder = self._folder(trainer)
        self.summary = {
            "run": self.run.id if self.run else folder.name,
            "experiment": self.run.experiment if self.run else folder.parent.name,
            "versions": {"lightning_cnn": __version__, "torch": torch.__version__, "lightning": L.__version__},
            "parameters": sum(p.numel() for p in pl_module.parameters()),
            "trainable_parameters": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "precision": str(trainer.precision),
            "devices": trainer.num_devices,
            "accelerator": type(trainer.accelerator).__name__,
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed mid-epoch goes on with that epoch without on_train_epoch_start
        self._epoch_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._first_step_seconds is None and self._epoch_start is not None:
            self._first_step_seconds = time.perf_counter() - self._epoch_start
        batch = args[1]
        self._train_images += len(batch[1]) * trainer.world_size

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            if self._epoch_start is not None:  # validation is not training time
                self._epoch_start += time.perf_counter() - self._val_start
            metrics = trainer.callback_metrics
            self._val = {k: _float(metrics[k]) for k in ("val/loss", "val/acc", "val/f1_weighted") if k in metrics}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_start is not None:
            self._train_seconds += time.perf_counter() - self._epoch_start
        self._epoch_start = None
        metrics = trainer.callback_metrics
        row = {"epoch": float(trainer.current_epoch), "step": float(trainer.global_step), **self._val}
        row["train_seconds"] = round(self._train_seconds, 3)  # so far: when a study's runs reached an accuracy
        for key in ("train/loss_epoch", "train/acc"):
            if key in metrics:
                row[key.replace("_epoch", "")] = _float(metrics[key])
        self._val = {}  # epochs without validation get no (stale) validation figures
        self.history.append(row)

    # ------------------------------------------------------------------ writing
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.summary.update(
            epochs=trainer.current_epoch,
            fit_seconds=round(self._fit_seconds_before + time.perf_counter() - self._fit_start, 2),
            train_seconds=round(self._train_seconds, 2),
            train_images=self._train_images,
            train_images_per_second=round(self._train_images / max(self._train_seconds, 1e-9), 1),
            # part of train_seconds; with torch.compile mostly compile time, which time targets report apart
            first_step_seconds=round(self._first_step_seconds or 0.0, 3),
        )
        record = RunRecord(self._folder(trainer), self.summary, self.history)
        record.write()
        from lightning_cnn.reporting.plots import plot_learning_curves

        plot_learning_curves(record, self._folder(trainer) / "learning_curves.png")

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_cnn.reporting.plots import plot_confusion_matrix, plot_test_samples, write_per_class_table

        folder = self._folder(trainer)
        summary = self.summary or _read_or_new(folder).summary  # a test-only run adds to the run's own figures
        metrics = trainer.callback_metrics
        summary["test"] = {k: round(_float(v), 6) for k, v in metrics.items() if k.startswith("test/")}
        RunRecord(folder, summary).write()  # the history stays as the fit wrote it
        if not isinstance(pl_module, ImageClassifier) or "test" not in pl_module.confusion:
            return
        confusion, names = pl_module.confusion["test"], list(pl_module.class_names)
        present = confusion.sum(dim=1) + confusion.sum(dim=0) > 0
        plot_confusion_matrix(confusion, names, folder / "confusion_matrix.png", present)
        write_per_class_table(
            pl_module.per_class["test"], confusion.sum(dim=1), names, folder / "per_class.csv", present
        )
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if isinstance(datamodule, ResidentDataModule) and datamodule.test_split is not None:
            plot_test_samples(pl_module, datamodule, datamodule.test_split, names, folder / "test_samples.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and not wandb_disabled():
                with tracking("the test's pictures and tables"):
                    _log_to_wandb(logger, summary, confusion, names, present, folder)

    def _folder(self, trainer: L.Trainer) -> Path:
        return self.run.folder if self.run else Path(trainer.default_root_dir)


def _log_to_wandb(
    logger: WandbLogger,
    summary: dict[str, Any],
    confusion: torch.Tensor,
    names: list[str],
    present: torch.Tensor,
    folder: Path,
) -> None:
    """The pictures and the per-class table of a test, and the run's summary figures, into its W&B run."""
    import wandb

    keep = present.nonzero().flatten().tolist()
    labels = [names[i] if i < len(names) else str(i) for i in keep]
    index = {c: k for k, c in enumerate(keep)}
    y_true = [index[t] for t in keep for p in keep for _ in range(int(confusion[t, p]))]
    y_pred = [index[p] for t in keep for p in keep for _ in range(int(confusion[t, p]))]
    with open(folder / "per_class.csv") as f:
        rows: list[list[Any]] = list(csv.reader(f))
    pictures = {"confusion_matrix": "confusion_matrix_image", "test_samples": "samples", "learning_curves": "curves"}
    for name, key in pictures.items():
        if (folder / f"{name}.png").is_file():
            logger.log_image(f"test/{key}", [str(folder / f"{name}.png")])
    logger.log_table("test/per_class", columns=list(rows[0]), data=rows[1:])
    # W&B's interactive confusion-matrix chart has no WandbLogger method
    chart = wandb.plot.confusion_matrix(y_true=y_true, preds=y_pred, class_names=labels)
    logger.experiment.log({"test/confusion_matrix": chart})
    logger.experiment.summary.update({k: v for k, v in summary.items() if isinstance(v, int | float | str)})


def _read_or_new(folder: Path) -> RunRecord:
    """The record a test-only run adds its figures to: the run's own when it has one, else a new one."""
    try:
        return RunRecord.read(folder)
    except UserError:
        return RunRecord(folder, {"run": folder.name})
