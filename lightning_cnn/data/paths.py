"""Where data lives: the data root a user sets once or per run, and a writable cache beside it."""

from __future__ import annotations

import os
from pathlib import Path

from lightning_cnn.errors import DataError

__all__ = ["CACHE_ENV", "DATA_ENV", "DataError", "cache_dir", "is_writable", "resolve_data_dir"]

DATA_ENV = "LIGHTNING_CNN_DATA"
CACHE_ENV = "LIGHTNING_CNN_CACHE"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The data root: ``data_dir`` if given, else ``$LIGHTNING_CNN_DATA``, else ``./data``.

    Example:
        >>> resolve_data_dir("/datasets").as_posix()
        '/datasets'
    """
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or "data"
    return Path(chosen).expanduser()


def cache_dir() -> Path:
    """A writable folder for decoded arrays and downloads made when the data root is read-only.

    ``$LIGHTNING_CNN_CACHE``, else ``$XDG_CACHE_HOME/lightning_cnn``, else ``~/.cache/lightning_cnn``.
    """
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "lightning_cnn"


def is_writable(path: Path) -> bool:
    """Whether files can be created in ``path`` (or, when it does not exist yet, in its nearest parent)."""
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    return os.access(path, os.W_OK | os.X_OK)
