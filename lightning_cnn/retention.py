"""How phase-1 accuracy holds up after split CIFAR-10 phase 2 (the "forgetting" figure of the transfer study)."""

from __future__ import annotations

import copy
import re
from typing import cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from lightning_cnn.data.split_cifar import SplitCIFAR10DataModule
from lightning_cnn.errors import CheckpointError, ConfigError
from lightning_cnn.models.classifier import output_features
from lightning_cnn.models.networks import CIFARCNN
from lightning_cnn.models.transfer import load_network_state


class PhaseOneRetention(Callback):
    """After a phase-2 test, tests the phase-1 network again with its backbone replaced by the phase-2 one.

    The phase-1 network (its trained head included) comes from the phase-1 checkpoint; its backbone gets the
    weights the phase-2 run ends with, and it is tested on the phase-1 test images. The accuracy is logged as
    ``test/phase1_acc`` (and lands in the run's ``summary.json``, its W&B run and ``lightning-cnn compare``).
    A frozen transfer backbone keeps the phase-1 figure exactly: one backbone then serves both phases with two
    small heads. A fine-tuned backbone shows how much of phase 1 was forgotten.

    Args:
        checkpoint_path: the phase-1 run's checkpoint; ``None`` takes the one the phase-2 :class:`TransferNet`
            was built from.
        phase1_network: the phase-1 architecture; default: :class:`CIFARCNN` with as many outputs as the
            checkpoint's head.

    Raises:
        ConfigError: the run is not split CIFAR-10 phase 2, or its network has no ``backbone``.
        CheckpointError: at set-up, before any training, when the checkpoint is missing or does not fit.
    """

    def __init__(self, checkpoint_path: str | None = None, phase1_network: nn.Module | None = None) -> None:
        self.checkpoint_path = checkpoint_path
        self.phase1_network = phase1_network

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if not isinstance(datamodule, SplitCIFAR10DataModule) or datamodule.phase != 2:
            raise ConfigError("PhaseOneRetention needs a SplitCIFAR10DataModule with phase: 2 as the run's data.")
        if not isinstance(getattr(pl_module, "network", None), nn.Module) or not hasattr(pl_module.network, "backbone"):
            raise ConfigError("PhaseOneRetention needs a model whose network has a backbone (any network here).")
        path = self.checkpoint_path or getattr(pl_module.network, "checkpoint_path", None)
        if path is None:
            raise ConfigError("PhaseOneRetention needs checkpoint_path: the phase-1 run's checkpoint.")
        state = load_network_state(path)
        network = self.phase1_network or CIFARCNN(_head_outputs(state, path), datamodule.input_shape)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"{path} does not fit {type(network).__name__}; set phase1_network to the phase-1 architecture: {err}"
            ) from err
        self.phase1_network = network

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.phase1_network is not None  # set up in setup()
        network = copy.deepcopy(self.phase1_network).to(pl_module.device).eval()
        backbone = cast(nn.Module, cast(nn.Module, pl_module.network).backbone)
        cast(nn.Module, network.backbone).load_state_dict(backbone.state_dict())
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        # The run's data settings with phase 1 swapped in; LightningCLI adds a "_class_path" entry to drop.
        settings = {k: v for k, v in datamodule.hparams.items() if not k.startswith("_")}
        phase1 = type(datamodule)(**{**settings, "phase": 1, "data_on_device": False})
        phase1.setup("test")
        preds, labels = [], []
        with torch.inference_mode():
            for images, target in phase1.test_dataloader():
                x, y = phase1.on_after_batch_transfer((images.to(pl_module.device), target.to(pl_module.device)), 0)
                preds.append(network(x).argmax(dim=1))
                labels.append(y)
        accuracy = multiclass_accuracy(torch.cat(preds), torch.cat(labels), output_features(network), average="micro")
        # Every process computes the same figure over the whole phase-1 test set, so no reduction is needed.
        pl_module.log("test/phase1_acc", accuracy)


def _head_outputs(state: dict[str, torch.Tensor], path: str) -> int:
    """Output count of the last linear layer of a network state dict's ``head``."""
    heads = [(int(m.group(1)), v) for k, v in state.items() if (m := re.fullmatch(r"head\.(\d+)\.weight", k))]
    if not heads:
        raise CheckpointError(f"{path} has no head weights (no 'network.head.*' keys); is it a phase-1 run?")
    return int(max(heads, key=lambda item: item[0])[1].shape[0])
