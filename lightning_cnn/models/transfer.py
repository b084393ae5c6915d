"""Transfer learning for split CIFAR-10 phase 2: a phase-1 backbone, frozen, under a new head."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_cnn.checkpoints import first_mismatch, read_checkpoint
from lightning_cnn.errors import CheckpointError
from lightning_cnn.models.networks import CIFARCNN, BackboneHead, flat_features, mlp_head


def load_network_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The network weights of a Lightning checkpoint of this package (or of a plain state dict), prefix removed.

    Raises:
        CheckpointError: the file is missing or is not a checkpoint.
    """
    if Path(path).is_dir():  # a run folder (runs/<experiment>/latest): its best weights (training.runs' layout,
        path = Path(path) / "checkpoints" / "best.ckpt"  # which this layer may not import)
    state = read_checkpoint(
        path,
        "Transfer checkpoint",
        missing_hint="Train the run whose backbone you want first (split CIFAR-10: lightning-cnn fit --config "
        "split_cifar10_phase1) or point checkpoint_path at its run folder or .ckpt.",
        unreadable_hint="Point checkpoint_path at a run folder or its best.ckpt or last.ckpt.",
    )
    return network_weights(state, path)


def network_weights(state: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The network weights in a checkpoint read from ``path`` (or in a plain state dict), prefix removed.

    Raises:
        CheckpointError: it holds no state dict.
    """
    weights = state.get("state_dict", state)
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} holds no state dict; expected a Lightning .ckpt of a phase-1 run.")
    # a torch.compile(d) network saves its weights under _orig_mod. (private to torch; docs/development.md)
    for prefix in ("network._orig_mod.", "network."):
        found = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        if found:
            return found
    return weights


def checkpoint_class_names(path: str | Path) -> list[str]:
    """The class names a checkpoint of this package's classifier records (the size of its head).

    Raises:
        CheckpointError: the file is missing, unreadable, or not a checkpoint of this package's classifier.
    """
    checkpoint = read_checkpoint(
        path,
        "Phase-1 checkpoint",
        missing_hint="Point checkpoint_path at a phase-1 run's best.ckpt.",
        unreadable_hint="Point checkpoint_path at a phase-1 run's best.ckpt.",
    )
    names = checkpoint.get("class_names")
    if not isinstance(names, list) or not names:
        raise CheckpointError(f"{path} records no class names; is it a checkpoint of a lightning-cnn run?")
    return [str(n) for n in names]


def load_backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` weights of a Lightning checkpoint (or of a plain network state dict), prefix removed.

    Raises:
        CheckpointError: the file is missing, is not a checkpoint, or holds no backbone.
    """
    found = {k[len("backbone.") :]: v for k, v in load_network_state(path).items() if k.startswith("backbone.")}
    if not found:
        raise CheckpointError(f"{path} has no backbone weights (no 'network.backbone.*' keys); is it a phase-1 run?")
    return found


class TransferNet(BackboneHead):
    """The backbone of a trained network, loaded from a checkpoint and frozen, with the assignment's new head.

    The new head is linear to ``hidden_units``, ReLU, linear to ``num_classes``. A frozen backbone has no
    gradients and stays in eval mode, so its weights are bit-for-bit unchanged by training. Gradual
    unfreezing works through Lightning's ``BackboneFinetuning`` callback.

    Args:
        checkpoint_path: Lightning checkpoint of the phase-1 run (or a saved network state dict); ``None``
            builds the architecture alone, for the whole trained state of a TransferNet loaded after (as
            ``lightning-cnn export`` does, without needing the phase-1 run any more).
        num_classes: outputs of the new head.
        input_shape: ``(C, H, W)`` of the images.
        base: a network of the phase-1 architecture whose backbone receives the weights (default: CIFARCNN).
        hidden_units: width of the new head's hidden layer.
        freeze_backbone: keep the loaded backbone fixed.

    Raises:
        CheckpointError: before any training, when the checkpoint is missing, unreadable or does not fit.
    """

    def __init__(
        self,
        checkpoint_path: str | None,
        num_classes: int = 10,
        input_shape: Sequence[int] = (3, 32, 32),
        base: nn.Module | None = None,
        hidden_units: int = 128,
        freeze_backbone: bool = True,
    ) -> None:
        super().__init__()
        base = base if base is not None else CIFARCNN(input_shape=input_shape)
        if not isinstance(base, BackboneHead):
            raise TypeError(f"base must be one of this package's networks (with a .backbone), got {type(base)}")
        self.backbone = base.backbone
        self.checkpoint_path = checkpoint_path
        if checkpoint_path is not None:
            state = load_backbone_state(checkpoint_path)
            first = next(iter(state.values()))  # the first convolution's weight: (out, in, kh, kw)
            if first.ndim == 4 and first.shape[1] != input_shape[0]:
                raise CheckpointError(
                    f"The backbone in {checkpoint_path} takes {first.shape[1]}-channel images, these have "
                    f"{input_shape[0]} (data.channels): set data.channels {first.shape[1]} or use another backbone."
                )
            try:
                self.backbone.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise CheckpointError(
                    f"The backbone in {checkpoint_path} does not fit {type(base).__name__}'s backbone "
                    f"({first_mismatch(err)}). Use a backbone of the same network (model.network.init_args.base)."
                ) from err
        self.head = mlp_head(flat_features(self.backbone, input_shape), (hidden_units, num_classes))
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            # eval now too: Lightning restores recorded train/eval flags around validation directly
            self.backbone.eval()

    @property
    def backbone_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # a frozen backbone must not update dropout or normalization state either
        return self
