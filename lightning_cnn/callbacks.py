"""Callbacks the CLI adds to every run."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionCSVWriter(BasePredictionWriter):
    """Writes ``predict`` results as CSV rows ``file, predicted_class, probability``.

    The file is written beside its final name and moved into place when prediction ends, so an
    interrupted run never leaves a half-written CSV over an earlier one.

    Args:
        output: path of the CSV file (its folder is created).
    """

    def __init__(self, output: str = "predictions.csv") -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self._rows: list[tuple[str, str, float]] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        names = getattr(pl_module, "class_names", None)
        probability, index = torch.as_tensor(prediction).max(dim=1)
        for path, p, i in zip(batch[1], probability.tolist(), index.tolist(), strict=True):
            self._rows.append((str(path), names[i] if names else str(i), p))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        self.output.parent.mkdir(parents=True, exist_ok=True)
        partial = self.output.with_name(f".{self.output.name}.partial")
        with open(partial, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "predicted_class", "probability"])
            writer.writerows((path, name, f"{p:.6f}") for path, name, p in self._rows)
        os.replace(partial, self.output)
        print(f"Wrote {len(self._rows)} predictions to {self.output}")
