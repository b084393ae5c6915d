"""The LightningModule that trains any of the networks with cross-entropy and evaluates it with torchmetrics."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Sequence
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_cnn.errors import ConfigError
from lightning_cnn.models.metrics import classification_metrics, confusion_matrix, scalar_figures
from lightning_cnn.models.networks import averaged_logits
from lightning_cnn.models.schedulers import CosineAnnealingLR

EVAL_STAGES = ("val", "test")


def _class_count(num_classes: int | None, class_names: Sequence[str] | None) -> int:
    if class_names and num_classes is not None and len(class_names) != num_classes:
        raise ConfigError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
    count = len(class_names) if class_names else num_classes
    if not count or count < 1:
        raise ConfigError("ImageClassifier needs the class count: pass num_classes or class_names (the DataModule's)")
    return count


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def _takes_total_steps(factory: Any) -> bool:
    """Whether a scheduler factory (a class, or a partial of one as LightningCLI builds) takes ``total_steps``."""
    candidates = [factory]
    while isinstance(factory, functools.partial):
        candidates += [factory.func, *factory.args]
        factory = factory.func
    for candidate in candidates:
        if callable(candidate):
            try:
                if "total_steps" in inspect.signature(candidate).parameters:
                    return True
            except (TypeError, ValueError):
                continue
    return False


class ImageClassifier(L.LightningModule):
    """Trains an image classification network; logs ``train/loss``, ``val/acc``, ``test/f1_weighted``, ...

    Validation and test compute accuracy, error, weighted and macro precision/recall/F1, per-class accuracy
    and the confusion matrix (kept in :attr:`confusion` after each evaluation epoch).

    Args:
        network: the ``nn.Module`` to train (see :mod:`lightning_cnn.models.networks`).
        optimizer: builds the optimizer from the trainable parameters (LightningCLI: ``class_path`` and
            ``init_args``).
        scheduler: builds an LR scheduler from the optimizer; one that takes ``total_steps`` (one-cycle) is
            given the run's step count and stepped every batch, others every epoch;
            :class:`~lightning_cnn.models.CosineAnnealingLR` without ``T_max`` anneals over ``max_epochs``.
        label_smoothing: cross-entropy label smoothing of the training loss (evaluation loss is plain).
        num_classes: class count (the LightningCLI links the DataModule's ``num_classes`` here).
        class_names: the names of labels ``0 .. num_classes-1`` (linked from the DataModule's ``class_names``);
            ``None``: ``"0"``, ``"1"``, ... Either this or ``num_classes`` is needed.
        channels_last: run convolutions in channels-last memory format.
        compile: ``torch.compile`` the network (``None``, as the CLI passes it when unset: decided by the CLI for
            the machine, on where it pays).
        flip_test_time: in validation, test and predict, average the logits of each image and its mirror
            image (horizontal flip, as the training augmentation does): a cheap gain for flip-augmented
            training, at twice the evaluation compute.
        translate_test_time: also average the views shifted by this many pixels down-right and up-left
            (mirrored too with ``flip_test_time``; see :func:`averaged_logits`); 0 for none. The crop
            augmentation trains on such shifts; +0.6 points on CIFAR-10 (docs/results.md) at 3x the mirror's compute.

    Example:
        >>> from lightning_cnn.models import MNISTCNN
        >>> model = ImageClassifier(MNISTCNN(num_classes=10), num_classes=10)
        >>> model(torch.zeros(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        num_classes: int | None = None,
        channels_last: bool = False,
        compile: bool | None = None,
        flip_test_time: bool = False,
        translate_test_time: int = 0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if not 0 <= translate_test_time <= 4:
            raise ConfigError(f"translate_test_time is a shift in pixels, 0 to 4, got {translate_test_time}")
        # Checkpoints must load with torch.load(weights_only=True): keep plain values only. Under LightningCLI
        # the network and optimizer arrive here as their class_path/init_args config, which is plain; from
        # Python they are objects, which are dropped (the network's weights are in the state dict anyway).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        self.remove_ignored_hparams([k for k, v in self.hparams.items() if not _plain(v)])
        self.network = network
        self.optimizer, self.scheduler = optimizer, scheduler
        self.channels_last, self.compile_network = channels_last, compile
        self.label_smoothing, self.flip_test_time = label_smoothing, flip_test_time
        self.translate_test_time = translate_test_time
        self.num_classes = _class_count(num_classes, class_names)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        self.train_acc = MulticlassAccuracy(self.num_classes)
        # "ignore", not "disable", which drops the weights in torchmetrics 1.9; a NaN loss stops the run anyway
        self.train_loss = MeanMetric(nan_strategy="ignore")
        self._resumed_epoch_states: dict[str, dict[str, torch.Tensor]] | None = None
        self.metrics = nn.ModuleDict({s: classification_metrics(self.num_classes, s) for s in EVAL_STAGES})
        self.confmat = nn.ModuleDict({s: confusion_matrix(self.num_classes) for s in EVAL_STAGES})
        self.eval_loss = nn.ModuleDict({s: MeanMetric() for s in EVAL_STAGES})
        self.confusion: dict[str, torch.Tensor] = {}
        self.per_class: dict[str, dict[str, torch.Tensor]] = {}  # precision, recall, f1 of each class per stage

    @property
    def backbone(self) -> nn.Module:
        """The network's feature extractor (what Lightning's ``BackboneFinetuning`` freezes and thaws)."""
        return cast(nn.Module, self.network.backbone)

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        if self.channels_last:
            self.network.to(memory_format=torch.channels_last)
        if self.compile_network:  # None (undecided) means off
            self.network.compile()  # in place: the state dict keeps its plain keys

    def on_fit_start(self) -> None:
        # A validate or test before this fit (a baseline) ran under inference mode, where the metrics' reset made
        # their states inference tensors, which the fit's validation may not update in place: new ones, here.
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()

    # A run resumed in the middle of an epoch logs the same train/acc and train/loss for it as an uninterrupted
    # run: the epoch's accumulations so far travel in the checkpoint beside (not in) the state dict, so the
    # weights of every checkpoint, older ones included, still load strictly. Lightning restores none of this:
    # its own epoch aggregation of logged values is not in its checkpoints.
    def _train_metrics(self) -> dict[str, Metric]:
        return {"train_acc": self.train_acc, "train_loss": self.train_loss}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # also in the hyperparameters; here at the top, where a phase-2 run reads its phase-1 head's size
        checkpoint["class_names"] = list(self.class_names)
        states = {}
        for name, metric in self._train_metrics().items():
            # every rank saves (Lightning's saving is collective); the sums of all ranks, resumed by rank 0 alone
            with metric.sync_context(should_unsync=True):
                # both metrics keep tensors (sums), no lists
                states[name] = {k: cast(torch.Tensor, v).detach().cpu().clone() for k, v in metric.metric_state.items()}
        checkpoint["train_epoch_metrics"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_epoch_states = checkpoint.get("train_epoch_metrics")

    def on_train_epoch_start(self) -> None:
        # Lightning calls this for an epoch it starts, not for one it resumes in the middle: the saved
        # accumulations belong to an epoch that is over
        self._resumed_epoch_states = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._resumed_epoch_states is None:
            return
        if self.global_rank == 0:
            for name, metric in self._train_metrics().items():
                for key, value in self._resumed_epoch_states.get(name, {}).items():
                    setattr(metric, key, value.to(self.device))
        self._resumed_epoch_states = None

    # ------------------------------------------------------------------ steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.network(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        # update only: the accuracy is logged per epoch, so computing it for every batch (forward) is wasted work
        self.train_acc.update(logits, y)
        self.train_loss.update(loss.detach(), weight=len(y))
        # the names Lightning gives a value logged on_step and on_epoch; the epoch's mean is a metric so that a
        # mid-epoch checkpoint can carry it (see on_save_checkpoint)
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _stage_metrics(self, stage: str) -> tuple[MetricCollection, Metric, Metric]:
        return (
            cast(MetricCollection, self.metrics[stage]),
            cast(Metric, self.confmat[stage]),
            cast(Metric, self.eval_loss[stage]),
        )

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits validation, test and predict judge by: averaged over the test-time views, if any."""
        return averaged_logits(self, x, self.flip_test_time, self.translate_test_time)

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self.eval_logits(x)
        preds = logits.argmax(dim=1)
        metrics, confmat, loss = self._stage_metrics(stage)
        metrics.update(preds, y)
        confmat.update(preds, y)
        loss.update(F.cross_entropy(logits.float(), y), weight=len(y))

    def _eval_epoch_end(self, stage: str) -> None:
        metrics, confmat, loss = self._stage_metrics(stage)
        confusion = confmat.compute()
        computed = metrics.compute()
        figures = scalar_figures(computed, stage, self.class_names, confusion.sum(dim=1))
        figures[f"{stage}/loss"] = loss.compute()
        # torchmetrics has already reduced across processes, so every rank logs the same numbers.
        self.log_dict(figures, sync_dist=True)
        self.confusion[stage] = confusion.cpu()
        self.per_class[stage] = {
            name: computed[f"{stage}/{name}_per_class"].cpu() for name in ("precision", "recall", "f1")
        }
        for metric in (metrics, confmat, loss):
            metric.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: tuple[torch.Tensor, Any], batch_idx: int) -> torch.Tensor:
        return self.eval_logits(batch[0]).float().softmax(dim=1)

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> Any:
        try:
            optimizer = self.optimizer([p for p in self.parameters() if p.requires_grad])
        except ValueError as err:  # torch's own check of lr, momentum, betas, ...
            raise ConfigError(f"Invalid optimizer setting: {err}. Fix model.optimizer.init_args.") from err
        if self.scheduler is None:
            return optimizer
        if _takes_total_steps(self.scheduler):
            steps = self.trainer.estimated_stepping_batches
            try:
                scheduler = self.scheduler(optimizer, total_steps=steps)  # type: ignore[call-arg]
            except (ZeroDivisionError, ValueError) as err:  # torch's one-cycle: a phase of zero steps
                raise ConfigError(f"The learning-rate schedule does not fit a run of {steps} optimizer step(s) "
                                  f"({type(err).__name__}: {err}). Train more steps (trainer.max_epochs, a "
                                  "smaller data.batch_size) or change model.scheduler.") from err  # fmt: skip
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        scheduler = self.scheduler(optimizer)
        if isinstance(scheduler, CosineAnnealingLR) and scheduler.follows_run:
            if not self.trainer.max_epochs or self.trainer.max_epochs < 1:
                raise ConfigError("CosineAnnealingLR without T_max anneals over trainer.max_epochs: set it (>= 1).")
            scheduler.T_max = self.trainer.max_epochs
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
