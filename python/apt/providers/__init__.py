"""Built-in providers. Every module in this package defines ``PROVIDERS`` (a list of Provider classes);
:func:`register_builtin` registers them all. A module that fails to import is logged and skipped, so one broken
optional dependency never hides the other kinds."""
from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import Optional

logger = logging.getLogger(__name__)

IMPORT_ERRORS: dict[str, str] = {}


def builtin_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def register_builtin(registry: Optional[object] = None) -> None:
    from ..core.registry import REGISTRY

    reg = registry if registry is not None else REGISTRY
    for mod_name in builtin_modules():
        try:
            mod = importlib.import_module(f"{__name__}.{mod_name}")
        except Exception as exc:
            IMPORT_ERRORS[mod_name] = f"{type(exc).__name__}: {exc}"
            logger.warning("apt: built-in provider module %s failed to import: %s", mod_name, exc)
            continue
        for cls in getattr(mod, "PROVIDERS", []):
            try:  # one class that cannot register (a clash with a provider registered earlier) spares the rest
                reg.register(cls)  # type: ignore[attr-defined]
            except Exception as exc:
                key = f"{mod_name}.{getattr(cls, '__qualname__', cls)}"
                IMPORT_ERRORS[key] = f"{type(exc).__name__}: {exc}"
                logger.warning("apt: built-in provider %s failed to register: %s", key, exc)
