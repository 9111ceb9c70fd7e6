"""Plugin providers (kind ``plugin``): every :class:`~apt.plugins.base.Plugin` subclass defined in a module of
:mod:`apt.plugins.builtin` (found with pkgutil, so a new module there registers with no other edit). A module
that fails to import is logged and skipped."""
from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil

from ..plugins import builtin
from ..plugins.base import Plugin

logger = logging.getLogger(__name__)


def discover() -> list[type[Plugin]]:
    found: list[type[Plugin]] = []
    for info in sorted(pkgutil.iter_modules(builtin.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        modname = f"{builtin.__name__}.{info.name}"
        try:
            mod = importlib.import_module(modname)
        except Exception as exc:
            logger.warning("apt: plugin module %s failed to import: %s", modname, exc)
            from . import IMPORT_ERRORS

            IMPORT_ERRORS[f"plugins.builtin.{info.name}"] = f"{type(exc).__name__}: {exc}"
            continue
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, Plugin) and obj is not Plugin and obj.__module__ == mod.__name__ and obj.name:
                found.append(obj)
    return found


PROVIDERS = discover()
