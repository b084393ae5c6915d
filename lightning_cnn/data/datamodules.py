"""LightningDataModules for MNIST, CIFAR-10 and split CIFAR-10, all served from resident uint8 tensors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_cnn.data.augment import Normalize, flip_and_crop
from lightning_cnn.data.loader import ResidentBatches
from lightning_cnn.data.locate import load_dataset
from lightning_cnn.data.predict import PredictFolder
from lightning_cnn.data.sources import CIFAR10_CLASSES, MNIST_CLASSES, Split
from lightning_cnn.errors import ConfigError


class ResidentDataModule(L.LightningDataModule):
    """Shared machinery: load once, keep uint8 tensors resident, augment and normalize whole batches.

    Subclasses say which dataset (``dataset``), its input shape, and how train/val/test are cut (``_splits``).

    Args:
        data_dir: data root searched for every accepted layout; ``None`` means ``$LIGHTNING_CNN_DATA`` or ``./data``.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size (defaults to ``batch_size``); it does not change
            any metric.
        download: fetch the official files with torchvision when nothing is found under ``data_dir``.
        seed: seed of the shuffle, the augmentation and any random hold-out.
        val_fraction: ``None`` validates on the test split (the assignment's choice); a share in (0, 1) holds
            out that much of the training set instead, chosen at random under ``seed``.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by after that.
        pad: zero padding of the random crop (0 turns cropping off).
        flip_p: probability of a random horizontal flip (0 turns it off).
        plain_last_epochs: the last this many training epochs see the images as they are, neither flipped nor
            cropped, as the test sees them (the shuffle and the random draws are unchanged, so a resumed run
            matches); 0 augments every epoch.
        data_on_device: keep the whole dataset on the training device (GPU) so batches never cross the bus.
        predict_dir: a folder of the user's own images for ``predict``.
    """

    dataset: str = ""
    input_shape: tuple[int, int, int] = (0, 0, 0)
    default_classes: tuple[str, ...] = ()

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        download: bool = True,
        seed: int = 0,
        val_fraction: float | None = None,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        pad: int = 0,
        flip_p: float = 0.0,
        plain_last_epochs: int = 0,
        data_on_device: bool = True,
        predict_dir: str | None = None,
    ) -> None:
        super().__init__()
        _check(batch_size >= 1, f"batch_size must be a positive integer, got {batch_size}")
        _check(eval_batch_size is None or eval_batch_size >= 1, f"eval_batch_size must be positive: {eval_batch_size}")
        _check(pad >= 0, f"pad must be zero or positive, got {pad}")
        _check(0.0 <= flip_p <= 1.0, f"flip_p is a probability in [0, 1], got {flip_p}")
        _check(plain_last_epochs >= 0, f"plain_last_epochs must be zero or positive, got {plain_last_epochs}")
        _check(len(mean) in (1, self.input_shape[0]), f"mean needs 1 or {self.input_shape[0]} values, got {mean}")
        _check(len(std) in (1, self.input_shape[0]), f"std needs 1 or {self.input_shape[0]} values, got {std}")
        _check(all(s > 0 for s in std), f"std values must be positive, got {list(std)}")
        _check_fraction(val_fraction, allow_none=True)
        self.save_hyperparameters()
        self.data_dir, self.batch_size, self.download, self.seed = data_dir, batch_size, download, seed
        self.eval_batch_size = eval_batch_size or batch_size
        self.pad, self.flip_p, self.data_on_device, self.predict_dir = pad, flip_p, data_on_device, predict_dir
        self.val_fraction, self.plain_last_epochs = val_fraction, plain_last_epochs
        channels = self.input_shape[0]
        self.normalize = Normalize([*mean] * (channels // len(mean)), [*std] * (channels // len(std)))
        self._classes: tuple[str, ...] | None = None
        self.train_split: Split | None = None
        self.val_split: Split | None = None
        self.test_split: Split | None = None
        self._train_stream: ResidentBatches | None = None
        self._train_resume: dict[str, int] | None = None  # restored by load_state_dict

    # ------------------------------------------------------------------ what models are wired to
    @property
    def num_classes(self) -> int:
        return len(self.default_classes)

    @property
    def class_names(self) -> list[str]:
        """Names of the labels ``0 .. num_classes-1`` (from the data's folders once it is loaded)."""
        return list(self._classes or self.default_classes)

    # ------------------------------------------------------------------ loading
    def prepare_data(self) -> None:
        # Rank 0 alone downloads and fills the decode cache; the other ranks then read the cache in setup().
        if self.trainer is None or self.trainer.state.fn != "predict":
            load_dataset(self.dataset, self.data_dir, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_split is not None or stage == "predict":  # predict reads only the user's folder
            return
        data = load_dataset(self.dataset, self.data_dir, self.download)
        self._classes = data.classes
        train, val, test = self._splits(data.train, data.test)
        # The files are sorted by class, and a prefix of an evaluation set (limit_val_batches, limit_test_batches,
        # a smoke run) must be a fair sample, not one class: evaluation takes the classes in turn.
        self.train_split, self.val_split, self.test_split = train, _interleaved(val), _interleaved(test)

    def _splits(self, train: Split, test: Split) -> tuple[Split, Split, Split]:
        """Train, validation and test: validation on the test split, or a random hold-out of ``val_fraction``."""
        if self.val_fraction is None:
            return train, test, test
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))
        n_val = max(1, round(len(train) * self.val_fraction))
        return train.subset(perm[n_val:].sort().values), train.subset(perm[:n_val].sort().values), test

    # ------------------------------------------------------------------ batches
    def _device(self) -> torch.device:
        trainer = self.trainer
        if self.data_on_device and trainer is not None:
            return trainer.strategy.root_device
        return torch.device("cpu")

    def _shard(self) -> dict[str, Any]:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return {"rank": rank, "world_size": world, "device": self._device(), "seed": self.seed}

    def _stream(self, which: str) -> ResidentBatches:
        self.setup()
        split = {"train": self.train_split, "val": self.val_split, "test": self.test_split}[which]
        assert split is not None  # setup() made it
        if which == "train":
            return ResidentBatches(split, self.batch_size, True, pad=self.pad, flip_p=self.flip_p, **self._shard())
        return ResidentBatches(split, self.eval_batch_size, **self._shard())

    def train_dataloader(self) -> ResidentBatches:
        self._train_stream = self._stream("train")
        if self._train_resume is not None:
            self._train_stream.load_state_dict(self._train_resume)
            self._train_resume = None
        return self._train_stream

    # The resume point also travels as the DataModule's state, which Lightning restores before the model's
    # configure_optimizers runs: a one-cycle schedule asks for trainer.estimated_stepping_batches there, which
    # builds the training loader before the checkpoint is read, and Lightning then never hands that loader its
    # saved state (Lightning issue #20550), so a run resumed mid-epoch would start the epoch over.
    def state_dict(self) -> dict[str, Any]:
        return {"train_stream": self._train_stream.state_dict()} if self._train_stream is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_resume = state_dict.get("train_stream")

    def val_dataloader(self) -> ResidentBatches:
        return self._stream("val")

    def test_dataloader(self) -> ResidentBatches:
        return self._stream("test")

    def predict_dataloader(self) -> DataLoader:
        if self.predict_dir is None:
            raise ConfigError("predict needs a folder of images: pass --data.predict_dir PATH")
        dataset = PredictFolder(Path(self.predict_dir), self.input_shape)
        return DataLoader(dataset, batch_size=self.eval_batch_size, collate_fn=PredictFolder.collate)

    def _plain_epoch(self) -> bool:
        """Whether this training epoch is one of the last ``plain_last_epochs`` (of a run with a set end)."""
        trainer = self.trainer
        if trainer is None or not self.plain_last_epochs or trainer.max_epochs is None or trainer.max_epochs < 0:
            return False
        return trainer.current_epoch >= trainer.max_epochs - self.plain_last_epochs

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment (training batches carry their random choices) and normalize, on the batch's device."""
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_stream is not None:
            self._train_stream.consumed += 1  # Lightning transfers each batch as it trains it: the resume point
        images, rest = batch[0], batch[1]
        if len(batch) == 3 and not self._plain_epoch():
            images = flip_and_crop(images, batch[2], self.pad)
        images = self.normalize(images)
        if trainer is not None:  # Lightning casts batches for 64-true, bf16-true, 16-true before this hook, when
            images = trainer.precision_plugin.convert_input(images)  # they were still uint8: cast the floats now
        return images, rest


class MNISTDataModule(ResidentDataModule):
    """MNIST, 28x28 grayscale, normalized with mean 0.5 and std 0.5 as in the assignment; no augmentation.

    Args:
        data_dir: see :class:`ResidentDataModule`, like every other argument.
        batch_size: training batch size.
        mean: per-channel mean (the assignment's 0.5).
        std: per-channel standard deviation (the assignment's 0.5).
        **kwargs: see :class:`ResidentDataModule`.
    """

    dataset = "mnist"
    input_shape = (1, 28, 28)
    default_classes = MNIST_CLASSES

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, batch_size, mean=mean, std=std, **kwargs)


