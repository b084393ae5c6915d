"""Reading a checkpoint the user named, with one clear error for each way it can be wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_cnn.errors import CheckpointError


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
