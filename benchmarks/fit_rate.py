"""Training images/s of a short ``lightning-cnn fit`` run, as the run report measures it (shared by benchmarks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fit_images_per_second(config: str, data_dir: str, batches: int, *extra: str, wandb: bool = False) -> float:
    """One epoch of ``batches`` training batches of ``configs/<config>.yaml``, no validation, no test.

    Args:
        config: the config's name.
        data_dir: data root.
        batches: training batches to run.
        *extra: more CLI arguments.
        wandb: keep the config's W&B logger (offline, into the run's temporary folder); else no logger.
    """
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "lightning_cnn", "fit", "--config", str(CONFIGS / f"{config}.yaml"),
            f"--data.data_dir={Path(data_dir).resolve()}", "--trainer.max_epochs=1",
            f"--trainer.limit_train_batches={batches}", "--trainer.limit_val_batches=0", "--test_after_fit=false",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out}/run",
            f"--checkpoint.dirpath={out}/ckpt", *extra,
        ]  # fmt: skip
        cmd.append(f"--trainer.logger.init_args.save_dir={out}/run" if wandb else "--trainer.logger=false")
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        subprocess.run(cmd, check=True, capture_output=True, cwd=out, env=env)
        return float(json.loads((Path(out) / "run" / "summary.json").read_text())["train_images_per_second"])
