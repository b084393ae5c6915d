"""Where images come from: every on-disk layout we accept, decoded once into resident uint8 tensors.

Layouts, found under the data root without the user naming them:

* MNIST's IDX files as torchvision downloads them (``MNIST/raw/*-ubyte``, optionally ``.gz``);
* CIFAR-10's python batches as torchvision downloads them (``cifar-10-batches-py/``);
* an image folder ``train/<class>/*`` and ``test/<class>/*`` (PNG, JPEG, ...), classes in folder-name order.

Image folders are slow to decode (60,000 JPEGs take ~10 s), so the decoded arrays are cached in a
writable cache folder, keyed by a fingerprint of the file names, sizes and modification times.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pickle
import sys
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lightning_cnn.cores import usable_cores
from lightning_cnn.data.paths import DataError, cache_dir
from lightning_cnn.files import WriteError, write_atomically

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"})
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MNIST_CLASSES = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class Split:
    """One split of a dataset, resident in memory: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Dataset:
    """A decoded dataset: both splits, the class names in label order, and where it was read from."""

    train: Split
    test: Split
    classes: tuple[str, ...]
    source: str


# ---------------------------------------------------------------------------------------------- IDX (MNIST)
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or ``.gz``) of unsigned bytes.

    Written here rather than using torchvision's reader because that one neither opens ``.gz`` files nor
    says which file is truncated.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"Cannot read {path}: {err}. Replace the file with a good copy.") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes. Replace it with the original MNIST file.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(
            f"{path} is truncated or corrupt: its header says {shape} ({int(np.prod(shape))} bytes) but it holds "
            f"{data.size}. Replace it with the original MNIST file."
        )
    return data.reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_mnist_idx(folder: Path) -> Dataset | None:
    """MNIST from ``folder/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``, or None if they are not all there."""
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    files = [_idx_file(folder, stem) for stem in stems]
    if any(f is None for f in files):
        return None
    names = [f for f in files if f is not None]
    arrays = [read_idx(f) for f in names]
    for i in (0, 2):  # train, then test: images and labels
        images, labels, image_file, label_file = arrays[i], arrays[i + 1], names[i], names[i + 1]
        if len(images) != len(labels):
            raise DataError(
                f"{label_file} holds {len(labels)} labels but {image_file} holds {len(images)} images; the files "
                "do not belong together. Replace them with the original MNIST files."
            )
        check_labels(labels, len(MNIST_CLASSES), label_file)
    splits = [
        Split(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
        for images, labels in (arrays[:2], arrays[2:])
    ]
    return Dataset(splits[0], splits[1], MNIST_CLASSES, f"MNIST IDX files in {folder}")


def check_labels(labels: np.ndarray, classes: int, source: Path) -> None:
    """Refuse labels outside ``0 .. classes-1`` (they would end training in an IndexError, or train silently)."""
    bad = labels[(labels < 0) | (labels >= classes)]
    if bad.size:
        raise DataError(
            f"{source} has {bad.size} labels outside 0..{classes - 1} (e.g. {int(bad[0])}). Replace it with the "
            "original file."
        )


# ------------------------------------------------------------------------------ CIFAR-10 python batches
class _BatchUnpickler(pickle.Unpickler):
    """Reads what the official CIFAR-10 batches hold (dicts, lists, str, bytes, ints, numpy arrays) and nothing
    else: ``pickle.load`` of a crafted batch file would run any code it names.

    As PyTorch's ``weights_only`` loading does for checkpoints: a file from the data folder is untrusted input.
    """

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),  # arrays in pickles of protocol 5
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # how Python 2 pickles of byte strings come back under encoding="latin1"
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never holds")
        return getattr(sys.modules[module] if module in sys.modules else __import__(module, fromlist=[name]), name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            loaded = _BatchUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, AttributeError, ImportError) as err:
        raise DataError(
            f"Refusing CIFAR-10 batch {path}: {err}. It is not an original CIFAR-10 file; replace it."
        ) from err
    if not isinstance(loaded, dict):
        raise DataError(f"Refusing CIFAR-10 batch {path}: it holds a {type(loaded).__name__}, not a dict. Replace it.")
    return loaded


def read_cifar_batches(folder: Path) -> Dataset | None:
    """CIFAR-10 from its python batches in ``folder``, or None if they are not there.

    Read here rather than through ``torchvision.datasets.CIFAR10``, which refuses any copy whose MD5 sums
    differ from the official ones (re-packed copies, test fixtures) with a message that blames the download.
    """
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if not all((folder / n).is_file() for n in names):
        return None
    splits = []
    for group in (names[:5], names[5:]):
        batches = [_unpickle(folder / n) for n in group]
        try:
            data = np.concatenate([np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches])
            labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"A CIFAR-10 batch in {folder} is malformed ({err}). Replace the folder.") from err
        if len(data) != len(labels):
            raise DataError(f"The CIFAR-10 batches {', '.join(group)} in {folder} hold {len(data)} images but "
                            f"{len(labels)} labels. Replace the folder.")  # fmt: skip
        check_labels(labels, len(CIFAR10_CLASSES), folder / group[0])
        splits.append(Split(torch.from_numpy(data), torch.from_numpy(labels)))
    meta = folder / "batches.meta"
    classes = tuple(_unpickle(meta)["label_names"]) if meta.is_file() else CIFAR10_CLASSES
    return Dataset(splits[0], splits[1], classes, f"CIFAR-10 python batches in {folder}")


