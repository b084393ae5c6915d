"""Checkpoints: reading one the user named (one clear error for each way it can be wrong), and writing them
atomically where they land."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lightning_cnn.errors import CheckpointError
from lightning_cnn.files import write_atomically


def first_mismatch(err: RuntimeError) -> str:
    """The first line of what torch's ``load_state_dict(strict=True)`` found wrong (it lists every key on its own
    line after a header), for a one-line message."""
    return next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err)[:200])


def read_checkpoint(path: str | Path, role: str, missing_hint: str, unreadable_hint: str) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a checkpoint file, which must hold a dict.

    Args:
        path: the file.
        role: how the user gave it, for the messages (``"--ckpt_path"``, ``"Transfer checkpoint"``).
        missing_hint: what to do when the file does not exist.
        unreadable_hint: what to do when it is not a readable checkpoint (truncated, not PyTorch, ...).

    Raises:
        CheckpointError: the file is missing, unreadable, or holds no dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{role} {path} does not exist. {missing_hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
        raise CheckpointError(
            f"{role} {path} is not a readable PyTorch checkpoint ({type(err).__name__}: {str(err)[:200]}); it may "
            f"be truncated. {unreadable_hint}"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{role} {path} holds no state dict. {unreadable_hint}")
    return state


def check_checkpoint(path: Path) -> None:
    """Raise a CheckpointError unless ``path`` is a complete checkpoint that loads with ``weights_only=True``."""
    state = read_checkpoint(
        path,
        "--ckpt_path",
        missing_hint="Pass a .ckpt file, or 'last' to resume.",
        unreadable_hint="Resume from another file (e.g. best.ckpt or last.ckpt beside it).",
    )
    if "state_dict" not in state:
        raise CheckpointError(f"--ckpt_path {path} is not a Lightning checkpoint (no state_dict).")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` writing each checkpoint beside its final name, then renaming it.

    Lightning's own atomic save writes through an fsspec transaction: the temporary file goes to the system's
    temp folder and is then copied into the run folder, so with the run folder on another filesystem a full
    disk leaves a truncated file under the real name; and a save started by a signal handler (SLURM's SIGUSR1
    requeue) while another save is in its transaction crashes on the shared transaction. Here each save has a
    temporary file of its own in the destination folder, flushed and fsync'ed before ``os.replace`` swaps it
    in, so a reader sees the old checkpoint or the new one, never a part.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote storage: fsspec's way
        # Serialized in memory first (the checkpoints here are a few MB): torch's writer fails on a full disk with
        # a RuntimeError that escaped the atomic write (naming no file, leaving its .partial); a plain write's
        # OSError is reported by write_atomically, which removes the partial file.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(Path(str(path).removeprefix("file://")), buffer.getvalue())
