"""Callbacks the CLI adds to every run."""

from __future__ import annotations

import csv
import faulthandler
import io
import random
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_cnn.errors import TrainingDiverged, UserError
from lightning_cnn.files import WriteError, write_atomically
from lightning_cnn.models import ImageClassifier
from lightning_cnn.training.runs import Run, slurm_job_id


class PredictionCSVWriter(BasePredictionWriter):
    """Writes ``predict`` results as CSV rows ``file, predicted_class, probability``, in the input's order.

    The file is written beside its final name and moved into place when prediction ends, so an
    interrupted run never leaves a half-written CSV over an earlier one. Under DDP every process predicts a
    share of the images; rank 0 gathers all the shares and writes the one file.

    Args:
        output: path of the CSV file (its folder is created).
    """

    def __init__(self, output: str = "predictions.csv") -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self._rows: list[tuple[int, str, str, float]] = []  # (index in the dataset, file, class, probability)

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
        names = pl_module.class_names if isinstance(pl_module, ImageClassifier) else None
        probability, index = torch.as_tensor(prediction).max(dim=1)
        # the dataset indices Lightning tracks for predictions (each process's share under DDP)
        positions = list(batch_indices) if batch_indices is not None else []
        for k, (path, p, i) in enumerate(zip(batch[1], probability.tolist(), index.tolist(), strict=True)):
            position = positions[k] if k < len(positions) else len(self._rows)
            self._rows.append((int(position), str(path), names[i] if names else str(i), p))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self._rows
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            shares: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, rows)  # a collective: every rank takes part
            rows = [row for share in shares for row in share]
        if trainer.global_rank != 0:
            return
        rows = sorted(rows, key=lambda row: row[0])
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["file", "predicted_class", "probability"])
        writer.writerows((path, name, f"{p:.6f}") for _, path, name, p in rows)
        write_atomically(self.output, text.getvalue())
        print(f"Wrote {len(rows)} predictions to {self.output}")


