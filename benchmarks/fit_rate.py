"""Training images/s of a short ``lightning-cnn fit`` run, as the run report measures it (shared by benchmarks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def fit_images_per_second(config: str, data_dir: str, batches: int, *extra: str, wandb: bool = False) -> float:
    """Training images/s of :func:`fit_summary`'s run, its first step included."""
    return float(fit_summary(config, data_dir, batches, *extra, wandb=wandb)["train_images_per_second"])


def steady_images_per_second(summary: dict) -> float:
    """Training images/s after the first step (its one-time set-up: kernel selection, compile)."""
    first = summary["train_images"] / max(summary["epochs"], 1) / summary["batches"]
    return (summary["train_images"] - first) / max(summary["train_seconds"] - summary["first_step_seconds"], 1e-9)


def fit_summary(config: str, data_dir: str, batches: int, *extra: str, wandb: bool = False) -> dict:
    """One epoch of ``batches`` training batches of the shipped config ``config``, no validation, no test.

    Args:
        config: the config's name.
        data_dir: data root.
        batches: training batches to run.
        *extra: more CLI arguments.
        wandb: keep the config's W&B logger (offline, into the run's temporary folder); else no logger.
    """
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "lightning_cnn", "fit", "--config", config,
            f"--data.data_dir={Path(data_dir).resolve()}", "--trainer.max_epochs=1",
            f"--trainer.limit_train_batches={batches}", "--trainer.limit_val_batches=0", "--test_after_fit=false",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out}/runs", *extra,
        ]  # fmt: skip
        if not wandb:
            cmd.append("--trainer.logger=false")
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        subprocess.run(cmd, check=True, capture_output=True, cwd=out, env=env)
        summary = json.loads(Path(out, "runs", "latest", "summary.json").read_text())
        return {**summary, "batches": batches}
