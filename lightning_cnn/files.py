"""Writing files so that a reader sees the old file or the new one, never a part: the one way every file of a
run, a study or a command's output is written (checkpoints, summaries, tables, pictures, predictions)."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from lightning_cnn.errors import UserError


class WriteError(UserError, OSError):
    """A file could not be written (full disk, lost mount, no permission); the previous file of that name is intact."""


def write_atomically(path: Path, write: Callable[[BinaryIO], object] | bytes | str) -> None:
    """Write ``path`` into a temporary file in its folder, fsync it, then rename it over ``path``.

    Args:
        path: the file to write; its folder is created.
        write: the content (bytes or text), or a function that writes it into the binary file it is given.

    Raises:
        WriteError: the write failed; the previous ``path``, if any, is left as it was, and no partial file stays.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_atomically(folder / "a.txt", "hello")
        >>> (folder / "a.txt").read_text(), sorted(p.name for p in folder.iterdir())
        ('hello', ['a.txt'])
    """
    content = write.encode() if isinstance(write, str) else write
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, bytes):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a run's files follow the umask, as open() does
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        why = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise WriteError(
            f"Could not write {path}: {why}. The previous {path.name} (if any) is kept. Free space in "
            f"{path.parent} or choose another place (--trainer.default_root_dir for runs), then run again "
            "(a training resumes with --ckpt_path last)."
        ) from err


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON with sorted keys, written atomically."""
    write_atomically(path, json.dumps(data, indent=2, sort_keys=True))


def _umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting it back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX: the folder's entry is data of the folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)
