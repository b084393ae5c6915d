"""Find a dataset under the data root in any accepted layout, download it when allowed, or explain what to do."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from lightning_cnn.data.paths import DATA_ENV, DataError, cache_dir, is_writable, resolve_data_dir
from lightning_cnn.data.sources import Dataset, read_cifar_batches, read_image_folder, read_mnist_idx

Reader = Callable[[Path], "Dataset | None"]


@functools.lru_cache(maxsize=4)
def _memo(kind: str, root: Path, download: bool) -> Dataset:
    return _LOCATORS[kind](root, download)


def load_dataset(kind: str, data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """Decode ``kind`` ("mnist" or "cifar10") from the data root, once per process.

    Args:
        kind: which dataset.
        data_dir: the data root; ``None`` means ``$LIGHTNING_CNN_DATA`` or ``./data``.
        download: fetch the official files with torchvision when no layout is found.

    Raises:
        DataError: nothing usable was found (and it could not be downloaded), or a file is corrupt.
    """
    if kind not in _LOCATORS:
        raise ValueError(f"Unknown dataset {kind!r}; choose one of {sorted(_LOCATORS)}.")
    return _memo(kind, resolve_data_dir(data_dir).resolve(), download)


def _candidates(root: Path, keyword: str) -> list[Path]:
    """The root itself, its sub-folders whose name mentions the dataset, and the download cache."""
    found = [root]
    if root.is_dir():
        found += sorted(p for p in root.iterdir() if p.is_dir() and keyword in p.name.lower())
    return [*found, _download_root(root)]


def _search(folders: list[Path], readers: list[tuple[str, Reader]]) -> Dataset | None:
    for folder in folders:
        for sub, reader in readers:
            if (dataset := reader(folder / sub if sub else folder)) is not None:
                return dataset
    return None


def _download_root(root: Path) -> Path:
    return root if is_writable(root) else cache_dir() / "downloads"


def _locate(root: Path, download: bool, keyword: str, readers: list[tuple[str, Reader]], fetch: Callable) -> Dataset:
    folders = _candidates(root, keyword)
    if (dataset := _search(folders, readers)) is not None:
        return dataset
    reason = "download=False"
    if download:
        target = _download_root(root)
        try:
            target.mkdir(parents=True, exist_ok=True)
            for train in (True, False):
                fetch(root=str(target), train=train, download=True)
        except Exception as err:
            reason = f"downloading into {target} failed: {type(err).__name__}: {err}"
        else:
            if (dataset := _search([target], readers)) is not None:
                return dataset
            reason = f"the download into {target} left no readable files"
    raise DataError(_missing_message(keyword, folders, readers, reason))


def _missing_message(keyword: str, folders: list[Path], readers: list[tuple[str, Reader]], reason: str) -> str:
    layouts = {
        "mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (torchvision's layout)",
        "cifar": "cifar-10-batches-py/{data_batch_1..5,test_batch} (torchvision's layout)",
    }[keyword]
    searched = "\n".join(f"  - {f}" for f in dict.fromkeys(folders))
    return (
        f"No {keyword.upper()} data found ({reason}).\nSearched:\n{searched}\nAccepted layouts, in any of those "
        f"folders:\n  - {layouts}\n  - an image folder train/<class>/*.png|jpg and test/<class>/*.png|jpg\n"
        f"To fix: copy the data into one of those layouts and pass --data.data_dir PATH (or set {DATA_ENV}=PATH "
        "once), or allow download=True on a machine with internet access."
    )


def _locate_mnist(root: Path, download: bool) -> Dataset:
    from torchvision.datasets import MNIST

    readers: list[tuple[str, Reader]] = [
        ("MNIST/raw", read_mnist_idx),
        ("raw", read_mnist_idx),
        ("", read_mnist_idx),
        ("", lambda p: read_image_folder(p, channels=1, size=28)),
    ]
    return _locate(root, download, "mnist", readers, MNIST)


def _locate_cifar10(root: Path, download: bool) -> Dataset:
    from torchvision.datasets import CIFAR10

    readers: list[tuple[str, Reader]] = [
        ("cifar-10-batches-py", read_cifar_batches),
        ("", read_cifar_batches),
        ("", lambda p: read_image_folder(p, channels=3, size=32)),
    ]
    return _locate(root, download, "cifar", readers, CIFAR10)


_LOCATORS: dict[str, Callable[[Path, bool], Dataset]] = {"mnist": _locate_mnist, "cifar10": _locate_cifar10}
