"""Run folders: every run of an experiment gets a folder of its own, and ``latest`` names the newest finished fit.

Layout, under an experiment folder (``runs/<experiment>`` unless ``--trainer.default_root_dir`` says otherwise)::

    runs/mnist/20261129-101512-3fa9c1/     one run: checkpoints/, config.yaml, summary.json, pictures, wandb/
    runs/mnist/20261129-113040-b71e02/     a rerun, a sweep trial, a smoke run: always a new folder
    runs/mnist/latest -> 20261129-101512-3fa9c1   switched atomically when a fit finishes

A run id sorts by start time and ends in random digits, so runs started in the same second (sweep agents, two
terminals) still get different folders; the folder is created exclusively, never reused. The run id is also
the run's W&B id, so a resumed run continues its W&B run.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightning_cnn.errors import CheckpointError, ConfigError

LATEST = "latest"
CHECKPOINTS = "checkpoints"
RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")  # a folder name in the experiment's folder, no path
# --ckpt_path values Lightning resolves itself; anything else is a path
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
UNTRAINED = "untrained"  # validate/test/predict --ckpt_path untrained: the network as initialised, on purpose


def process_rank() -> int:
    """This process's global rank as the launcher set it in the environment (0 when not distributed).

    Read before the process group exists, so that only rank 0 creates folders. Lightning reads it from the
    launcher's variables (``RANK``, ``SLURM_PROCID``, ``LOCAL_RANK``...) when it is imported.
    """
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def new_run_id() -> str:
    """A run id: start time to the second, then 6 random hex digits (``20261129-101512-3fa9c1``)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def create_run_folder(experiment_dir: Path, run_id: str | None = None, exact: bool = False) -> Path:
    """Create a new, empty run folder under ``experiment_dir`` (exclusively: never an existing one).

    Args:
        experiment_dir: where the experiment's runs go.
        run_id: the name wanted; ``None``: a new run id.
        exact: ``run_id`` or nothing (a W&B sweep trial's id); otherwise a taken name gets a random suffix.

    Raises:
        ConfigError: an ``exact`` name is taken, or the folder cannot be created.
    """
    for attempt in range(20):
        name = run_id or new_run_id()
        if run_id and attempt and not exact:
            name = f"{run_id}-{secrets.token_hex(3)}"
        folder = experiment_dir / name
        try:
            folder.mkdir(parents=True, exist_ok=False)
            return folder
        except FileExistsError:
            if exact:
                raise ConfigError(
                    f"The run folder {folder} exists already. Resume it with --ckpt_path {folder}, or choose "
                    "another --run_id (or unset WANDB_RUN_ID) to start a new run."
                ) from None
        except OSError as err:
            raise ConfigError(
                f"Cannot create the run folder {folder} ({err.strerror or err}). Choose a writable place with "
                "--trainer.default_root_dir."
            ) from err
    raise ConfigError(f"Could not find a free run id under {experiment_dir}.")  # 20 collisions of 2^24 ids


def slurm_job_id() -> str | None:
    """The SLURM job this process belongs to, as ``scontrol`` names it (``<array job>_<task>`` for arrays)."""
    job = os.environ.get("SLURM_JOB_ID")
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if job and array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return job


def slurm_run_id(experiment_dir: Path) -> str | None:
    """The run id of a SLURM job: the same for all its tasks and after a requeue, different per experiment.

    ``slurm-<job id>-<6 hex digits of the experiment folder>``: a requeued job reruns the same command under
    the same job id, and finds the ``hpc_ckpt_*.ckpt`` that :class:`SlurmRequeue` saved in this folder. The
    experiment part keeps the W&B run ids of two experiments trained in one job apart.
    """
    job = slurm_job_id()
    if not job:
        return None
    where = hashlib.sha1(str(experiment_dir.resolve()).encode()).hexdigest()[:6]
    return f"slurm-{job}-{where}"


def run_folders(experiment_dir: Path) -> list[Path]:
    """The experiment's run folders, oldest first (run ids sort by start time)."""
    if not experiment_dir.is_dir():
        return []
    return sorted(p for p in experiment_dir.iterdir() if p.is_dir() and not p.is_symlink() and p.name != LATEST)


def run_folder_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint file lies in (``<run>/checkpoints/x.ckpt``), or ``None``."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None