class CIFAR10DataModule(ResidentDataModule):
    """CIFAR-10 with the assignment's augmentation: random horizontal flip, random 32x32 crop padded by 4.

    Normalization defaults to the assignment's (mean 0, std 1: pixels in [0, 1]).

    Args:
        data_dir: see :class:`ResidentDataModule`, like every other argument.
        batch_size: training batch size.
        pad: zero padding of the random crop (the assignment's 4).
        flip_p: probability of a random horizontal flip (the assignment's 0.5).
        **kwargs: see :class:`ResidentDataModule`.

    Example:
        >>> dm = CIFAR10DataModule(data_dir="/datasets", batch_size=256)
        >>> dm.num_classes, dm.input_shape
        (10, (3, 32, 32))
    """

    dataset = "cifar10"
    input_shape = (3, 32, 32)
    default_classes = CIFAR10_CLASSES

    def __init__(
        self, data_dir: str | None = None, batch_size: int = 128, pad: int = 4, flip_p: float = 0.5, **kwargs: Any
    ) -> None:
        super().__init__(data_dir, batch_size, pad=pad, flip_p=flip_p, **kwargs)


def _interleaved(split: Split) -> Split:
    """The split with its classes taken in turn (the first image of each class, then the second, ...), each class
    in its own order: every prefix holds the classes in proportion, and the order is the same in every run.

    Example:
        >>> split = Split(torch.arange(6), torch.tensor([0, 0, 0, 1, 1, 2]))
        >>> _interleaved(split).images.tolist()
        [0, 3, 5, 1, 4, 2]
    """
    labels = split.labels
    by_class = torch.argsort(labels, stable=True)
    first = torch.searchsorted(labels[by_class], labels[by_class])  # where each one's class starts
    rank = torch.empty_like(labels)
    rank[by_class] = torch.arange(len(labels)) - first  # position within its class
    classes = int(labels.max()) + 1 if len(labels) else 1
    return split.subset(torch.argsort(rank * classes + labels, stable=True))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_fraction(value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    _check(value is not None and 0.0 < value < 1.0, f"val_fraction must be a share in (0, 1), got {value}")
