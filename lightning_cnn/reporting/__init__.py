"""Reporting: what a run leaves for people (summary, history, pictures), W&B logging and lineage, the
split CIFAR-10 evaluation callbacks, and the comparison of runs.

The names configs use are exported here (``lightning_cnn.reporting.WandbLogger``, ...), imported when first
used: ``lightning-cnn compare`` needs none of them, nor Lightning, and answers at once.
"""

from importlib import import_module
from typing import Any

EXPORTS = {
    "ClassIncrementalAccuracy": "retention",
    "PhaseOneRetention": "retention",
    "RunReport": "report",
    "UseCheckpointArtifact": "wandb_logger",
    "WandbLogger": "wandb_logger",
}
__all__ = sorted(EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{EXPORTS[name]}"), name)
