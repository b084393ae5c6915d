"""lightning_cnn: the assignment's CNN experiments as reusable Lightning parts."""

__version__ = "0.1.0"
