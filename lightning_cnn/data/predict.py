"""The user's own images for ``predict``: any size, RGB or grayscale, brought to what the network takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from lightning_cnn.data.paths import DataError
from lightning_cnn.data.sources import IMAGE_SUFFIXES


class PredictFolder(Dataset):
    """Every image file under ``folder`` (recursively, sorted), resized to ``input_shape``'s height and width.

    Items are ``(uint8 tensor (C, H, W), path)``; batches are ``(uint8 tensor (B, C, H, W), [paths])``.
    """

    def __init__(self, folder: Path, input_shape: tuple[int, int, int]) -> None:
        if not folder.is_dir():
            raise DataError(f"predict_dir {folder} is not a folder. Point --data.predict_dir at a folder of images.")
        self.files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DataError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        self.input_shape = input_shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        path = self.files[i]
        try:
            with Image.open(path) as im:
                pixels = network_pixels(im, self.input_shape)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise DataError(f"Cannot decode image {path}: {err}. Replace or remove the file.") from err
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1), str(path)

    @staticmethod
    def collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
        return torch.stack([x for x, _ in items]), [p for _, p in items]


def network_pixels(image: Image.Image, input_shape: tuple[int, int, int]) -> np.ndarray:
    """An image as a network of ``input_shape`` ``(C, H, W)`` takes it: RGB (or gray for one channel), scaled
    bilinearly until it covers ``(H, W)`` and centre-cropped to it (an image of that size is left as it is);
    uint8 ``(H, W, C)``. Training on an image folder, ``predict`` and ``serve`` all convert images here."""
    channels, height, width = input_shape
    converted = ImageOps.fit(image.convert("L" if channels == 1 else "RGB"), (width, height), Image.Resampling.BILINEAR)
    return np.asarray(converted, dtype=np.uint8).reshape(height, width, channels)
