"""apt: the APT microkernel (registry, profiles, schedules, model builder, trainer, plugins, CLI) on top of
the ``apt_kernels`` kernel library."""
from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

from .core.registry import get, get_info, list_providers, register  # noqa: E402

__all__ = ["__version__", "get", "get_info", "list_providers", "register"]
