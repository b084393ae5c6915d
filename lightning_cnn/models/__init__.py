"""Models: plain networks (:mod:`.networks`, :mod:`.transfer`) and the LightningModule that trains them."""

from lightning_cnn.models.classifier import ImageClassifier
from lightning_cnn.models.networks import CIFARCNN, MNISTCNN, BackboneHead, CIFARCNNDropout
from lightning_cnn.models.schedulers import CosineAnnealingLR
from lightning_cnn.models.transfer import CheckpointError, TransferNet

__all__ = [
    "CIFARCNN",
    "MNISTCNN",
    "BackboneHead",
    "CIFARCNNDropout",
    "CheckpointError",
    "CosineAnnealingLR",
    "ImageClassifier",
    "TransferNet",
]
