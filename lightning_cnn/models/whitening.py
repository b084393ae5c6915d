"""Patch-whitening initialisation of a network's first convolution from the images it trains on.

The first layer of an image network mostly learns edge and colour detectors that decorrelate its input
patches; starting it there is meant to save the epochs it takes to learn them. Fast CIFAR-10 recipes
(Keller Jordan's airbench, a BatchNorm network) set the first convolution's filters to the eigenvectors of
the training patches' covariance, scaled by one over the square root of their eigenvalues, each with its
negative so that a ReLU lets both signs through. On the assignment's CIFAR CNN (no BatchNorm, the layer
trained on) no gain was measurable at 13 epochs (docs/results.md). Here it is a callback, so any config
whose network starts with a trainable convolution can use it::

    trainer:
      callbacks:
        - class_path: lightning_cnn.models.WhitenFirstConv
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_cnn.errors import ConfigError


def patch_covariance(conv: nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
    """The (uncentred) covariance, in float64, of ``images``' patches of ``conv``'s kernel size and dilation.

    Example:
        >>> patch_covariance(nn.Conv2d(1, 2, 1), torch.ones(1, 1, 2, 2))
        tensor([[1.]], dtype=torch.float64)
    """
    patches = F.unfold(images.double(), conv.kernel_size, dilation=conv.dilation)  # (B, C*kh*kw, L)
    flat = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return flat.T @ flat / len(flat)


def whiten_conv_(conv: nn.Conv2d, covariance: torch.Tensor, eps: float = 5e-4) -> int:
    """Set the first filters of ``conv`` to whiten patches of that ``covariance``; returns how many were set.

    The ``k = min(patch size, out_channels // 2)`` directions of largest variance give ``k`` filters
    ``v / sqrt(lambda + eps)`` and their ``k`` negatives, with zero bias; the other filters keep their values.

    Example:
        >>> conv = nn.Conv2d(1, 4, 1)  # 1x1 patches of one channel: one direction, of variance 4
        >>> whiten_conv_(conv, torch.tensor([[4.0]], dtype=torch.float64), eps=0.0)
        1
        >>> sorted(conv.weight.flatten()[:2].tolist())
        [-0.5, 0.5]
    """
    dims = covariance.shape[0]
    if conv.groups != 1 or dims != conv.weight[0].numel():
        raise ConfigError(f"WhitenFirstConv: the first convolution ({conv}) is grouped or does not take the patches")
    k = min(dims, conv.out_channels // 2)
    if k < 1:
        raise ConfigError(f"WhitenFirstConv: the first convolution has {conv.out_channels} filter(s); it needs >= 2")
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    top = eigenvalues.flip(0)[:k].clamp(min=0)
    filters = (eigenvectors.flip(1)[:, :k] / (top + eps).sqrt()).T  # (k, dims)
    with torch.no_grad():
        weight = filters.reshape(k, *conv.weight.shape[1:]).to(conv.weight.dtype)
        conv.weight[:k] = weight
        conv.weight[k : 2 * k] = -weight
        if conv.bias is not None:
            conv.bias[: 2 * k] = 0.0
    return k


def first_conv(module: nn.Module) -> nn.Conv2d:
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ConfigError("WhitenFirstConv: this network has no convolution; remove the callback.")
    if not conv.weight.requires_grad:
        raise ConfigError("WhitenFirstConv: the first convolution is frozen (a transferred backbone keeps its "
                          "trained weights); remove the callback from this config.")  # fmt: skip
    return conv


class WhitenFirstConv(Callback):
    """Initialise the first convolution as a patch-whitening filter bank (:func:`whiten_conv_`) before training.

    It reads the first training batch of a new run as the network receives it (augmented and normalized), so it
    works with any DataModule, and under DDP the ranks average their covariances first, so every rank sets the
    same filters. A resumed run keeps its checkpoint's weights: it acts only before the first optimizer step.

    Args:
        eps: added to every eigenvalue: bounds how much the directions of least variance are amplified.
    """

    def __init__(self, eps: float = 5e-4) -> None:
        if eps <= 0:
            raise ConfigError(f"WhitenFirstConv: eps must be positive, got {eps}")
        self.eps = eps

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            first_conv(pl_module)  # a frozen or missing convolution is a config error before any training

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step > 0 or batch_idx > 0 or trainer.current_epoch > 0:
            return
        conv = first_conv(pl_module)
        covariance = trainer.strategy.reduce(patch_covariance(conv, batch[0]), reduce_op="mean")
        k = whiten_conv_(conv, covariance, self.eps)
        rank_zero_info(f"WhitenFirstConv: {2 * k} of {conv.out_channels} first-layer filters whiten the input "
                       f"patches ({covariance.shape[0]} values each)")  # fmt: skip
