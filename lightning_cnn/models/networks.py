"""The assignment's networks as plain ``nn.Module``s, each a convolutional ``backbone`` and a ``head``.

A network knows nothing of Lightning; :class:`~lightning_cnn.models.classifier.ImageClassifier` trains it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_cnn.errors import ConfigError


def conv_backbone(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """3x3 unpadded convolutions, each followed by 2x2 max-pooling and ReLU, then flatten.

    The pooling runs before the ReLU: ReLU is monotonic, so ``relu(max(a, b)) == max(relu(a), relu(b))`` and
    the network computes the same function with the same gradients (the assignment's conv-ReLU-pool), but the
    ReLU and its backward touch a quarter of the elements: on a 2-core CPU they take 2 ms of a CIFAR CNN
    training step of about 200 ms instead of 21 ms (docs/speed.md). The parameters and their names are
    unchanged, so checkpoints of either order load.
    """
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3), nn.MaxPool2d(2), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers, nn.Flatten())


def mlp_head(in_features: int, widths: Sequence[int], dropout: Sequence[float] = ()) -> nn.Sequential:
    """Fully connected layers ``in_features -> widths...`` with ReLU between and optional dropout before each."""
    if dropout and len(dropout) != len(widths):
        raise ConfigError(f"dropout needs one probability per linear layer ({len(widths)}), got {list(dropout)}")
    for p in dropout:
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout probabilities must lie in [0, 1), got {list(dropout)}")
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        if dropout:
            layers.append(nn.Dropout(dropout[i]))
        layers.append(nn.Linear(in_features, width))
        if i < len(widths) - 1:
            layers.append(nn.ReLU(inplace=True))
        in_features = width
    return nn.Sequential(*layers)


def flat_features(backbone: nn.Module, input_shape: Sequence[int]) -> int:
    """Length of the backbone's flattened output for one image of ``input_shape`` ``(C, H, W)``."""
    try:
        with torch.no_grad():
            return int(backbone(torch.zeros(1, *input_shape)).shape[1])
    except RuntimeError as err:  # torch: "Output size is too small", or a channel count that does not fit
        first = str(err).splitlines()[0]
        raise ConfigError(f"Images of shape {tuple(input_shape)} (C, H, W) do not fit this network ({first}); "
                          "use larger images (data.image_size) or the channels it was built for.") from err  # fmt: skip


def averaged_logits(network: nn.Module, x: torch.Tensor, flip: bool = False, translate: int = 0) -> torch.Tensor:
    """The mean logits of ``x``'s test-time views: itself, its mirror image (``flip``) and, with ``translate``
    pixels, copies shifted that far down-right and up-left (reflect-padded), each also mirrored with ``flip``.

    The views follow the training augmentation (random crops of a padded image, mirroring), so the network has
    seen such images; averaging their logits is a cheap gain at that many times the evaluation compute.
    The exported graph calls this too, so an exported model evaluates as the run did.

    Example:
        >>> net = nn.Conv2d(1, 1, 1)
        >>> averaged_logits(net, torch.zeros(2, 1, 4, 4), flip=True, translate=1).shape
        torch.Size([2, 1, 4, 4])
    """
    views = [x]
    if translate:
        t = translate
        padded = F.pad(x, (t, t, t, t), mode="reflect")
        views += [padded[..., : -2 * t, : -2 * t], padded[..., 2 * t :, 2 * t :]]
    if flip:
        views += [view.flip(-1) for view in views]
    logits = network(views[0])
    for view in views[1:]:
        logits = logits + network(view)
    return logits / len(views)


Init = Literal["pytorch", "keras", "he"]


def init_weights_(network: nn.Module, init: Init) -> None:
    """Re-initialise ``network``'s convolutions and linear layers in place with the named framework's defaults.

    ``"pytorch"`` keeps PyTorch's defaults (Kaiming-uniform with ``a=sqrt(5)``, uniform biases);
    ``"keras"`` gives Keras' defaults (Glorot-uniform weights, zero biases); ``"he"`` gives He et al.'s
    Kaiming-normal for ReLU (fan-in, zero biases), which keeps the signal's scale through every layer.
    PyTorch's default shrinks it about 6x in variance per layer (1/3 from the weights, 1/2 from ReLU), so
    on the CIFAR-10 CNN (six such layers) SGD at lr 1e-3 sits at chance for epochs before it learns.

    Example:
        >>> layer = nn.Linear(4, 2)
        >>> init_weights_(layer, "keras")
        >>> layer.bias.tolist()
        [0.0, 0.0]
    """
    if init == "pytorch":
        return
    if init not in ("keras", "he"):
        raise ConfigError(f"init must be 'pytorch', 'keras' or 'he', got {init!r}")
    for module in network.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            if init == "keras":
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class BackboneHead(nn.Module):
    """``head(backbone(x))``: the split every network here has, so a backbone can be reused and frozen."""

    backbone: nn.Module
    head: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class CIFARCNN(BackboneHead):
    """The assignment's CIFAR-10 CNN: conv 3-64-128-256, then fully connected 1024-128-256-classes.

    Args:
        num_classes: outputs of the last layer.
        input_shape: ``(C, H, W)`` of the images; 32x32 gives the assignment's 1024 flat features.
        dropout: one dropout probability before each of the three linear layers; empty for none.
        init: weight initialisation, ``"pytorch"``, ``"keras"`` or ``"he"`` (see :func:`init_weights_`).

    Example:
        >>> net = CIFARCNN(num_classes=10)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> sum(p.numel() for p in net.parameters())
        537610
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (3, 32, 32),
        dropout: Sequence[float] = (),
        init: Init = "pytorch",
    ) -> None:
        super().__init__()
        self.backbone = conv_backbone(input_shape[0], (64, 128, 256))
        self.head = mlp_head(flat_features(self.backbone, input_shape), (128, 256, num_classes), dropout)
        init_weights_(self, init)


class CIFARCNNDropout(CIFARCNN):
    """The CIFAR-10 CNN with dropout before each fully connected layer (p = 0.2, 0.2, 0.1 by default)."""

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: Sequence[int] = (3, 32, 32),
        dropout: Sequence[float] = (0.2, 0.2, 0.1),
        init: Init = "pytorch",
    ) -> None:
        super().__init__(num_classes, input_shape, dropout, init)


class MNISTCNN(BackboneHead):
    """The assignment's MNIST CNN: conv 1-32-64, then fully connected 1600-128-classes.

    Example:
        >>> MNISTCNN()(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """

    def __init__(self, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28), init: Init = "pytorch") -> None:
        super().__init__()
        self.backbone = conv_backbone(input_shape[0], (32, 64))
        self.head = mlp_head(flat_features(self.backbone, input_shape), (128, num_classes))
        init_weights_(self, init)
