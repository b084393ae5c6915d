"""Where data lives: the data root a user sets once or per run, and a writable cache beside it."""

from __future__ import annotations

import os
import stat
import tempfile
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

    ``$LIGHTNING_CNN_CACHE``, else ``$XDG_CACHE_HOME/lightning_cnn``, else ``~/.cache/lightning_cnn``. When that
    cannot be written (a read-only home on a cluster node), a per-user folder in the system's temp folder, said
    once: without a cache every run would decode all images again.
    """
    if env := os.environ.get(CACHE_ENV):
        chosen = Path(env).expanduser()
    else:
        chosen = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning_cnn"
    if is_writable(chosen):
        return chosen
    fallback = _private_folder(Path(tempfile.gettempdir()) / f"lightning_cnn-cache-{os.getuid()}")
    if chosen not in _TOLD:
        _TOLD.add(chosen)
        print(f"lightning-cnn: the cache folder {chosen} cannot be written; caching in {fallback} instead "
              f"(set {CACHE_ENV} to choose).")  # fmt: skip
    return fallback


def _private_folder(wanted: Path) -> Path:
    """``wanted`` if it is (or can be made) this user's own folder that no one else can write, else a new one.

    The shared temp folder is everyone's: another user could create ``wanted`` first and plant a decoded data
    set there, which a run would then train and test on. So the folder must be a real folder (no link), owned
    by this user, writable by no one else; otherwise a fresh private folder is used (decoded again once).
    """
    try:
        wanted.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError:
        return Path(tempfile.mkdtemp(prefix="lightning_cnn-cache-"))
    info = wanted.lstat()
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022:
        return wanted
    fresh = Path(tempfile.mkdtemp(prefix="lightning_cnn-cache-"))
    print(f"lightning-cnn: {wanted} is not a private folder of this user (another user may write there); "
          f"caching in {fresh} instead.")  # fmt: skip
    return fresh


_TOLD: set[Path] = set()


def is_writable(path: Path) -> bool:
    """Whether files can be created in ``path`` (or, when it does not exist yet, in its nearest parent)."""
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    return os.access(path, os.W_OK | os.X_OK)
