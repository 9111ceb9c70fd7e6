"""Plugins: providers of kind ``plugin`` that receive the trainer's hook broadcasts (and generation hooks)."""
from .base import HookContext, Plugin
from .manager import PluginError, PluginManager

__all__ = ["HookContext", "Plugin", "PluginError", "PluginManager"]
