"""The microkernel core: provider registry, configuration profiles and schedules."""
from .registry import (REGISTRY, Provider, ProviderInfo, Registry, RegistryError, get, get_info, kinds,
                       list_providers, register, register_kind, select)

__all__ = ["REGISTRY", "Provider", "ProviderInfo", "Registry", "RegistryError", "get", "get_info", "kinds",
           "list_providers", "register", "register_kind", "select"]