class RNGState(Callback):
    """Saves the global torch, numpy and Python RNG states in each checkpoint and restores them on resume.

    Lightning does not do this itself. The data path draws its randomness from ``(seed, epoch)`` and needs
    none of it, but dropout does: with it, a resumed run continues bit-for-bit like an uninterrupted one.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            # as a tensor: numpy arrays would stop the checkpoint loading with weights_only=True
            "numpy": [kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        python = state_dict["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class ShareRun(Callback):
    """Gives every process of a distributed run rank 0's run: the one channel by which the others learn it.

    Only rank 0 decides and creates a run folder; the processes Lightning starts for DDP, torchrun's, SLURM's
    and other nodes' ranks hold a placeholder until set-up, where every rank takes part in this broadcast
    (Lightning's own ``ModelCheckpoint`` broadcasts its folder the same way, and does so itself). Only rank 0
    writes into the run folder; the others keep it for the messages they print.

    Args:
        run: this process's run, updated in place (the callbacks and the logger that write hold the same object).
    """

    def __init__(self, run: Run) -> None:
        self.run = run

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            self.run.id, folder = trainer.strategy.broadcast((self.run.id, str(self.run.folder)), src=0)
            self.run.folder = Path(folder)


class ValidateFinalEpoch(Callback):
    """Validates a run's last epoch too when it validates only every few epochs.

    A recipe that validates once, at its end (``check_val_every_n_epoch`` equal to ``max_epochs``), would not
    validate at all when run shorter (``--trainer.max_epochs 2``: no validation figures, no best checkpoint),
    and run longer it would keep and test an earlier epoch's checkpoint. Lightning has no setting for "and at
    the last epoch", so this sets ``check_val_every_n_epoch`` to 1 for the final epoch only.
    """

    def __init__(self) -> None:
        self._every: int | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        every, last = trainer.check_val_every_n_epoch, trainer.max_epochs
        if every is not None and every > 1 and last is not None and last > 0 and trainer.current_epoch == last - 1:
            self._every, trainer.check_val_every_n_epoch = every, 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._every is not None:
            trainer.check_val_every_n_epoch, self._every = self._every, None


class StopOnNonFiniteLoss(Callback):
    """Stops the run, naming the epoch and step, as soon as the training loss is NaN or infinite.

    Raising before the epoch ends means no checkpoint of the diverged weights is written: ``best.ckpt`` and
    ``last.ckpt`` stay those of the last good epoch.
    """

    def __init__(self) -> None:
        self._batch = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # Checked before backward, so the bad step never reaches the weights. Under DDP every rank decides
        # together: a rank that stopped alone would leave the others waiting in the gradient all-reduce.
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            directory = _checkpoint_dir(trainer)
            kept = directory is not None and any(Path(directory).glob("*.ckpt"))
            raise TrainingDiverged(
                f"The training loss became {float(loss.detach().float())} at epoch {trainer.current_epoch}, "
                f"step {trainer.global_step} (batch {self._batch}). Training stopped; "
                + (f"the checkpoints of the last good epoch are kept in {directory}. " if kept else
                   "no epoch had finished, so no checkpoint was kept (nor the run's folder). ")
                + "Lower the learning rate or add gradient clipping (trainer.gradient_clip_val), then "
                + ("resume or restart." if kept else "restart.")
            )  # fmt: skip


class InterruptCheckpoint(Callback):
    """On SIGTERM (pre-emption) or an error inside training, saves ``last-interrupted.ckpt`` beside the others.

    Its name contains "last", so ``fit --ckpt_path last`` resumes from it when it is the newest. Nothing is
    saved by a diverged run (its weights are not worth resuming from), after a failed write (a full disk: the
    save would fail too, and its error would hide the first one, which names the file that failed), by a run
    that failed before its first step (it would make the next resume start from scratch), in the validation
    of a fit (Lightning would resume such a checkpoint past the validation, which then never happens: the
    epoch's ``last.ckpt`` comes after it, so the previous one resumes and the epoch is trained again), or,
    under DDP, for an error other than SIGTERM: saving waits for every rank, and an error on one rank leaves
    the others elsewhere.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        directory = _checkpoint_dir(trainer)
        # during fit, validation included: SIGTERM often lands in the validation that follows an epoch
        if (
            isinstance(exception, TrainingDiverged | WriteError)
            or directory is None
            or trainer.state.fn != TrainerFn.FITTING
        ):
            return
        if trainer.global_step == 0:
            return
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            return
        if trainer.validating:  # Lightning resumes a checkpoint saved mid-validation past that validation
            print(f"Interrupted ({type(exception).__name__}) in the epoch's validation; a resume (--ckpt_path last) "
                  "trains this epoch again from the last epoch's checkpoint, then validates it.")  # fmt: skip
            return
        path = Path(directory) / "last-interrupted.ckpt"
        trainer.save_checkpoint(path)
        print(f"Interrupted ({type(exception).__name__}); saved {path}. Resume with: fit ... --ckpt_path last")


class HangWatchdog(Callback):
    """Ends a distributed run that stopped making progress, with the stack of every thread of every rank.

    A DDP rank waiting in a collective that another rank never reaches waits forever, and a cluster job burns
    its allocation. Each rank arms a timer when it starts and re-arms it at every batch; if ``timeout``
    seconds pass without one, it prints the stacks of all its threads and exits with status 1. The ranks stuck
    with it do the same, so every rank's stack is shown. Python's ``faulthandler`` does the waiting and the
    dump from a C thread, so it works while the interpreter is blocked in a collective. Single-process runs
    are left alone.

    Args:
        timeout: seconds without progress before the run ends; 0 turns the watchdog off.
    """

    def __init__(self, timeout: float = 300.0) -> None:
        if timeout < 0:
            raise UserError(f"hang_watchdog.timeout must be 0 (off) or a number of seconds, got {timeout}")
        self.timeout = timeout
        self._armed = False

    def arm(self, trainer: L.Trainer) -> None:
        """(Re-)start the timer of a distributed run."""
        if self.timeout and trainer.world_size > 1:
            faulthandler.dump_traceback_later(self.timeout, exit=True)
            self._armed = True

    def disarm(self) -> None:
        if self._armed:
            faulthandler.cancel_dump_traceback_later()
            self._armed = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.arm(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.disarm()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.disarm()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.arm(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.arm(trainer)

    def on_test_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.arm(trainer)

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.arm(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.arm(trainer)  # checkpointing and validation follow


class SlurmRequeue(Callback):
    """SLURM's warning before the time limit (``#SBATCH --signal=SIGUSR1@90``), handled by every rank together.

    The signal only sets a flag. At the next training step boundary the ranks agree that one of them was
    signalled, all save ``hpc_ckpt_N.ckpt`` into the run folder, rank 0 asks ``scontrol requeue`` for the job,
    and the run stops with status 143; the requeued job finds the checkpoint in the same run folder (its name
    comes from the job id) and Lightning resumes from it. Written instead of Lightning's own handler, which
    saves inside the signal handler on each rank: a save waits for every rank, so ranks signalled at different
    points of a step waited for each other until the hang watchdog ended the job.

    Args:
        run: the run whose folder takes the hpc checkpoint (where Lightning looks for one when the job restarts).
        signum: the signal SLURM is told to send.
    """

    def __init__(self, run: Run, signum: int = signal.SIGUSR1) -> None:
        self.run = run
        self.signum = signum
        self.requested = False
        self.active = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and slurm_job_id() and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._note)
            self.active = True

    def _note(self, signum: int, frame: object) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not self.active:
            return
        requested = self.requested
        if trainer.world_size > 1:  # every rank takes part, every step, so the decision is the same everywhere
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        trainer.save_checkpoint(hpc_checkpoint_path(self.run.folder))
        if trainer.is_global_zero:
            job = str(slurm_job_id())
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            print(f"Saved an hpc checkpoint in {self.run.folder}; scontrol requeue {job}: "
                  f"{'done' if done.returncode == 0 else done.stderr.strip() or done.returncode}")  # fmt: skip
        raise SIGTERMException()  # stop as a pre-empted run does (status 143)


def hpc_checkpoint_path(folder: Path) -> Path:
    """The next ``hpc_ckpt_<n>.ckpt`` of ``folder``: the names Lightning resumes a requeued job from (the newest n)."""
    numbers = [int(n) for p in folder.glob("hpc_ckpt_*.ckpt") if (n := p.stem.rsplit("_", 1)[1]).isdigit()]
    return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def _checkpoint_dir(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    return str(callback.dirpath) if isinstance(callback, ModelCheckpoint) and callback.dirpath else None
