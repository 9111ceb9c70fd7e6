"""Training: the :class:`~apt.training.trainer.Trainer` loop and checkpoints (:mod:`apt.training.checkpoint`)."""
from .checkpoint import CHECKPOINT_NAME, load_for_inference, save
from .trainer import Trainer, train

__all__ = ["CHECKPOINT_NAME", "Trainer", "load_for_inference", "save", "train"]
