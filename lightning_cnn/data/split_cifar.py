"""Split CIFAR-10: phase 1 on one set of classes, phase 2 on another, as the assignment's transfer study."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_cnn.data.datamodules import CIFAR10DataModule, _check, _check_fraction
from lightning_cnn.data.sources import Split


class SplitCIFAR10DataModule(CIFAR10DataModule):
    """One phase of split CIFAR-10 (phase 1: classes 0-4, phase 2: classes 5-9 by default).

    Like the assignment, each phase holds out the last ``val_fraction`` of its training images for
    validation (taken per class, so the hold-out stays balanced whatever order the files are in) and
    tests on the test images of its classes. Labels follow the assignment: they keep their CIFAR-10
    values, so phase 1 (classes 0-4) trains a 5-way head and phase 2 (classes 5-9) a 10-way one;
    ``remap_labels=True`` maps a phase's classes to ``0 .. k-1`` instead.

    Args:
        phase: 1 or 2.
        phase1_classes: CIFAR-10 labels of phase 1.
        phase2_classes: CIFAR-10 labels of phase 2; must not overlap phase 1.
        remap_labels: map the phase's classes to ``0 .. k-1`` in the order given.
        val_fraction: share of each class's training images held out, from the end, for validation.
        **kwargs: see :class:`CIFAR10DataModule`.

    Example:
        >>> SplitCIFAR10DataModule(phase=2).num_classes
        10
        >>> SplitCIFAR10DataModule(phase=2, remap_labels=True).class_names
        ['dog', 'frog', 'horse', 'ship', 'truck']
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        phase: int = 1,
        phase1_classes: Sequence[int] = (0, 1, 2, 3, 4),
        phase2_classes: Sequence[int] = (5, 6, 7, 8, 9),
        remap_labels: bool = False,
        val_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        _check(phase in (1, 2), f"phase must be 1 or 2, got {phase}")
        for name, classes in (("phase1_classes", phase1_classes), ("phase2_classes", phase2_classes)):
            _check(len(classes) > 0, f"{name} is empty; give at least one CIFAR-10 label")
            _check(len(set(classes)) == len(classes), f"{name} repeats a class: {list(classes)}")
            bad = [c for c in classes if not 0 <= c < 10]
            _check(not bad, f"{name} has labels {bad} that CIFAR-10 does not have; use labels 0-9")
        overlap = sorted(set(phase1_classes) & set(phase2_classes))
        _check(not overlap, f"phase1_classes and phase2_classes overlap on {overlap}; the phases must be disjoint")
        _check_fraction(val_fraction)
        super().__init__(data_dir, batch_size, val_fraction=val_fraction, **kwargs)
        self.phase, self.remap_labels = phase, remap_labels
        self.classes = [int(c) for c in (phase1_classes if phase == 1 else phase2_classes)]

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.remap_labels else max(self.classes) + 1

    @property
    def class_names(self) -> list[str]:
        names = super().class_names
        return [names[c] for c in self.classes] if self.remap_labels else names[: self.num_classes]

    def _splits(self, train: Split, test: Split) -> tuple[Split, Split, Split]:
        keep, held, val_share = [], [], float(self.val_fraction or 0.0)
        for c in self.classes:
            members = (train.labels == c).nonzero().flatten()
            n_val = round(len(members) * val_share)
            keep.append(members[: len(members) - n_val])
            held.append(members[len(members) - n_val :])
        test_index = torch.isin(test.labels, torch.tensor(self.classes)).nonzero().flatten()
        return tuple(  # type: ignore[return-value]
            self._relabel(split.subset(index.sort().values))
            for split, index in ((train, torch.cat(keep)), (train, torch.cat(held)), (test, test_index))
        )

    def _relabel(self, split: Split) -> Split:
        if not self.remap_labels:
            return split
        lookup = torch.full((10,), -1, dtype=torch.long)
        lookup[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        return Split(split.images, lookup[split.labels])
