"""apt: the APT microkernel (registry, profiles, schedules, model builder, trainer, plugins, CLI) on top of
the ``apt_kernels`` kernel library.

Logging: the ``apt`` loggers get no handler here (deliberately no ``logging.NullHandler``), so when the program has
configured no logging at all, Python's last-resort handler prints WARNING and above to stderr: a registry fallback
("asked for scan/cuda, using scan/reference instead: ...") is seen, not swallowed. Any logging configuration the
program makes (``logging.basicConfig``, the ``apt`` CLI's own) replaces that; ``logging.getLogger("apt")
.setLevel(logging.ERROR)`` silences it.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .core.registry import get, get_info, kinds, list_providers, register, select  # noqa: E402

__all__ = ["__version__", "get", "get_info", "kinds", "list_providers", "register", "select"]
