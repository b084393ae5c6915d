"""Data: where images come from (:mod:`.sources`, :mod:`.locate`) and how a batch is made (:mod:`.loader`)."""

from lightning_cnn.data.datamodules import CIFAR10DataModule, MNISTDataModule, ResidentDataModule
from lightning_cnn.data.image_folder import ImageFolderDataModule
from lightning_cnn.data.locate import load_dataset
from lightning_cnn.data.paths import DataError
from lightning_cnn.data.split_cifar import SplitCIFAR10DataModule

__all__ = [
    "CIFAR10DataModule",
    "DataError",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "ResidentDataModule",
    "SplitCIFAR10DataModule",
    "load_dataset",
]
