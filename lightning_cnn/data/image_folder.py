"""Any folder of pictures as a dataset: ``ImageFolderDataModule``.

``data_dir/train/<class>/*`` (any depth below the class folder, any format Pillow reads, any size and mode),
optional ``val/`` and ``test/`` beside it with the same class folders. Every image is brought to
``image_size`` as the deployed model takes it (:func:`~lightning_cnn.data.predict.network_pixels`: the short
side scaled to fit, then the centre cropped) in ``channels`` 1 (gray) or 3 (RGB).

When the decoded images fit the memory budget they are decoded once, cached (keyed by the files' names, sizes
and modification times), and served resident with whole-batch augmentation, as CIFAR-10 is. Otherwise a
DataLoader with workers decodes the files of each batch, and the same augmentation runs on the batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from lightning_cnn.cores import usable_cores
from lightning_cnn.data.augment import AugmentParams
from lightning_cnn.data.datamodules import ResidentDataModule, _check, _check_fraction, _interleaved
from lightning_cnn.data.loader import ResidentBatches
from lightning_cnn.data.paths import DataError
from lightning_cnn.data.predict import network_pixels
from lightning_cnn.data.sources import IMAGE_SUFFIXES, Split, cached_arrays, decode_cache, decode_each
from lightning_cnn.files import write_atomically

SPLITS = ("train", "val", "test")
STATS_SAMPLE = 10_000  # streaming data: channel mean/std from this many training images, drawn under the seed


# ---------------------------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class Listing:
    """The image files of one split: paths and labels in class order, and what was left out."""

    paths: list[str]
    labels: np.ndarray
    classes: tuple[str, ...]
    ignored: int  # files that are no images (by suffix)
    digest: str  # of every name, size and modification time

    def __len__(self) -> int:
        return len(self.paths)


def _walk(
    folder: Path, ancestors: tuple[tuple[int, int], ...], found: list[str], ignored: list[int], digest: Any
) -> None:
    """Image files under ``folder``, sorted, following links but refusing one that leads back up (a loop)."""
    try:
        entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as err:
        raise DataError(f"Cannot read folder {folder}: {err.strerror}. Fix its permissions or remove it.") from err
    for entry in entries:
        try:
            is_dir = entry.is_dir()  # follows links
            st = entry.stat()
        except OSError as err:  # a dangling link, or one whose loop the system itself refuses
            raise DataError(f"Cannot read {entry.path}: {err.strerror}. Remove the broken link or file.") from err
        if is_dir:
            if (st.st_dev, st.st_ino) in ancestors:
                raise DataError(f"{entry.path} is a link back to a folder above it (a loop). Remove the link.")
            _walk(Path(entry.path), (*ancestors, (st.st_dev, st.st_ino)), found, ignored, digest)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
            found.append(entry.path)
            digest.update(f"{entry.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            ignored[0] += 1


def class_folders(folder: Path) -> tuple[str, ...]:
    """The class names: ``folder``'s sub-folders (hidden ones left out), sorted, so their order is the labels'."""
    return tuple(sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")))


def list_split(folder: Path) -> Listing:
    """The class folders of ``folder`` (sorted names are the labels) and the image files in each."""
    classes = class_folders(folder)
    if len(classes) < 2:
        raise DataError(f"{folder} holds {len(classes)} class folder(s); a classifier needs at least 2 "
                        f"({folder}/<class>/<images>).")  # fmt: skip
    paths: list[str] = []
    labels: list[int] = []
    ignored = [0]
    digest = hashlib.sha1()  # of every image's name, size and modification time
    top = folder.stat()
    for label, name in enumerate(classes):
        found: list[str] = []
        _walk(folder / name, ((top.st_dev, top.st_ino), _inode(folder / name)), found, ignored, digest)
        if len(found) < 2:
            raise DataError(f"Class folder {folder / name} holds {len(found)} image(s); each class needs at least 2. "
                            "Add images or remove the folder.")  # fmt: skip
        paths += found
        labels += [label] * len(found)
    return Listing(paths, np.asarray(labels, dtype=np.int64), classes, ignored[0], digest.hexdigest())


def _inode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


# ---------------------------------------------------------------------------------------------- decoding
def load_image(path: str, shape: tuple[int, int, int]) -> np.ndarray:
    """One file as uint8 ``(C, H, W)`` at ``shape``; :class:`DataError` naming the file if it cannot be."""
    channels, height, width = shape
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: a decompression bomb either way
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                # JPEG: decode at the smallest scale that is still at least the size wanted (much faster)
                image.draft("L" if channels == 1 else "RGB", (width, height))
                pixels = network_pixels(image, shape)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:  # fmt: skip
        raise DataError(
            f"Cannot decode image {path}: {str(err).rstrip('.')}. Replace or remove the file (or set data.skip_bad)."
        ) from err
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def decode_all(listing: Listing, shape: tuple[int, int, int], skip_bad: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Every image of a split, decoded in threads (:func:`decode_each`); returns images, labels, skipped."""
    images, good = decode_each(listing.paths, shape, lambda path: load_image(path, shape), skip_bad)
    skipped = int((~good).sum())
    if skipped:
        return images[good], listing.labels[good], skipped
    return images, listing.labels, 0


