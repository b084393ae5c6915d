"""Weights & Biases logging that works with or without an account, and the config saved with the run."""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only


def wandb_configured() -> bool:
    """Whether this machine has a W&B API key (environment or ``~/.netrc``), without contacting the server."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return (
            netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1]) is not None
        )
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` with the project's defaults, recording offline when no account is set up.

    With no API key and ``WANDB_MODE`` unset, the run is written locally (``<save_dir>/wandb/offline-run-*``)
    instead of stopping at a login prompt; W&B prints the ``wandb sync`` line that uploads it later.
    ``WANDB_MODE=offline`` or ``disabled`` are obeyed as they are.

    Args:
        project: W&B project.
        name: run name (the configs use the experiment's name).
        group: runs of one study (the split CIFAR-10 phases and their baseline share one).
        job_type: role of the run within its group (``phase1``, ``phase2-transfer``, ...).
        tags: e.g. the dataset and the model.
        save_dir: where the local run files go.
        offline: force offline; ``None`` decides as above.
        **kwargs: passed on to Lightning's ``WandbLogger`` and ``wandb.init``.
    """

    def __init__(
        self,
        project: str = "lightning-cnn",
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        save_dir: str = ".",
        offline: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if offline is None:
            offline = os.environ.get("WANDB_MODE") is None and not wandb_configured()
            if offline and getattr(rank_zero_only, "rank", 0) == 0:
                hint = f"wandb sync {Path(save_dir).resolve() / 'wandb' / 'offline-run-*'}"
                print(f"W&B: no API key found, recording offline. Upload later with `{hint}`.", file=sys.stderr)
        # Absolute: wandb's service process outlives a run and resolves relative paths against its own cwd.
        save_dir = str(Path(save_dir).resolve())
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(
            project=project, name=name, group=group, job_type=job_type, tags=tags, save_dir=save_dir,
            offline=offline, **kwargs,
        )  # fmt: skip


class SaveConfigToRun(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback`` that also puts the resolved config into the W&B run.

    The config file still goes to the log folder (overwritten by a rerun, not refused); with a W&B logger the
    whole resolved config becomes the run's config and the file is saved with the run. Only rank 0 does this,
    so DDP makes one W&B run, not one per process.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, LightningWandbLogger) and not _disabled():
                experiment = logger.experiment
                experiment.config.update(self.config.as_dict(), allow_val_change=True)
                config_path = Path(trainer.log_dir or ".") / self.config_filename
                if config_path.is_file():
                    experiment.save(str(config_path), base_path=str(config_path.parent), policy="now")


def _disabled() -> bool:
    return os.environ.get("WANDB_MODE") == "disabled"