# ------------------------------------------------------------------------------------------ image folder
@dataclass(frozen=True)
class _Listing:
    """The image files of one split, class by class, with a digest of their names, sizes and mtimes."""

    files: dict[str, list[str]]
    digest: str


def _list_split(folder: Path) -> _Listing:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    files: dict[str, list[str]] = {}
    digest = hashlib.sha1()
    for name in classes:
        entries = sorted((e for e in os.scandir(folder / name) if not e.name.startswith(".")), key=lambda e: e.name)
        for e in entries:
            if not e.is_file() or os.path.splitext(e.name)[1].lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{e.path} is not an image file. Image folders may hold only images; move it out.")
            st = e.stat()
            digest.update(f"{e.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        if not entries:
            raise DataError(f"Class folder {folder / name} is empty. Put its images there or remove the folder.")
        files[name] = [e.path for e in entries]
    if not files:
        raise DataError(f"{folder} holds no class folders. Expected {folder}/<class>/<image files>.")
    return _Listing(files, digest.hexdigest())


def _decode(path: Path, mode: str, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            pixels = np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"Cannot decode image {path}: {err}. Replace or remove the file.") from err
    if pixels.shape[:2] != (size, size):
        raise DataError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]} pixels; this dataset needs {size}x{size}.")
    return pixels


def decode_each(
    paths: Sequence[Any], shape: tuple[int, ...], decode: Callable[[Any], np.ndarray], skip_bad: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``decode(path)`` of every path into one uint8 array ``(N, *shape)``, in threads (Pillow releases the GIL
    while decoding, so they use every core); returns it and which paths decoded (all of them unless ``skip_bad``
    leaves out those that raise :class:`DataError`; their rows stay uninitialised)."""
    images = np.empty((len(paths), *shape), dtype=np.uint8)
    good = np.ones(len(paths), dtype=bool)

    def work(i: int) -> None:
        try:
            images[i] = decode(paths[i])
        except DataError:
            if not skip_bad:
                raise
            good[i] = False

    with ThreadPoolExecutor(max_workers=usable_cores()) as pool:
        list(pool.map(work, range(len(paths)), chunksize=256))
    return images, good


def _decode_split(listing: _Listing, channels: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    paths = [Path(f) for files in listing.files.values() for f in files]
    counts = [len(files) for files in listing.files.values()]
    labels = np.concatenate([np.full(n, i, dtype=np.int64) for i, n in enumerate(counts)])
    mode = "L" if channels == 1 else "RGB"
    images, _ = decode_each(paths, (size, size, channels), lambda p: _decode(p, mode, size).reshape(size, size, -1))
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels


def read_image_folder(folder: Path, channels: int, size: int) -> Dataset | None:
    """An image-folder dataset (``folder/{train,test}/<class>/*``), decoded once and cached; None if absent."""
    if not ((folder / "train").is_dir() and (folder / "test").is_dir()):
        return None
    train, test = _list_split(folder / "train"), _list_split(folder / "test")
    if list(train.files) != list(test.files):
        raise DataError(
            f"The class folders of {folder / 'train'} ({', '.join(train.files)}) and {folder / 'test'} "
            f"({', '.join(test.files)}) differ. Both splits need the same classes."
        )
    key = hashlib.sha1(f"v1 {channels} {size} {train.digest} {test.digest}".encode()).hexdigest()[:20]
    names = ("train_x", "train_y", "test_x", "test_y")

    def decode() -> dict[str, np.ndarray]:
        return dict(
            zip(names, [*_decode_split(train, channels, size), *_decode_split(test, channels, size)], strict=True)
        )

    stored = cached_arrays(decode_cache(folder, key), names, decode)
    arrays = [stored[name] for name in names]
    splits = [Split(torch.from_numpy(x), torch.from_numpy(y)) for x, y in (arrays[:2], arrays[2:])]
    return Dataset(splits[0], splits[1], tuple(train.files), f"image folder {folder}")


def decode_cache(folder: Path, key: str, kind: str = "", suffix: str = ".npz") -> Path:
    """Where the decode of image folder ``folder`` is cached: named after the folder (and the reader ``kind``),
    ``key`` standing for its contents and the decoding settings."""
    prefix = f"{kind}{folder.name}-{hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]}"
    return cache_dir() / "decoded" / f"{prefix}-{key}{suffix}"


def cached_arrays(
    cache: Path, required: Sequence[str], build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """The arrays in ``cache`` (a :func:`decode_cache` file), or ``build()``'s, then cached; a damaged cache, or
    one without every ``required`` array, is built again (one line says so), never trusted. Building removes
    the older decodes of the same folder by the same reader (other contents or settings)."""
    if cache.is_file():
        try:
            # np.load reads the .npz through zipfile, which checks each member's CRC: a flipped bit fails here
            with np.load(cache, allow_pickle=False) as z:
                return {k: z[k] for k in (*required, *(f for f in z.files if f not in required))}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            print(f"lightning-cnn: the decode cache {cache} is damaged ({type(err).__name__}); decoding again.")
            cache.unlink(missing_ok=True)
    arrays = build()
    for stale in cache.parent.glob(f"{cache.name.rsplit('-', 1)[0]}-*{cache.suffix}"):  # prefix-key.npz
        stale.unlink(missing_ok=True)
    save_arrays(cache, arrays)
    return arrays


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with contextlib.suppress(WriteError):  # no writable cache: the next run decodes again, slow but correct
        write_atomically(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]  # numpy's stub misreads **kwargs
