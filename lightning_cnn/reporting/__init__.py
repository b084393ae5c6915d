"""Reporting: what a run leaves for people (summary, history, pictures), W&B logging and lineage, the
split CIFAR-10 evaluation callbacks, and the comparison of runs.

The names configs use are exported here (``lightning_cnn.reporting.WandbLogger``, ...).
"""

from lightning_cnn.reporting.report import RunReport
from lightning_cnn.reporting.retention import ClassIncrementalAccuracy, PhaseOneRetention
from lightning_cnn.reporting.wandb_logger import UseCheckpointArtifact, WandbLogger

__all__ = ["ClassIncrementalAccuracy", "PhaseOneRetention", "RunReport", "UseCheckpointArtifact", "WandbLogger"]
