"""The shared trainer (pretraining, SUPRA uptraining, BST, RMT)."""

from msrnn.train.config import TrainConfig
from msrnn.train.trainer import Trainer, TrainResult, default_loss

__all__ = ["TrainConfig", "TrainResult", "Trainer", "default_loss"]
