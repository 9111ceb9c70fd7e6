"""Model construction from profiles: :class:`~apt.modeling.compose.ModelBuilder` -> :class:`APTModel`."""
from .compose import ModelBuilder
from .model import APTModel, ModelCache

__all__ = ["APTModel", "ModelBuilder", "ModelCache"]
