"""Pure-PyTorch reference implementations: the simple, obviously-right versions every fast kernel is tested against."""
from .common import running_mean_ref

__all__ = ["running_mean_ref"]
