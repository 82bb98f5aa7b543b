"""MediSee platform: train, batch-score and serve reasoning segmentation on Ray."""

__version__ = "0.1.0"