def newest_resumable(*runs: Path) -> Path | None:
    """The newest ``last*.ckpt`` of the runs that loads; a damaged one is passed over with a line saying so."""
    from lightning_cnn.checkpoints import read_checkpoint  # torch: only where a checkpoint is read

    candidates = [p for run in runs for p in (run / CHECKPOINTS).glob("last*.ckpt")]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            read_checkpoint(path, "Checkpoint", missing_hint="", unreadable_hint="")
        except CheckpointError as err:
            print(f"lightning-cnn: skipping {path}: {err}")
            continue
        return path
    return None


def best_checkpoint(run: Path) -> Path:
    """The checkpoint a finished run is evaluated with: ``best.ckpt``, else its newest loadable ``last*.ckpt``.

    Raises:
        CheckpointError: the run has neither.
    """
    best = run / CHECKPOINTS / "best.ckpt"
    found = best if best.is_file() else newest_resumable(run)
    if found is None:
        raise CheckpointError(f"The run {run} has no checkpoint (no {CHECKPOINTS}/best.ckpt or last.ckpt).")
    return found


def point_latest(run: Path) -> None:
    """Make ``<experiment>/latest`` name ``run``, atomically: readers see the old run or the new one, never none.

    A ``latest`` that is no link (a file or folder of the user's) is left as it is, with a line saying so.
    """
    link = run.parent / LATEST
    if link.exists() and not link.is_symlink():
        print(f"lightning-cnn: {link} is not a link this package made; left as it is (the run is {run}).")
        return
    tmp = run.parent / f".{LATEST}-{secrets.token_hex(4)}"
    os.symlink(run.name, tmp)
    os.replace(tmp, link)


@dataclass
class Run:
    """One run, decided once before anything is built, and handed to what writes into it.

    The checkpoint callbacks, the logger, the run report and the saved config all get this object; under DDP the
    other processes learn rank 0's run at set-up (:class:`~lightning_cnn.training.callbacks.ShareRun`).

    Attributes:
        experiment: the experiment's name (W&B run name; ``runs/<experiment>``).
        id: the run id: the run folder's name and the W&B run id, so a resumed run continues its W&B run.
        folder: the run folder.
        ckpt_path: the checkpoint the command loads (``last`` or a run folder resolved to a file), or ``None``.
        resumed: ``folder`` is an earlier run that this fit continues.
        created: this process created ``folder`` (it is removed again if the command fails before a checkpoint).
        group: the W&B group of the run (a study's runs share one), or ``None`` for the logger's own setting.
    """

    experiment: str
    id: str
    folder: Path
    ckpt_path: str | None = None
    resumed: bool = False
    created: bool = False
    group: str | None = None
    lock: int | None = field(default=None, repr=False)  # the open lock file while this process trains the run

    @property
    def checkpoint_dir(self) -> Path:
        return self.folder / CHECKPOINTS

    def hold(self) -> None:
        """Take the run folder's lock, so that no other process trains it at the same time (a second ``--ckpt_path
        last`` of the same run would write into the same folder and W&B run); the lock goes with the process.

        Raises:
            ConfigError: another process holds it.
        """
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"The run {self.folder} is being trained by another process right now; wait for it to "
                              "end, or start a new run (without --ckpt_path).") from None  # fmt: skip
        self.lock = fd

    def release(self) -> None:
        if self.lock is not None:
            os.close(self.lock)  # closing the file gives the lock up
            self.lock = None

    def discard_if_unstarted(self) -> None:
        """Remove the run folder this process created if it holds no checkpoint: a run that failed before training
        leaves nothing for a resume, the latest pointer or ``compare`` to pick up."""
        if self.created and self.folder.is_dir() and not any(self.folder.rglob("*.ckpt")):
            shutil.rmtree(self.folder, ignore_errors=True)


