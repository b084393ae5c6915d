"""Models: plain networks (:mod:`.networks`, :mod:`.transfer`), the LightningModule that trains them and the
first-layer whitening (:mod:`.whitening`)."""

from lightning_cnn.models.classifier import ImageClassifier
from lightning_cnn.models.networks import CIFARCNN, MNISTCNN, BackboneHead, CIFARCNNDropout
from lightning_cnn.models.schedulers import CosineAnnealingLR
from lightning_cnn.models.transfer import CheckpointError, TransferNet
from lightning_cnn.models.whitening import WhitenFirstConv

__all__ = [
    "CIFARCNN",
    "MNISTCNN",
    "BackboneHead",
    "CIFARCNNDropout",
    "CheckpointError",
    "CosineAnnealingLR",
    "ImageClassifier",
    "TransferNet",
    "WhitenFirstConv",
]
