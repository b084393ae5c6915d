"""DDP on CPU (gloo, 2 processes): it trains, and its test figures equal one process's on the same data."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakedata import make_image_folder

from lightning_cnn.cli import run
from lightning_cnn.experiments import CONFIG_DIR

CONFIG = str(CONFIG_DIR / "cifar10_base.yaml")


@pytest.mark.ddp
def test_ddp_two_processes_train_and_match_single_process_test_figures(tmp_path: Path) -> None:
    # 10 classes x 3 test images = 30, batch 4: ranks get 15 each in uneven batches (4, 4, 4, 3)
    root = make_image_folder(tmp_path / "cifar10", per_class_train=8, per_class_test=3)
    common = [f"--data.data_dir={root}", "--data.batch_size=4", "--trainer.accelerator=cpu",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
    ddp = subprocess.run(
        [sys.executable, "-m", "lightning_cnn", "fit", "--config", CONFIG, *common, "--trainer.devices=2",
         "--trainer.strategy=ddp", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
         "--trainer.check_val_every_n_epoch=1", f"--trainer.default_root_dir={tmp_path / 'runs'}",
         "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'logs'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    ddp_test = {k: float(v) for row in rows for k, v in row.items() if k.startswith("test/") and v}
    assert len(list((tmp_path / "logs").rglob("metrics.csv"))) == 1  # one logger run, not one per process

    runs = tmp_path / "runs"
    single = run(["test", "--config", CONFIG, *common, "--trainer.devices=1", "--trainer.logger=false",
                  f"--trainer.default_root_dir={runs}", f"--ckpt_path={runs / 'latest'}"])  # fmt: skip
    figures = {k: float(v) for k, v in single.trainer.callback_metrics.items() if k.startswith("test/")}
    assert figures.keys() == ddp_test.keys() and "test/acc" in figures
    for key, value in figures.items():
        assert ddp_test[key] == pytest.approx(value, abs=1e-6), key
