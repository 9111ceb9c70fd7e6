"""Plugins: providers of kind ``plugin`` that receive the trainer's hook broadcasts (and generation hooks)."""
from .base import HookContext, Plugin

__all__ = ["HookContext", "Plugin"]
