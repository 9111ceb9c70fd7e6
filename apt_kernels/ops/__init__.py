"""Public functional ops. Each dispatches to the fastest implementation available for its inputs and is a real
``torch.library`` custom op where a native or Triton kernel is involved (works under autograd and torch.compile).

Importing this package registers the ``torch.ops.apt.*`` custom ops but the Triton TVA ones (``import apt_kernels``
alone is lazy and registers none; ``apt::tva_attention_triton`` is registered by apt_kernels/triton/tva.py, imported
at the first Triton TVA call): a process that loads a torch.export program (``torch.export.load``) or an AOTInductor
package that calls these ops must call :func:`apt_kernels.load_ops` first, which registers all of them."""
from . import flash_api, moe, scan, tva  # noqa: F401  (registers the custom ops)
from .running_mean import running_mean, running_mean_native

__all__ = ["running_mean", "running_mean_native"]