def channel_stats(images: np.ndarray | Iterator[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 ``(N, C, H, W)`` images scaled to [0, 1]."""
    chunks = [images] if isinstance(images, np.ndarray) else images
    total, sums, squares = 0, 0.0, 0.0
    for chunk in chunks:
        for start in range(0, len(chunk), 4096):  # float64 sums of a few MB at a time
            part = chunk[start : start + 4096].astype(np.float64) / 255.0
            sums = sums + part.sum(axis=(0, 2, 3))
            squares = squares + (part**2).sum(axis=(0, 2, 3))
            total += part.shape[0] * part.shape[2] * part.shape[3]
    mean = np.asarray(sums) / total
    std = np.sqrt(np.maximum(np.asarray(squares) / total - mean**2, 1e-12))
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


# ---------------------------------------------------------------------------------------------- streaming
class FileImages(Dataset):
    """Items ``(uint8 (C, H, W), label)`` decoded from files on demand (the streaming path)."""

    def __init__(self, paths: list[str], labels: np.ndarray, shape: tuple[int, int, int]) -> None:
        self.paths, self.labels, self.shape = paths, labels, shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(load_image(self.paths[i], self.shape)), int(self.labels[i])


class _Strided(DistributedSampler):
    """Evaluation order of rank ``r`` of ``w``: ``r, r+w, ...`` without padding, as ``ResidentBatches`` (a
    ``DistributedSampler``, so that Lightning does not wrap it in one of its own, which pads)."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        super().__init__(dataset, world_size, rank, shuffle=False)
        self.index = range(rank, len(self.dataset), world_size)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


class _EpochShuffle(DistributedSampler):
    """``DistributedSampler``'s shuffle; each epoch also re-seeds the generator of the batches' augmentation."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int, generator: torch.Generator) -> None:
        super().__init__(dataset, world_size, rank, shuffle=True, seed=seed)
        self.generator = generator
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.generator.manual_seed(zlib.crc32(f"{self.seed}/{epoch}/{self.rank}".encode()))


# ---------------------------------------------------------------------------------------------- the module
def _budget_bytes(memory_budget_gb: float | None) -> int:
    if memory_budget_gb is not None:
        return int(memory_budget_gb * 2**30)
    try:  # a quarter of the machine's memory: room for the model, the workers and everything else
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 2 * 2**30


class ImageFolderDataModule(ResidentDataModule):
    """Any folder of images, a folder per class: ``data_dir/train/<class>/*``, optional ``val/`` and ``test/``.

    Without ``val/``, a stratified ``val_fraction`` of each training class is held out (seeded). Without
    ``test/``, the run says so and tests on the validation images. Images of any format, size and mode are
    brought to ``image_size`` by :func:`~lightning_cnn.data.predict.network_pixels` (short side scaled to the
    size, centre cropped; what ``predict`` and ``serve`` do too) in ``channels`` 1 or 3.

    Args:
        data_dir: the folder holding ``train/`` (and ``val/``, ``test/``).
        image_size: ``H`` (square) or ``[H, W]`` the network takes.
        channels: 1 (gray) or 3 (RGB).
        batch_size: training batch size.
        val_fraction: share of each training class held out for validation when there is no ``val/`` folder.
        mean: per-channel mean of the [0, 1] pixels; ``None``: computed from the training images (exactly when
            resident, from 10,000 of them drawn under the seed when streaming) and cached with the decode.
        std: per-channel standard deviation, likewise.
        pad: zero padding of the random crop (0 turns cropping off).
        flip_p: probability of a random horizontal flip (0 turns it off).
        skip_bad: leave out images that cannot be decoded (counted in one line) instead of stopping.
        memory_budget_gb: decoded images up to this size are held in memory (fast, whole-batch augmentation);
            beyond it they are decoded from the files for every batch. ``None``: a quarter of the machine's memory.
        num_workers: DataLoader workers when streaming (``None``: the CPU count, at most 8).
        **kwargs: see :class:`~lightning_cnn.data.ResidentDataModule`.

    Example:
        >>> dm = ImageFolderDataModule("photos", image_size=[48, 64], channels=1)
        >>> dm.input_shape
        (1, 48, 64)
    """

    dataset = "imagefolder"

    def __init__(
        self,
        data_dir: str | None = None,
        image_size: int | Sequence[int] = 32,
        channels: int = 3,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        pad: int = 4,
        flip_p: float = 0.5,
        skip_bad: bool = False,
        memory_budget_gb: float | None = None,
        num_workers: int | None = None,
        **kwargs: Any,
    ) -> None:
        _check(data_dir is not None, "ImageFolderDataModule needs data.data_dir: the folder holding train/<class>/.")
        size = [image_size] if isinstance(image_size, int) else list(image_size)
        _check(len(size) in (1, 2) and all(int(s) >= 1 for s in size),
               f"image_size is H or [H, W] in pixels, got {image_size}")  # fmt: skip
        _check(channels in (1, 3), f"channels must be 1 (gray) or 3 (RGB), got {channels}")
        _check_fraction(val_fraction)
        _check(memory_budget_gb is None or memory_budget_gb >= 0, f"memory_budget_gb must be >= 0: {memory_budget_gb}")
        _check(num_workers is None or num_workers >= 0, f"num_workers must be >= 0, got {num_workers}")
        _check((mean is None) == (std is None), "Give both data.mean and data.std, or neither (computed then).")
        height, width = (int(size[0]), int(size[-1]))
        self.input_shape = (channels, height, width)  # this instance's (the class has none)
        self.given_stats = mean is not None
        kwargs["download"] = False  # nothing to download (a checkpoint's hyperparameters also name it)
        super().__init__(data_dir, batch_size, val_fraction=val_fraction, mean=mean or (0.0,), std=std or (1.0,),
                         pad=pad, flip_p=flip_p, **kwargs)  # fmt: skip
        self.hparams.update(mean=mean, std=std)  # None until computed (setup puts the figures in)
        self.skip_bad, self.memory_budget_gb = skip_bad, memory_budget_gb
        self.num_workers = min(usable_cores(), 8) if num_workers is None else num_workers
        self.root = Path(data_dir).expanduser()  # type: ignore[arg-type]  # checked above
        self.streaming = False
        self._files: dict[str, FileImages] = {}
        self._augment = torch.Generator()

    # ------------------------------------------------------------------ what models are wired to
    @property
    def class_names(self) -> list[str]:
        if self._classes is None:  # the links to the model read this before setup: the folder names
            train = self.root / "train"
            if not train.is_dir():
                raise DataError(f"{train} is not a folder. An image folder needs {train}/<class>/<images>; "
                                "point --data.data_dir at the folder that holds train/.")  # fmt: skip
            self._classes = class_folders(train)
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ------------------------------------------------------------------ loading
    def prepare_data(self) -> None:
        # rank 0 alone decodes and fills the cache; the other ranks read the cache in setup()
        if self.trainer is None or self.trainer.state.fn != "predict":
            self.setup()

    def setup(self, stage: str | None = None) -> None:
        if self.train_split is not None or self._files or stage == "predict":
            return
        listings = self._listings()
        shape = self.input_shape
        n = sum(len(listing) for listing in listings.values())
        needed = n * int(np.prod(shape))
        budget = _budget_bytes(self.memory_budget_gb)
        self.streaming = needed > budget
        how = "streaming from the files" if self.streaming else "resident in memory"
        ignored = sum(listing.ignored for listing in listings.values())
        print(f"ImageFolderDataModule: {n:,} images of {self.root} at {'x'.join(map(str, shape))} = "
              f"{needed / 2**20:,.0f} MiB decoded, {how} (memory budget {budget / 2**30:.1f} GiB: "
              f"data.memory_budget_gb)" + (f"; {ignored} non-image file(s) ignored" if ignored else ""))  # fmt: skip
        if self.streaming:
            self._setup_streaming(listings)
        else:
            self._setup_resident(listings)
        if not self.given_stats:
            self.hparams.update(mean=list(self.normalize_mean), std=list(self.normalize_std))

    def _listings(self) -> dict[str, Listing]:
        names = self.class_names
        listings = {s: list_split(self.root / s) for s in SPLITS if (self.root / s).is_dir()}
        for split, listing in listings.items():
            if list(listing.classes) != names:
                raise DataError(f"The class folders of {self.root / split} ({', '.join(listing.classes)}) differ from "
                                f"those of {self.root / 'train'} ({', '.join(names)}). Every split needs the same "
                                "classes.")  # fmt: skip
        if "test" not in listings:
            print(f"ImageFolderDataModule: {self.root} has no test/ folder; testing on the validation images.")
        return listings

    def _cut(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Training and validation indices: ``val_fraction`` of each class (at least one), drawn under the seed."""
        generator = np.random.default_rng(self.seed)
        val: list[np.ndarray] = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            take = min(len(members) - 1, max(1, round(len(members) * self.val_fraction)))  # type: ignore[operator]
            val.append(generator.choice(members, take, replace=False))
        val_index = np.sort(np.concatenate(val))
        return np.setdiff1d(np.arange(len(labels)), val_index), val_index

    def _cache_key(self, listings: dict[str, Listing]) -> str:
        parts = [f"v1 {self.input_shape} {self.skip_bad}", *(f"{s} {x.digest}" for s, x in listings.items())]
        return hashlib.sha1(" ".join(parts).encode()).hexdigest()[:20]

    def _cache_path(self, listings: dict[str, Listing], suffix: str) -> Path:
        return decode_cache(self.root, self._cache_key(listings), kind="imagefolder-", suffix=suffix)

    def _setup_resident(self, listings: dict[str, Listing]) -> None:
        def decode() -> dict[str, np.ndarray]:
            arrays, skipped = {}, 0
            for split, listing in listings.items():
                images, labels, bad = decode_all(listing, self.input_shape, self.skip_bad)
                arrays[f"{split}_x"], arrays[f"{split}_y"], skipped = images, labels, skipped + bad
            mean, std = channel_stats(arrays["train_x"])
            return {**arrays, "stats": np.asarray([mean, std], dtype=np.float64), "skipped": np.asarray(skipped)}

        required = [f"{s}_{k}" for s in listings for k in "xy"] + ["stats", "skipped"]
        arrays = cached_arrays(self._cache_path(listings, ".npz"), required, decode)
        if int(arrays["skipped"]):
            print(f"ImageFolderDataModule: {int(arrays['skipped'])} image(s) that could not be decoded were left out "
                  "(data.skip_bad).")  # fmt: skip
        splits = {s: Split(torch.from_numpy(arrays[f"{s}_x"]), torch.from_numpy(arrays[f"{s}_y"]))
                  for s in listings}  # fmt: skip
        train = splits["train"]
        if "val" not in splits:
            keep, held = self._cut(train.labels.numpy())
            train, splits["val"] = train.subset(torch.from_numpy(keep)), train.subset(torch.from_numpy(held))
        self._set_stats(*(arrays["stats"].tolist()))
        test = splits.get("test", splits["val"])
        self.train_split, self.val_split, self.test_split = train, _interleaved(splits["val"]), _interleaved(test)

    def _setup_streaming(self, listings: dict[str, Listing]) -> None:
        files = {s: (listing.paths, listing.labels) for s, listing in listings.items()}
        if "val" not in files:
            paths, labels = files["train"]
            keep, held = self._cut(labels)
            files["train"] = ([paths[i] for i in keep], labels[keep])
            files["val"] = ([paths[i] for i in held], labels[held])
        files.setdefault("test", files["val"])
        for split, (paths, labels) in files.items():
            order = np.arange(len(paths))
            if split != "train":  # evaluation takes the classes in turn (a fair prefix), as resident splits do
                order = _interleaved(Split(torch.from_numpy(order), torch.from_numpy(labels))).images.numpy()
            self._files[split] = FileImages([paths[i] for i in order], labels[order], self.input_shape)
        if not self.given_stats:
            stats = self._cache_path(listings, ".stats.json")
            try:
                mean, std = json.loads(stats.read_text())
            except (OSError, ValueError):
                listing = listings["train"]  # the whole training folder, as resident data's figures are
                mean, std = self._sample_stats(FileImages(listing.paths, listing.labels, self.input_shape))
                write_atomically(stats, lambda f: f.write(json.dumps([mean, std]).encode()))
            self._set_stats(mean, std)
        if self.skip_bad:
            print("ImageFolderDataModule: streaming checks each image as it is read; data.skip_bad applies to "
                  "resident data only, so a bad image stops the run with its name.", file=sys.stderr)  # fmt: skip

    def _sample_stats(self, files: FileImages) -> tuple[list[float], list[float]]:
        picks = np.random.default_rng(self.seed).permutation(len(files))[:STATS_SAMPLE]
        chunk = 1024
        return channel_stats(np.stack([files[int(i)][0].numpy() for i in picks[s : s + chunk]])
                             for s in range(0, len(picks), chunk))  # fmt: skip

    def _set_stats(self, mean: list[float], std: list[float]) -> None:
        if self.given_stats:
            return
        from lightning_cnn.data.augment import Normalize

        self.normalize = Normalize(mean, std)
        self.normalize_mean, self.normalize_std = mean, std

    # ------------------------------------------------------------------ batches
    def _loader(self, which: str) -> DataLoader:
        self.setup()
        files, shard = self._files[which], self._shard()
        workers = self.num_workers
        common: dict[str, Any] = {"num_workers": workers, "persistent_workers": workers > 0,
                                  "pin_memory": shard["device"].type == "cuda"}  # fmt: skip
        if which == "train":
            sampler: Sampler[int] = _EpochShuffle(files, shard["rank"], shard["world_size"], self.seed, self._augment)
            return DataLoader(files, self.batch_size, sampler=sampler, **common)
        return DataLoader(files, self.eval_batch_size, sampler=_Strided(files, shard["rank"], shard["world_size"]),
                          **common)  # fmt: skip

    def train_dataloader(self) -> ResidentBatches | DataLoader:  # type: ignore[override]
        self.setup()
        return self._loader("train") if self.streaming else super().train_dataloader()

    def val_dataloader(self) -> ResidentBatches | DataLoader:  # type: ignore[override]
        self.setup()
        return self._loader("val") if self.streaming else super().val_dataloader()

    def test_dataloader(self) -> ResidentBatches | DataLoader:  # type: ignore[override]
        self.setup()
        return self._loader("test") if self.streaming else super().test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        streamed = self.streaming and trainer is not None and trainer.training and len(batch) == 2
        if streamed and (self.pad or self.flip_p):  # the resident path's augmentation, drawn for the streamed batch
            params = AugmentParams.sample(len(batch[0]), self.pad, self.flip_p, self._augment)
            batch = (batch[0], batch[1], params.to(batch[0].device))
        return super().on_after_batch_transfer(batch, dataloader_idx)
