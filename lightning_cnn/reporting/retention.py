"""How phase-1 accuracy holds up after split CIFAR-10 phase 2 (the "forgetting" figure of the transfer study)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_cnn.data.split_cifar import SplitCIFAR10DataModule
from lightning_cnn.errors import CheckpointError, ConfigError
from lightning_cnn.models import ImageClassifier, TransferNet
from lightning_cnn.models.networks import CIFARCNN, BackboneHead
from lightning_cnn.models.transfer import checkpoint_class_names, load_network_state


class PhaseOneRetention(Callback):
    """After a phase-2 test, tests the phase-1 network again with its backbone replaced by the phase-2 one.

    The phase-1 network (its trained head included) comes from the phase-1 checkpoint; its backbone gets the
    weights the phase-2 run ends with, and it is tested on the phase-1 test images. The accuracy is logged as
    ``test/phase1_acc``, the phase-1 network's own, computed the same way, as ``test/phase1_acc_before``
    (both land in the run's ``summary.json``, its W&B run and ``lightning-cnn compare``).
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
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if not isinstance(datamodule, SplitCIFAR10DataModule) or datamodule.phase != 2:
            raise ConfigError("PhaseOneRetention needs a SplitCIFAR10DataModule with phase: 2 as the run's data.")
        if not isinstance(pl_module, ImageClassifier) or not isinstance(pl_module.network, BackboneHead):
            raise ConfigError("PhaseOneRetention needs an ImageClassifier whose network has a backbone (any here).")
        network_path = pl_module.network.checkpoint_path if isinstance(pl_module.network, TransferNet) else None
        path = self.checkpoint_path or network_path
        if path is None:
            raise ConfigError("PhaseOneRetention needs checkpoint_path: the phase-1 run's checkpoint.")
        state = load_network_state(path)
        network = self.phase1_network or CIFARCNN(len(checkpoint_class_names(path)), datamodule.input_shape)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"{path} does not fit {type(network).__name__}; set phase1_network to the phase-1 architecture: {err}"
            ) from err
        self.phase1_network = network

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.phase1_network is not None  # set up in setup()
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        before = copy.deepcopy(self.phase1_network).to(pl_module.device).eval()
        after = copy.deepcopy(before)
        backbone = cast(nn.Module, cast(nn.Module, pl_module.network).backbone)
        cast(nn.Module, after.backbone).load_state_dict(backbone.state_dict())
        # Both by the same computation, so a backbone phase 2 left unchanged shows exactly zero forgetting.
        # Every process computes the same figures over the whole phase-1 test set, so no reduction is needed.
        counts = _test_counts([before, after], datamodule, 1, pl_module.device)
        for key, (correct, total) in zip(("test/phase1_acc_before", "test/phase1_acc"), counts, strict=True):
            pl_module.log(key, correct / total)


class ClassIncrementalAccuracy(Callback):
    """After a split CIFAR-10 phase-2 test, the model's accuracy on the test images of both phases' classes.

    The class-incremental figure of the transfer study: one head, no task identity, all ten classes. It needs
    the assignment's label policy (labels kept, so the phase-2 head has an output for every class of both
    phases); with ``remap_labels`` the phases share outputs and the figure is not defined, so none is logged.
    Logged as ``test/all_classes_acc``.

    Raises:
        ConfigError: the run is not split CIFAR-10 phase 2.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if not isinstance(pl_module, ImageClassifier):
            raise ConfigError("ClassIncrementalAccuracy needs an ImageClassifier as the model.")
        if not isinstance(datamodule, SplitCIFAR10DataModule) or datamodule.phase != 2:
            raise ConfigError("ClassIncrementalAccuracy needs a SplitCIFAR10DataModule with phase: 2 as its data.")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if datamodule.remap_labels:
            return
        assert isinstance(pl_module, ImageClassifier)  # checked in setup()
        network = pl_module.network.eval()
        counts = [_test_counts([network], datamodule, phase, pl_module.device)[0] for phase in (1, 2)]
        pl_module.log("test/all_classes_acc", sum(c for c, _ in counts) / sum(n for _, n in counts))


def _test_counts(
    networks: Sequence[nn.Module], datamodule: SplitCIFAR10DataModule, phase: int, device: torch.device
) -> list[tuple[int, int]]:
    """Correct predictions of each network on the test images of one phase of the run's split, and their count.

    The phase's data is built and walked once for all the networks.
    """
    # The run's data settings with the phase swapped in; LightningCLI adds a "_class_path" entry to drop.
    settings = {k: v for k, v in datamodule.hparams.items() if not k.startswith("_")}
    data = type(datamodule)(**{**settings, "phase": phase, "data_on_device": False})
    data.setup("test")
    correct, total = [0] * len(networks), 0
    with torch.inference_mode():
        for batch in data.test_dataloader():  # evaluation batches: (images, labels)
            x, y = data.on_after_batch_transfer(tuple(t.to(device) for t in batch), 0)
            for i, network in enumerate(networks):
                correct[i] += int((network(x).argmax(dim=1) == y).sum())
            total += len(y)
    return [(c, total) for c in correct]
