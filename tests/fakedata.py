"""Small fake datasets in every on-disk layout the loaders accept (as torchvision's dataset tests do)."""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _balanced_labels(n: int, classes: int = 10) -> np.ndarray:
    return np.arange(n) % classes


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def make_mnist_idx(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = False, seed: int = 0) -> Path:
    """torchvision's layout: ``root/MNIST/raw/*-ubyte``. Returns ``root``."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", _images(rng, n, (28, 28)), gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", _balanced_labels(n), gz)
    return root


def make_cifar_batches(root: Path, per_batch: int = 20, n_test: int = 20, seed: int = 0) -> Path:
    """torchvision's layout: ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]
    for name, n in names:
        batch = {"data": _images(rng, n, (3072,)), "labels": _balanced_labels(n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR_NAMES}))
    return root


def make_image_folder(
    root: Path,
    per_class_train: int = 10,
    per_class_test: int = 4,
    classes: list[str] | None = None,
    size: int = 32,
    mode: str = "RGB",
    suffix: str = ".png",
    seed: int = 0,
) -> Path:
    """``root/{train,test}/<class>/NNNN.<suffix>``; returns ``root``."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for name in classes or CIFAR_NAMES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = _images(rng, 1, (size, size, channels))[0]
                Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(folder / f"{i:04d}{suffix}")
    return root


class SigtermAtStep(L.Callback):
    """Sends this process SIGTERM after training step ``step``, as a scheduler pre-empting a run would."""

    def __init__(self, step: int = 4) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


# A fit that trains two batches and evaluates one: enough to run every hook of a config.
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def make_data_root(root: Path, per_class_train: int = 10) -> Path:
    """MNIST IDX files and a CIFAR-10 image folder under one data root, as the CLI tests need them."""
    make_mnist_idx(root, n_train=64, n_test=32)
    make_image_folder(root / "cifar10", per_class_train=per_class_train, per_class_test=2, suffix=".png")
    return root


def write_hostile_configs(folder: Path) -> list[tuple[str, str]]:
    """A YAML alias bomb (324 bytes, billions of values) and a config that is not UTF-8, with what each is told."""
    levels = ["a: &a [" + ", ".join(['"x"'] * 9) + "]"]
    levels += [f"{n}: &{n} [" + ", ".join([f"*{p}"] * 9) + "]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)]
    (folder / "bomb.yaml").write_text("\n".join(levels) + "\n")
    (folder / "latin1.yaml").write_bytes("trainer:\n  max_epochs: 2  # für\n".encode("latin-1"))
    return [("bomb.yaml", "expands to more than 100,000 values"), ("latin1.yaml", "is not UTF-8")]


class SigtermAt(L.Callback):
    """Sends this process SIGTERM in the Lightning hook named ``hook`` (``on_train_end``, ``on_test_start``, ...),
    as a scheduler pre-empting a run between two of its phases would; not while ``$SEND_SIGTERM`` is ``0`` (so
    that the same command can be run again without it)."""

    def __init__(self, hook: str = "on_train_end", epoch: int | None = None) -> None:
        self.hook, self.epoch = hook, epoch  # epoch: only in that epoch (not in the sanity check)

    def __getattribute__(self, name: str) -> object:
        armed = os.environ.get("SEND_SIGTERM", "1") != "0"
        if armed and name.startswith("on_") and name == object.__getattribute__(self, "hook"):
            return self._send
        return object.__getattribute__(self, name)

    def _send(self, trainer: L.Trainer, *args: object, **kwargs: object) -> None:
        if self.epoch is None or (trainer.current_epoch == self.epoch and not trainer.sanity_checking):
            os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A small tmpfs mounted on ``folder`` (``options``: ``size=1m``, ``ro,size=1m``) while the block runs: a real
    full disk or read-only home. Skips the test where mounting is not allowed (the tests and CI run as root)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a server the test starts, or one that is not there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
