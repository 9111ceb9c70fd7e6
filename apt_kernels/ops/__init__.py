"""Public functional ops. Each dispatches to the fastest implementation available for its inputs and is a real
``torch.library`` custom op where a native or Triton kernel is involved (works under autograd and torch.compile)."""
from .running_mean import running_mean, running_mean_native

__all__ = ["running_mean", "running_mean_native"]