def decide_run(
    subcommand: str,
    experiment: str,
    experiment_dir: Path,
    ckpt_path: str | None = None,
    run_id: str | None = None,
    group: str | None = None,
) -> Run:
    """Decide the run of ``subcommand`` and resolve ``ckpt_path`` (``last``, a run folder, a file).

    ``fit`` resumes in the folder of the run it continues (``--ckpt_path last``: the experiment's newest run with
    a loadable ``last*.ckpt``; a run folder; a checkpoint inside a run folder) and starts a new folder otherwise.
    ``validate``, ``test`` and ``predict`` always get a new folder; given a run folder (or ``latest``) they load
    its best checkpoint. Only rank 0 creates a folder; under DDP the other ranks get a placeholder that
    :class:`~lightning_cnn.training.callbacks.ShareRun` replaces by rank 0's run at set-up (a SLURM job's ranks
    all know its folder by name). A new run is named ``run_id`` when given (``--run_id``, else a W&B sweep
    trial's ``WANDB_RUN_ID``), and that name must be new.
    """
    rank = process_rank()
    folder: Path | None = None
    if subcommand != "fit":
        ckpt_path = _evaluated_checkpoint(subcommand, experiment_dir, ckpt_path)
    elif ckpt_path == UNTRAINED:  # what fit starts from anyway
        ckpt_path = None
    if ckpt_path is not None and ckpt_path not in CKPT_KEYWORDS and Path(ckpt_path).is_dir():
        given = Path(ckpt_path).resolve()
        if subcommand == "fit":
            last = newest_resumable(given)
            if last is None:
                raise CheckpointError(f"--ckpt_path {ckpt_path}: the run has no loadable last*.ckpt to resume from.")
            folder, ckpt_path = given, str(last)
        else:
            ckpt_path = str(best_checkpoint(given))
    elif subcommand == "fit" and ckpt_path == "last":
        # As Lightning's own "last": the newest by time of the experiment's loadable last*.ckpt files.
        last = newest_resumable(*run_folders(experiment_dir))
        if last is not None:
            folder, ckpt_path = run_folder_of(last), str(last)
        else:
            print(f"lightning-cnn: no run under {experiment_dir} has a checkpoint to resume; starting a new run.")
            ckpt_path = None
    elif subcommand == "fit" and ckpt_path is not None and Path(ckpt_path).is_file():
        folder = run_folder_of(Path(ckpt_path).resolve())
    if folder is not None:
        resumed = Run(experiment, folder.name, folder, ckpt_path, resumed=True, group=group)
        if rank == 0:
            resumed.hold()
            print(f"lightning-cnn: resuming run {folder} from {ckpt_path}")
        return resumed
    slurm = slurm_run_id(experiment_dir)
    if slurm and subcommand == "fit" and list((experiment_dir / slurm).glob("hpc_ckpt_*.ckpt")):
        # a requeued SLURM job: Lightning resumes from the hpc checkpoint SlurmRequeue saved there
        requeued = Run(experiment, slurm, experiment_dir / slurm, ckpt_path, resumed=True, group=group)
        if rank == 0:
            requeued.hold()
        return requeued
    if rank != 0:  # a placeholder, replaced by rank 0's run at set-up; nothing is created here
        return Run(experiment, f".rank-{rank}-pending", experiment_dir / f".rank-{rank}-pending", ckpt_path)
    wanted = run_id or os.environ.get("WANDB_RUN_ID")
    if wanted and not RUN_ID.fullmatch(wanted):
        source = "--run_id" if run_id else "WANDB_RUN_ID"
        raise ConfigError(f"{source} {wanted!r} is no plain name: use letters, digits, '.', '_' and '-', not first a "
                          "'.' (no '/', no '..'); the run's folder goes under the experiment's folder.")  # fmt: skip
    created = create_run_folder(experiment_dir, wanted or slurm, exact=bool(wanted))
    run = Run(experiment, created.name, created, ckpt_path, created=True, group=group)
    run.hold()
    return run


def _evaluated_checkpoint(subcommand: str, experiment_dir: Path, ckpt_path: str | None) -> str | None:
    """What ``validate``, ``test`` or ``predict`` load: a trained model, unless told ``--ckpt_path untrained``.

    ``last``: the experiment's newest loadable ``last*.ckpt``; ``best``: its latest finished run's best one.

    Raises:
        CheckpointError: no checkpoint was named (an untrained network would be evaluated without a word), or
            ``last``/``best`` find none.
    """
    if ckpt_path == UNTRAINED:
        return None
    if ckpt_path is None:
        raise CheckpointError(f"{subcommand} needs a trained model: pass --ckpt_path with a run folder "
                              f"({experiment_dir / LATEST}), a .ckpt file or last; --ckpt_path {UNTRAINED} "
                              "evaluates the network as initialised.")  # fmt: skip
    if ckpt_path not in ("last", "best"):
        return ckpt_path
    found = newest_resumable(*run_folders(experiment_dir)) if ckpt_path == "last" else None
    if ckpt_path == "best" and (experiment_dir / LATEST).is_dir():
        found = best_checkpoint(experiment_dir / LATEST)
    if found is None:
        raise CheckpointError(f"--ckpt_path {ckpt_path}: no run under {experiment_dir} has such a checkpoint. "
                              "Train one first (lightning-cnn fit), or pass a run folder or a .ckpt file.")  # fmt: skip
    return str(found)


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there, or raise a ConfigError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"Cannot write to the output folder {folder} ({err.strerror or err}). Choose a writable place with "
            "--trainer.default_root_dir and --checkpoint.dirpath."
        ) from err
