"""The one place the evaluation metrics are defined: torchmetrics, named ``stage/metric_average``."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


def classification_metrics(num_classes: int, stage: str) -> MetricCollection:
    """Accuracy, weighted and macro precision/recall/F1, and per-class accuracy, precision, recall and F1.

    Classes absent from both targets and predictions are left out of the macro averages, as scikit-learn
    does, so a phase-2 split (labels 5-9 in a 10-way space) averages over its own five classes.

    Example:
        >>> m = classification_metrics(3, "val")
        >>> m.update(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1, 1, 2]))
        >>> round(float(m.compute()["val/acc"]), 2)
        0.75
    """
    metrics: dict[str, torch.nn.Module] = {"acc": MulticlassAccuracy(num_classes, average="micro")}
    for average in ("weighted", "macro"):
        metrics[f"precision_{average}"] = MulticlassPrecision(num_classes, average=average)
        metrics[f"recall_{average}"] = MulticlassRecall(num_classes, average=average)
        metrics[f"f1_{average}"] = MulticlassF1Score(num_classes, average=average)
    metrics["acc_per_class"] = MulticlassAccuracy(num_classes, average=None)
    # per class, for the run's per_class.csv and its W&B table (states shared with the averages above)
    metrics["precision_per_class"] = MulticlassPrecision(num_classes, average=None)
    metrics["recall_per_class"] = MulticlassRecall(num_classes, average=None)
    metrics["f1_per_class"] = MulticlassF1Score(num_classes, average=None)
    return MetricCollection(metrics, prefix=f"{stage}/")  # type: ignore[arg-type]


def confusion_matrix(num_classes: int) -> MulticlassConfusionMatrix:
    return MulticlassConfusionMatrix(num_classes)


def scalar_figures(
    computed: dict[str, torch.Tensor], stage: str, class_names: list[str], support: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Flatten a computed collection into loggable scalars: the error rate, and accuracy of each class present.

    Args:
        computed: output of the stage's collection.
        stage: ``train``, ``val`` or ``test``.
        class_names: name of each label.
        support: samples per true class (row sums of the confusion matrix); classes without any are not logged.
    """
    figures = {k: v for k, v in computed.items() if v.ndim == 0}
    figures[f"{stage}/error"] = 1.0 - computed[f"{stage}/acc"]
    per_class = computed[f"{stage}/acc_per_class"]
    for i, (name, value) in enumerate(zip(class_names, per_class, strict=False)):
        if support[i] > 0:
            figures[f"{stage}/acc_class_{name}"] = value
    return figures
