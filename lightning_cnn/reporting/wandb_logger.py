"""Weights & Biases logging that works with or without an account, and the config saved with the run."""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from lightning_cnn.files import write_atomically
from lightning_cnn.training.runs import Run, process_rank, run_folder_of

INIT_TIMEOUT = 30  # seconds W&B may try to reach its server before the run goes on offline
# Lightning's WandbLogger's own parameters; the rest of its **kwargs are wandb.init's
LIGHTNING_PARAMETERS = frozenset(inspect.signature(LightningWandbLogger.__init__).parameters) - {"self", "kwargs"}


def wandb_configured() -> bool:
    """Whether W&B finds credentials for its server, asked of W&B itself without contacting the server.

    W&B looks in ``WANDB_API_KEY``, an identity token file, its settings files and the netrc file (``~/.netrc``,
    ``~/_netrc`` or ``$NETRC``) under the host it is configured for (``wandb login --host``, ``WANDB_BASE_URL``,
    or its default cloud host, which ``wandb login`` writes the key under and which changed in wandb 0.31).
    """
    import wandb

    settings = wandb.setup().settings
    silent = settings.silent
    # wandb.login's "logged in as" line asks the server for the user's name, which waits for an unreachable
    # server; silent leaves only that out (verify=False: the key is not checked there either)
    settings.silent = True
    try:
        return wandb.login(verify=False, prompt=False)
    except Exception as err:  # AuthenticationError: a key of the wrong form, or a broken netrc file
        print(f"W&B: {err}", file=sys.stderr)
        return False
    finally:
        settings.silent = silent


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` with the project's defaults, recording offline when no account is set up.

    With no API key and ``WANDB_MODE`` unset, the run is written locally (``<save_dir>/wandb/offline-run-*``)
    instead of stopping at a login prompt; W&B prints the ``wandb sync`` line that uploads it later.
    ``WANDB_MODE=offline`` or ``disabled`` are obeyed as they are. When the server cannot be reached within
    ``INIT_TIMEOUT`` seconds (``WANDB_INIT_TIMEOUT`` overrides it), the run is recorded offline instead.

    The W&B run is started here with ``wandb.init`` (Lightning's logger then logs into it, as it does into a
    run its user started), so that the mode, the timeout and the offline fallback are W&B's public settings of
    this one run: nothing process-wide (Lightning's ``offline=True`` sets ``WANDB_MODE`` for the whole process).

    Args:
        project: W&B project.
        name: run name (the CLI uses the experiment's name).
        group: runs of one study (the split CIFAR-10 phases and their baseline share one).
        job_type: role of the run within its group (``phase1``, ``phase2-transfer``, ...).
        tags: e.g. the dataset and the model.
        save_dir: where the local run files go (the CLI uses the run folder); ``None``: the working directory.
        offline: force offline; ``None`` decides as above.
        id: the W&B run id (the CLI uses the run id, so a resumed run continues its W&B run).
        resume: W&B's resume policy (the CLI sets ``"allow"`` when it resumes a run).
        checkpoint_artifacts: when a fit succeeds, log the run's best and last checkpoints as versions of the
            model artifact ``model-<run id>`` (aliases ``best`` and ``latest``), not every epoch's. Lightning's
            ``log_model=True`` takes whichever checkpoint callback saved last, which here is the last-epoch one.
        **kwargs: passed on to ``wandb.init``.
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
        given = dict(project=project, name=name, group=group, job_type=job_type, tags=tags, save_dir=save_dir,
                     offline=offline, id=id, resume=resume, checkpoint_artifacts=checkpoint_artifacts)  # fmt: skip
        self.given = {**given, **kwargs}  # what for_run() builds the run's logger from
        # Absolute: wandb's service process outlives a run and resolves relative paths against its own cwd.
        save_dir = str(Path(save_dir or ".").resolve())
        if process_rank() == 0:  # only rank 0 makes the W&B run; the others must not create folders
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        self.no_key = offline is None and os.environ.get("WANDB_MODE") is None and not wandb_configured()
        # LightningCLI passes every parameter of Lightning's logger and of wandb.init, unset ones as None: W&B
        # gets what is set of its own
        init = {k: v for k, v in kwargs.items() if v is not None and k not in LIGHTNING_PARAMETERS}
        init.update(project=project, name=name, group=group, job_type=job_type, tags=tags, dir=save_dir, id=id)
        init["resume"] = resume
        init["mode"] = "offline" if offline or self.no_key else os.environ.get("WANDB_MODE")
        if init.get("settings") is None and init["mode"] != "offline" and not os.environ.get("WANDB_INIT_TIMEOUT"):
            import wandb

            # W&B waits 90 s for an unreachable server by default; training should not wait that long
            init["settings"] = wandb.Settings(init_timeout=INIT_TIMEOUT)
        self.init_kwargs = init
        super().__init__(project=project, name=name, save_dir=save_dir, id=id, **kwargs)
        self.checkpoint_artifacts = checkpoint_artifacts
        self._run_started = False
        self._checkpoint_dir: Path | None = None
        self._artifacts_logged = False

    def for_run(self, run: Run) -> WandbLogger:
        """This logger's settings for ``run``: files in its folder, its id (a resumed run continues its W&B run),
        its group when it has one, named after its experiment unless a name was given."""
        return type(self)(**{**self.given, "save_dir": str(run.folder), "id": run.id,
                             "name": self.given.get("name") or run.experiment,
                             "group": run.group or self.given.get("group"),
                             "resume": "allow" if run.resumed else self.given.get("resume")})  # fmt: skip

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        if not self.checkpoint_artifacts:
            super().after_save_checkpoint(checkpoint_callback)
        elif checkpoint_callback.dirpath:
            self._checkpoint_dir = Path(checkpoint_callback.dirpath)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status != "success" or self._checkpoint_dir is None or self._artifacts_logged or wandb_disabled():
            return
        import wandb

        with tracking("the checkpoints as a model artifact"):
            for file, aliases in (("best.ckpt", ["best"]), ("last.ckpt", ["latest"])):
                path = self._checkpoint_dir / file
                if path.is_file():
                    artifact = wandb.Artifact(f"model-{self.experiment.id}", type="model", metadata={"file": file})
                    artifact.add_file(str(path), name="model.ckpt")  # Lightning's name: both conventions match
                    self.experiment.log_artifact(artifact, aliases=aliases)
        self._artifacts_logged = True

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The W&B run; when the server cannot be reached, an offline run instead, so training goes on."""
        if not self._run_started:
            self._run_started = True
            self._start_run()
        with warnings.catch_warnings():  # Lightning's note that it logs into the open run: the one started here
            warnings.filterwarnings("ignore", message="There is a wandb run already in progress")
            return super().experiment

    def _start_run(self) -> None:
        import wandb

        if wandb.run is not None and wandb.run.disabled and self.init_kwargs["mode"] != "disabled":
            wandb.run.finish()  # a disabled stand-in left behind: not a run to log into
        if wandb.run is not None:
            return  # the caller's own run (a sweep agent's function): Lightning logs into it, as it intends
        hint = f"wandb sync {Path(self.init_kwargs['dir']) / 'wandb' / 'offline-run-*'}"
        if self.no_key:
            print(f"W&B: no API key found, recording offline. Upload later with `{hint}`.", file=sys.stderr)
        try:
            run = wandb.init(**self.init_kwargs)
        except Exception as err:  # wandb raises CommError, UsageError, TimeoutError, ... for a server it lacks
            if self.init_kwargs["mode"] in ("offline", "disabled"):
                raise
            print(f"W&B: the server could not be reached ({type(err).__name__}); recording offline instead. "
                  f"Upload later with `{hint}`.", file=sys.stderr)  # fmt: skip
            wandb.teardown()  # the failed attempt still holds the run id in W&B's service process
            run = wandb.init(**{**self.init_kwargs, "mode": "offline", "settings": None})
        # the x-axis Lightning defines for a run it starts itself
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)


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
        phase1 = network.checkpoint_path if isinstance(network, TransferNet) else None
        reference = checkpoint_artifact(phase1) if phase1 is not None else None
        if reference is None or not trainer.is_global_zero or wandb_disabled():
            return
        for logger in trainer.loggers:
            if isinstance(logger, LightningWandbLogger):
                with tracking("which checkpoint the run starts from"):
                    run = logger.experiment
                    run.config.update({"uses_artifact": reference}, allow_val_change=True)
                    if not run.offline:
                        logger.use_artifact(reference, artifact_type="model")


class SaveConfigToRun(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback`` that saves the config into the run folder and the W&B run.

    ``config.yaml`` in the run folder reruns the experiment: the settings the run trained with, without its
    placement (no run id; for a fit no resume checkpoint), so ``fit --config runs/<exp>/<id>/config.yaml``
    starts a new run beside it. With a W&B logger the whole resolved config, and where the run lives (run id,
    folder, the checkpoint it loaded), become the W&B run's config, and the file is saved with the run. Only rank
    0 does this, so DDP makes one W&B run, not one per process.

    Lightning's own ``setup`` asks ``trainer.log_dir``, a collective, which then runs on every rank; the W&B part
    runs on rank 0 alone and must not call one (an earlier version read ``trainer.log_dir`` there, and DDP hung).

    Args:
        run: the run whose folder gets the file.
    """

    def __init__(self, *args: Any, run: Run, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})
        self.run = run

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Rank 0 only (Lightning calls this on global rank zero): no collective calls in here.
        config_path = self.run.folder / self.config_filename
        rerun = self.config.clone()
        rerun.run_id = None
        if stage == "fit":
            rerun.ckpt_path = None
        write_atomically(config_path, self.parser.dump(rerun, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, LightningWandbLogger) and not wandb_disabled():
                with tracking("the run's config"):
                    experiment = logger.experiment
                    placed = {
                        "run_id": self.run.id,
                        "run_folder": str(self.run.folder),
                        "ckpt_path": self.run.ckpt_path,
                    }
                    experiment.config.update({**self.config.as_dict(), **placed}, allow_val_change=True)
                    # A copy inside the W&B run folder (saving a file from outside it makes W&B warn on every
                    # run), under a name of its own: W&B keeps its run config in files/config.yaml
                    inside = Path(experiment.dir) / "lightning_cnn_config.yaml"
                    shutil.copyfile(config_path, inside)
                    experiment.save(str(inside), base_path=experiment.dir, policy="now")


@contextlib.contextmanager
def tracking(what: str) -> Iterator[None]:
    """W&B calls that must never fail a training: an error (no network, a read-only home where W&B stages its
    files, a full disk) becomes one line, and the run goes on without that record."""
    try:
        yield
    except Exception as err:  # W&B raises PermissionError, OSError, CommError, ... from its own internals
        detail = " ".join(str(err).split())[:300]
        print(f"W&B: could not record {what} ({type(err).__name__}: {detail}); the run goes on without it.",
              file=sys.stderr)  # fmt: skip


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


def wandb_disabled() -> bool:
    """Whether W&B is switched off for this process (``WANDB_MODE=disabled``)."""
    return os.environ.get("WANDB_MODE") == "disabled"
