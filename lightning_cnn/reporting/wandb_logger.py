"""Weights & Biases logging that works with or without an account, and the config saved with the run."""

from __future__ import annotations

import netrc
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from lightning_cnn.training.runs import process_rank, run_folder_of

INIT_TIMEOUT = 30  # seconds W&B may try to reach its server before the run goes on offline


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
        name: run name (the CLI uses the experiment's name).
        group: runs of one study (the split CIFAR-10 phases and their baseline share one).
        job_type: role of the run within its group (``phase1``, ``phase2-transfer``, ...).
        tags: e.g. the dataset and the model.
        save_dir: where the local run files go (the CLI sets the run folder); ``None``: the working directory.
        offline: force offline; ``None`` decides as above.
        id: the W&B run id (the CLI uses the run folder's name, so a resumed run continues its W&B run).
        resume: W&B's resume policy (the CLI sets ``"allow"`` when it resumes a run).
        checkpoint_artifacts: when a fit succeeds, log the run's best and last checkpoints as versions of the
            model artifact ``model-<run id>`` (aliases ``best`` and ``latest``), not every epoch's. Lightning's
            ``log_model=True`` takes whichever checkpoint callback saved last, which here is the last-epoch one.
        **kwargs: passed on to Lightning's ``WandbLogger`` and ``wandb.init``.
    """

    def __init__(
        self,
        project: str = "lightning-cnn",
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        save_dir: str | None = None,
        offline: bool | None = None,
        id: str | None = None,
        resume: str | None = None,
        checkpoint_artifacts: bool = False,
        **kwargs: Any,
    ) -> None:
        # Absolute: wandb's service process outlives a run and resolves relative paths against its own cwd.
        save_dir = str(Path(save_dir or ".").resolve())
        rank_zero = process_rank() == 0
        if offline is None:
            offline = os.environ.get("WANDB_MODE") is None and not wandb_configured()
            if offline and rank_zero:
                hint = f"wandb sync {Path(save_dir) / 'wandb' / 'offline-run-*'}"
                print(f"W&B: no API key found, recording offline. Upload later with `{hint}`.", file=sys.stderr)
        if rank_zero:  # only rank 0 makes the W&B run; the others must not create folders
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        if resume is not None:
            kwargs["resume"] = resume
        mode = "offline" if offline else os.environ.get("WANDB_MODE")
        if mode and kwargs.get("mode") is None:  # LightningCLI passes mode=None from wandb.init's signature
            # W&B reads WANDB_MODE once per process; given per run, each in-process run obeys it as a new process would
            kwargs["mode"] = mode
        if not offline and "settings" not in kwargs and not os.environ.get("WANDB_INIT_TIMEOUT"):
            import wandb

            # W&B waits 90 s for an unreachable server by default; training should not wait that long
            kwargs["settings"] = wandb.Settings(init_timeout=INIT_TIMEOUT)
        super().__init__(
            project=project, name=name, group=group, job_type=job_type, tags=tags, save_dir=save_dir,
            offline=offline, id=id, **kwargs,
        )  # fmt: skip
        self.checkpoint_artifacts = checkpoint_artifacts
        # Lightning passes anonymous=None on, and wandb warns on every run that the setting has no effect
        self._wandb_init.pop("anonymous", None)
        self._checkpoint_dir: Path | None = None
        self._artifacts_logged = False

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        if not self.checkpoint_artifacts:
            super().after_save_checkpoint(checkpoint_callback)
        elif checkpoint_callback.dirpath:
            self._checkpoint_dir = Path(checkpoint_callback.dirpath)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status != "success" or self._checkpoint_dir is None or self._artifacts_logged or _disabled():
            return
        import wandb

        for file, aliases in (("best.ckpt", ["best"]), ("last.ckpt", ["latest"])):
            path = self._checkpoint_dir / file
            if path.is_file():
                artifact = wandb.Artifact(f"model-{self.experiment.id}", type="model", metadata={"file": file})
                artifact.add_file(str(path), name="model.ckpt")  # Lightning's name, so both conventions match
                self.experiment.log_artifact(artifact, aliases=aliases)
        self._artifacts_logged = True

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The W&B run; when the server cannot be reached, an offline run instead, so training goes on."""
        stale = current_wandb_run()
        disabled_here = self._wandb_init.get("mode") == "disabled"
        if self._experiment is None and stale is not None and stale.disabled and not disabled_here:
            stale.finish()  # Lightning would log into any open wandb.run, even a disabled stand-in left behind
        try:
            return LightningWandbLogger.experiment.fget(self)  # type: ignore[attr-defined]
        except Exception as err:  # wandb raises CommError, UsageError, TimeoutError, ... for a server it lacks
            if self._offline or self._experiment is not None or os.environ.get("WANDB_MODE") == "disabled":
                raise
            hint = f"wandb sync {Path(self._save_dir or '.') / 'wandb' / 'offline-run-*'}"
            print(f"W&B: the server could not be reached ({type(err).__name__}); recording offline instead. "
                  f"Upload later with `{hint}`.", file=sys.stderr)  # fmt: skip
            import wandb

            wandb.teardown()  # the failed attempt still holds the run id in W&B's service process
            self._offline = True
            self._wandb_init["mode"] = "offline"
            self._wandb_init.pop("settings", None)
            return LightningWandbLogger.experiment.fget(self)  # type: ignore[attr-defined]


def checkpoint_artifact(checkpoint: str | Path) -> str | None:
    """The W&B artifact reference of a run's checkpoint (``model-<run id>:best`` or ``:latest``), if it is one."""
    path = Path(checkpoint)
    run = run_folder_of(path)
    if run is None or path.name not in ("best.ckpt", "last.ckpt"):
        return None
    return f"model-{run.name}:{'best' if path.name == 'best.ckpt' else 'latest'}"


class UseCheckpointArtifact(L.Callback):
    """Declares in the W&B run that this run starts from another run's checkpoint, for W&B's lineage graph.

    For a :class:`TransferNet` built from ``runs/<phase 1>/<run id>/checkpoints/best.ckpt`` (logged by that run
    with ``checkpoint_artifacts: true``), this run *uses* ``model-<run id>:best``. W&B refuses to use an
    artifact in an offline run, so an offline run records the reference in its config (``uses_artifact``)
    instead; ``lightning-cnn study`` lists those references in ``study.json``.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_cnn.models import ImageClassifier, TransferNet

        network = pl_module.network if isinstance(pl_module, ImageClassifier) else None
        reference = checkpoint_artifact(network.checkpoint_path) if isinstance(network, TransferNet) else None
        if reference is None or not trainer.is_global_zero or _disabled():
            return
        for logger in trainer.loggers:
            if isinstance(logger, LightningWandbLogger):
                run = logger.experiment
                run.config.update({"uses_artifact": reference}, allow_val_change=True)
                if not run.settings._offline:
                    logger.use_artifact(reference, artifact_type="model")


class SaveConfigToRun(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback`` that saves the config into the run folder and the W&B run.

    ``config.yaml`` goes to the run folder (``trainer.default_root_dir``, one per run, so nothing is overwritten
    but a resumed run's own file). With a W&B logger the whole resolved config becomes the run's config and the
    file is saved with the run. Only rank 0 does this, so DDP makes one W&B run, not one per process.

    Lightning's own ``setup`` asks ``trainer.log_dir``, a collective, which then runs on every rank; the W&B part
    runs on rank 0 alone and must not call one (an earlier version read ``trainer.log_dir`` there, and DDP hung).
    """

    def __init__(self, *args: Any, rerun_config: Namespace | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})
        self.rerun_config = rerun_config

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Rank 0 only (Lightning calls this on global rank zero): no collective calls in here.
        config_path = Path(trainer.default_root_dir) / self.config_filename
        config_path.parent.mkdir(parents=True, exist_ok=True)
        # The file reruns the experiment (rerun_config: without this run's folders); W&B gets the run as placed.
        saved = self.rerun_config if self.rerun_config is not None else self.config
        self.parser.save(saved, str(config_path), skip_unset=False, overwrite=True, multifile=self.multifile)
        for logger in trainer.loggers:
            if isinstance(logger, LightningWandbLogger) and not _disabled():
                experiment = logger.experiment
                experiment.config.update(self.config.as_dict(), allow_val_change=True)
                # A copy inside the W&B run folder (saving a file from outside it makes W&B warn on every run),
                # under a name of its own: W&B keeps its run config in files/config.yaml
                inside = Path(experiment.dir) / "lightning_cnn_config.yaml"
                shutil.copyfile(config_path, inside)
                experiment.save(str(inside), base_path=experiment.dir, policy="now")


def current_wandb_run() -> Any:
    """The process's W&B run (``wandb.run``), without importing wandb when nothing has."""
    wandb = sys.modules.get("wandb")
    return None if wandb is None else wandb.run


def finish_wandb_run_started_since(before: Any, failed: bool) -> None:
    """Finish the W&B run this command started, as the end of the ``lightning-cnn`` process would.

    Lightning's ``WandbLogger`` reuses ``wandb.run`` when one exists, so a run left open by one in-process call
    would swallow the next call's logging. A run the caller had started before (``before``) is left to them.

    ``finish`` returns before W&B's service process has written the run out: it closes the run's
    ``run-*.wandb`` file later, so reading the run just after could find it still empty (seen: one in ~30
    in-process resumes read no config). Where W&B was not in use before the command, ``wandb.teardown`` then
    waits for the service to write everything and stop, as the process's exit does.
    """
    after = current_wandb_run()
    if after is not None and after is not before:
        after.finish(exit_code=1 if failed else 0)
        if before is None:
            import wandb

            wandb.teardown()


def _disabled() -> bool:
    return os.environ.get("WANDB_MODE") == "disabled"
