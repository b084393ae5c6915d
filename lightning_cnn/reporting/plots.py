"""PNG pictures of a run with matplotlib (headless): learning curves, confusion matrix, validation curves."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt
import torch

from lightning_cnn.files import write_atomically
from lightning_cnn.reporting.record import RunRecord


def plot_learning_curves(record: RunRecord, path: Path) -> None:
    """Loss and accuracy per epoch, training and validation, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "acc"), strict=True):
        for stage, style in (("train", "-o"), ("val", "-s")):
            points = [(epoch, value) for epoch, value, _ in record.curve(f"{stage}/{metric}")]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{stage}/{metric}", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_title(f"{record.name} {metric}")
        _grid_and_legend(ax)
    save_figure(fig, path)


def plot_confusion_matrix(confusion: torch.Tensor, names: Sequence[str], path: Path, present: torch.Tensor) -> None:
    """Counts with class names on both axes (torchmetrics' picture); classes absent from the test set are left out."""
    from torchmetrics.classification import MulticlassConfusionMatrix

    keep = present.nonzero().flatten()
    labels = [names[i] if i < len(names) else str(int(i)) for i in keep.tolist()]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(labels), 1 + 0.6 * len(labels)))
    MulticlassConfusionMatrix(len(labels)).plot(val=confusion[keep][:, keep], ax=ax, labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    save_figure(fig, path)


def write_per_class_table(
    per_class: dict[str, torch.Tensor], support: torch.Tensor, names: Sequence[str], path: Path, present: torch.Tensor
) -> None:
    """Precision, recall and F1 (torchmetrics, ``average=None``) and support of each class present."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["class", "precision", "recall", "f1", "support"])
    for i in present.nonzero().flatten().tolist():
        name = names[i] if i < len(names) else str(i)
        figures = [f"{float(per_class[k][i]):.4f}" for k in ("precision", "recall", "f1")]
        writer.writerow([name, *figures, int(support[i])])
    write_atomically(path, text.getvalue())


def plot_validation_curves(records: dict[str, RunRecord], path: Path) -> None:
    """Validation accuracy per epoch of several runs on one axis."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = {name: [(epoch, value) for epoch, value, _ in record.curve()] for name, record in records.items()}
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points, strict=True), "-o", label=name, markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val/acc")
    ax.grid(alpha=0.3)
    if any(curves.values()):
        ax.legend()
    save_figure(fig, path)


def plot_test_samples(
    model: torch.nn.Module, datamodule: object, split: object, names: Sequence[str], path: Path, count: int = 32
) -> None:
    """A grid of test images spread over the test set, titled "predicted (true)", mistakes in red."""
    images, labels = split.images, split.labels  # type: ignore[attr-defined]
    index = torch.linspace(0, len(labels) - 1, min(count, len(labels))).long()
    raw, target = images[index], labels[index]
    device = next(model.parameters()).device
    x, _ = datamodule.on_after_batch_transfer((raw.to(device), target.to(device)), 0)  # type: ignore[attr-defined]
    with torch.no_grad():
        predicted = model(x).argmax(dim=1).cpu()
    columns = 8
    rows = -(-len(index) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.6), squeeze=False)
    for ax, image, p, t in zip(axes.flat, raw, predicted.tolist(), target.tolist(), strict=False):
        picture = image.permute(1, 2, 0).squeeze(-1).cpu().numpy()
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
        name = lambda i: names[i] if i < len(names) else str(i)  # noqa: E731
        ax.set_title(f"{name(p)}\n({name(t)})", fontsize=7, color="black" if p == t else "red")
    for ax in axes.flat:
        ax.axis("off")
    save_figure(fig, path)


def plot_study(result: dict[str, Any], runs: dict[int, dict[str, RunRecord]], path: Path) -> None:
    """A study's picture: the accuracy matrix of each phase-2 method as a heatmap (mean over seeds) and the
    validation curves with a band of ± one std over seeds; for a single-config study, its curve alone."""
    seeds = result["seeds"]
    keys = [k for k in next(iter(runs.values())) if k != "phase1"]
    matrices = result["target"] == "split_cifar10"
    fig, axes = plt.subplots(
        1, len(keys) + 1 if matrices else 1, figsize=(4.2 * (len(keys) + 1), 4) if matrices else (7, 4.5)
    )
    axes = list(axes) if matrices else [axes]
    if matrices:
        for ax, key in zip(axes, keys, strict=False):
            cells = result["mean_std"][key]["accuracy_matrix"]
            grid = [[c["mean"] * 100 if c["mean"] is not None else float("nan") for c in row] for row in cells]
            ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
            for i, row in enumerate(cells):
                for j, c in enumerate(row):
                    text = "n/a" if c["mean"] is None else f"{c['mean'] * 100:.1f}\n± {c['std'] * 100:.1f}"
                    ax.text(
                        j,
                        i,
                        text,
                        ha="center",
                        va="center",
                        color="black" if c["mean"] is None or c["mean"] >= 0.6 else "white",
                    )
            ax.set_xticks([0, 1], ["phase 1 classes", "phase 2 classes"])
            ax.set_yticks([0, 1], ["after phase 1", "after phase 2"])
            ax.set_title(key)
    ax = axes[-1]
    for key in keys:
        curves = [[(epoch, value) for epoch, value, _ in runs[s][key].curve()] for s in seeds]
        length = min((len(c) for c in curves), default=0)
        if not length:
            continue
        epochs = [curves[0][i][0] for i in range(length)]
        values = torch.tensor([[c[i][1] * 100 for i in range(length)] for c in curves])
        mean = values.mean(dim=0)
        std = values.std(dim=0) if len(curves) > 1 else torch.zeros_like(mean)
        ax.plot(epochs, mean, "-o", markersize=3, label=key)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.25)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val acc (%), mean ± std over seeds")
    ax.set_title("phase 2" if matrices else Path(result["target"]).stem)
    _grid_and_legend(ax)
    save_figure(fig, path)


def _grid_and_legend(ax: Any) -> None:
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend()


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as a PNG (atomically) and close it."""
    fig.tight_layout()
    picture = io.BytesIO()
    fig.savefig(picture, format="png", dpi=100)
    plt.close(fig)
    write_atomically(path, picture.getvalue())
