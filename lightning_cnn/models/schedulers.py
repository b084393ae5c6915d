"""Learning-rate schedules whose length follows the run's, so a config never repeats ``max_epochs``."""

from __future__ import annotations

from torch.optim import Optimizer, lr_scheduler


class CosineAnnealingLR(lr_scheduler.CosineAnnealingLR):
    """torch's cosine annealing, over the run's ``trainer.max_epochs`` unless ``T_max`` is given.

    Written because torch requires ``T_max`` when the config is parsed: every cosine config would repeat its
    epoch count and fall out of step with ``--trainer.max_epochs``. :class:`ImageClassifier` sets the length
    when it builds the schedule, as it gives one-cycle its ``total_steps``.

    Args:
        optimizer: the optimizer whose learning rate is annealed.
        T_max: epochs of the half cosine; ``None``: the run's ``max_epochs``.
        eta_min: the final learning rate.
        last_epoch: as torch's.
    """

    def __init__(self, optimizer: Optimizer, T_max: int | None = None, eta_min: float = 0.0, last_epoch: int = -1):
        self.follows_run = T_max is None
        # the length only enters from the second step on, so a placeholder is safe until the run sets it
        super().__init__(optimizer, T_max or 1, eta_min, last_epoch)
