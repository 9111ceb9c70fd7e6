"""The provider registry: kind -> name -> provider class.

A *provider* is an implementation of one *kind* of component (an attention core, a router, a scan, a dataset...).
Every kind has a default provider that always works (usually the pure-PyTorch reference). Asking for a provider
that is not registered, or that is unavailable here (no GPU, no Triton, no compiled module), falls back to the
kind's default with a logged warning naming what was asked for, what is used instead, and why.

Providers arrive three ways: by import (``@register`` on the class), from our built-in modules
(:mod:`apt.providers`), and from other installed packages through the ``apt.providers`` entry-point group, whose
entries may name a Provider class, a module that registers on import, or a callable taking the registry.
Registration checks that a provider has its kind's methods (:data:`KIND_METHODS`); the first registration or
lookup loads the built-ins and entry points, so an ``override=True`` registration always has the last word.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import logging
import threading
from importlib import metadata
from types import ModuleType
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional, TypeVar, Union, overload

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "apt.providers"

BUILTIN_KINDS: dict[str, str] = {
    "attention": "attention core and layer (TVA and plain causal attention)",
    "ffn": "feed-forward block (dense MLP or mixture of experts)",
    "router": "MoE top-k routing, dispatch and combine with expert capacity",
    "scan": "Mamba selective scan (forward, backward, decode step)",
    "align": "auxiliary alignment loss",
    "retrieval": "retrieval-augmented generation back end",
    "dataset": "training data source",
    "plugin": "trainer / generation plugin receiving hook broadcasts",
}


# What a provider of each built-in kind must define: one of the alternatives, each a set of methods (checked at
# registration, so a provider missing its interface fails there, naming what is missing, instead of being skipped
# or replaced later, differently for each kind).
KIND_METHODS: dict[str, tuple[tuple[str, ...], ...]] = {
    "attention": (("forward",), ("create_layer",)),  # a core (the builder wraps it in TVAAttention), or a layer
    "ffn": (("create_layer",),),
    "router": (("route", "dispatch", "combine"), ("create_layer",)),  # ops (MoEFFN routes through them), or a layer
    "scan": (("selective_scan_fn", "selective_state_update"),),
    "align": (("loss",),),
    "retrieval": (("build", "search"),),
    "dataset": (("load_texts",),),
}


class RegistryError(LookupError):
    """A kind or provider cannot be resolved (unknown kind, no default, strict request unavailable)."""


class Provider:
    """Base class of every provider. Subclasses set the class attributes and implement their kind's interface.

    ``available()`` answers for this process as a whole (is Triton installed, is there a GPU, was the extension
    built); ``supports(**inputs)`` answers for particular inputs and returns the reasons it cannot take them
    (empty list = supported), in the style of xformers' ``not_supported_reasons``.
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    version: ClassVar[str] = "0.1.0"
    is_default: ClassVar[bool] = False
    description: ClassVar[str] = ""
    # Higher wins when a caller asks for name="auto" (the best available provider of the kind).
    priority: ClassVar[int] = 0

    def __init__(self, config: Optional[dict[str, Any]] = None) -> None:
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config: expected a mapping or None, got {type(config).__name__}")
        self.config: dict[str, Any] = dict(config or {})

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, ""

    def supports(self, **inputs: Any) -> list[str]:
        return []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind}/{self.name} v{self.version}>"


P = TypeVar("P", bound=type)


@dataclasses.dataclass(frozen=True)
class ProviderInfo:
    kind: str
    name: str
    version: str
    available: bool
    reason: str
    is_default: bool
    priority: int
    description: str
    source: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Registry:
    def __init__(self, load_builtin: bool = True) -> None:
        self._kinds: dict[str, str] = dict(BUILTIN_KINDS)
        self._methods: dict[str, tuple[tuple[str, ...], ...]] = dict(KIND_METHODS)
        self._providers: dict[str, dict[str, type[Provider]]] = {k: {} for k in self._kinds}
        self._lock = threading.RLock()
        self._load_builtin = load_builtin
        self._loaded = not load_builtin
        self._loading = False
        self.entry_point_errors: dict[str, str] = {}

    # ---- kinds -------------------------------------------------------------------------------------------
    def register_kind(self, kind: str, description: str = "", methods: Iterable[str] = ()) -> None:
        """Create a kind (a no-op for a known one); ``methods``: what every provider of a new kind must define."""
        if not isinstance(kind, str) or not kind or not kind.replace("_", "").isalnum():
            raise ValueError(f"kind: expected a non-empty identifier, got {kind!r}")
        with self._lock:
            if kind not in self._kinds:
                self._methods[kind] = (tuple(methods),) if methods else ()
            self._kinds.setdefault(kind, description)
            self._providers.setdefault(kind, {})

    def kinds(self) -> list[str]:
        self._ensure_loaded()
        with self._lock:
            return list(self._kinds)

    # ---- registration ------------------------------------------------------------------------------------
    def register(self, cls: P, *, override: bool = False) -> P:
        """Register a Provider subclass (usable as a class decorator). Unknown kinds are created on the fly.

        ``override=True`` replaces a provider of the same kind and name (a built-in too: the built-ins are loaded
        first, so the replacement is not undone by them). A kind keeps exactly one default: replacing the default
        takes a class that is a default too, and a second default of another name is refused either way. The same
        class defined again (a module reloaded, or imported under two names) replaces the earlier definition."""
        if not (inspect.isclass(cls) and issubclass(cls, Provider)):
            raise TypeError(f"provider: expected a subclass of apt.core.registry.Provider, got {cls!r}")
        if not cls.kind or not cls.name:
            raise ValueError(f"provider {cls.__qualname__}: class attributes 'kind' and 'name' must be set")
        if not isinstance(cls.kind, str) or not isinstance(cls.name, str):
            raise TypeError(f"provider {cls.__qualname__}: 'kind' and 'name' must be strings, got "
                            f"{cls.kind!r} and {cls.name!r}")
        if cls.name == "auto":
            raise ValueError(f"provider {cls.__qualname__}: the name 'auto' is reserved (it asks for the best "
                             f"available provider)")
        self._ensure_loaded()  # a no-op while the built-ins themselves register
        with self._lock:
            if cls.kind not in self._kinds:
                self.register_kind(cls.kind, "")
            alternatives = self._methods.get(cls.kind, ())
            if alternatives and not any(all(callable(getattr(cls, m, None)) for m in alt) for alt in alternatives):
                need = " or ".join(", ".join(alt) for alt in alternatives)
                have = [m for alt in alternatives for m in alt if callable(getattr(cls, m, None))]
                raise TypeError(f"provider {_qualname(cls)} ({cls.kind}/{cls.name}): a {cls.kind!r} provider must "
                                f"define {need}" + (f" (it has {', '.join(have)})" if have else ""))
            slot = self._providers[cls.kind]
            existing = slot.get(cls.name)
            same = existing is not None and (existing is cls or _qualname(existing) == _qualname(cls))
            if existing is not None and not same and not override:
                raise RegistryError(
                    f"provider {cls.kind}/{cls.name} is already registered by {_qualname(existing)}; "
                    f"pass override=True to replace it with {_qualname(cls)}")
            if existing is not None and existing.is_default and not cls.is_default:
                raise RegistryError(
                    f"provider {cls.kind}/{cls.name} is the kind's default: {_qualname(cls)} replaces it only with "
                    f"is_default = True (the kind would have no default to fall back to)")
            if cls.is_default:
                for other in slot.values():
                    if other.is_default and other.name != cls.name:
                        raise RegistryError(
                            f"kind {cls.kind!r} already has default provider {other.name!r}; "
                            f"{cls.name!r} cannot also be the default")
            slot[cls.name] = cls
        return cls

    def unregister(self, kind: str, name: str) -> None:
        with self._lock:
            self._providers.get(kind, {}).pop(name, None)

    # ---- lookup ------------------------------------------------------------------------------------------
    def _check_kind(self, kind: str) -> dict[str, type[Provider]]:
        """A snapshot of the kind's providers: lookups iterate it while another thread may (un)register."""
        self._ensure_loaded()
        with self._lock:
            if kind not in self._providers:
                raise RegistryError(f"unknown provider kind {kind!r}; known kinds: {', '.join(sorted(self._kinds))}")
            return dict(self._providers[kind])

    def default_name(self, kind: str) -> Optional[str]:
        return self._default_in(self._check_kind(kind))

    @staticmethod
    def _default_in(slot: dict[str, type[Provider]]) -> Optional[str]:
        for name, cls in slot.items():
            if cls.is_default:
                return name
        return None

    def provider_class(self, kind: str, name: str) -> type[Provider]:
        slot = self._check_kind(kind)
        if name not in slot:
            raise RegistryError(f"no provider {name!r} of kind {kind!r}; registered: {', '.join(slot) or 'none'}")
        return slot[name]

    def resolve(self, kind: str, name: Optional[str] = None, *, strict: bool = False) -> tuple[type[Provider], str]:
        """The provider class to use for (kind, name) and why it was chosen (empty when it is the one asked for).

        ``name=None`` means the default, ``name="auto"`` the available provider with the highest priority.
        """
        slot = self._check_kind(kind)
        default = self._default_in(slot)
        if name == "auto":
            ranked = sorted(slot.values(), key=priority_order)
            skipped = []
            for cls in ranked:
                ok, why = _available(cls)
                if ok:
                    return cls, ("; ".join(skipped) if skipped else "")
                skipped.append(f"{cls.name}: {why}")
            raise RegistryError(f"kind {kind!r}: no provider is available ({'; '.join(skipped)})")
        if name is None:
            if default is None:
                raise RegistryError(f"kind {kind!r} has no default provider; ask for one of: "
                                    f"{', '.join(slot) or 'none'}")
            name = default
        why = ""
        if name not in slot:
            close = difflib.get_close_matches(str(name), list(slot), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            why = f"{name!r} is not registered for kind {kind!r} (registered: {', '.join(slot) or 'none'}{hint})"
        else:
            ok, reason = _available(slot[name])
            if ok:
                return slot[name], ""
            why = f"{name!r} is unavailable: {reason}"
        if strict:
            raise RegistryError(f"kind {kind!r}: {why}")
        if default is None:
            raise RegistryError(f"kind {kind!r}: {why}, and the kind has no default provider to fall back to")
        if default == name:
            raise RegistryError(f"kind {kind!r}: the default provider {why}")
        ok, reason = _available(slot[default])
        if not ok:
            raise RegistryError(f"kind {kind!r}: {why}, and the default {default!r} is unavailable too: {reason}")
        logger.warning("apt registry: asked for %s/%s, using %s/%s instead: %s", kind, name, kind, default, why)
        return slot[default], why

    def get(self, kind: str, name: Optional[str] = None, config: Optional[dict[str, Any]] = None,
            *, strict: bool = False) -> Provider:
        """An instance of the provider (kind, name) built with ``config``, falling back to the kind's default."""
        cls, why = self.resolve(kind, name, strict=strict)
        inst = cls(config)
        inst.fallback_reason = why  # type: ignore[attr-defined]
        inst.requested_name = name  # type: ignore[attr-defined]
        return inst

    def select(self, kind: str, names: Optional[Iterable[str]] = None, config: Optional[dict[str, Any]] = None,
               **inputs: Any) -> Provider:
        """The first provider (by priority, or in the order of ``names``) that is available and supports
        ``inputs``; the default if none does, with a warning that names the candidates and why each was skipped."""
        slot = self._check_kind(kind)
        if isinstance(names, str):  # one name, not its characters
            names = [names]
        order = list(names) if names is not None else [
            c.name for c in sorted(slot.values(), key=priority_order)]
        reasons = []
        for name in order:
            if name not in slot:
                reasons.append(f"{name}: not registered")
                continue
            ok, why = _available(slot[name])
            if not ok:
                reasons.append(f"{name}: {why}")
                continue
            # third-party code: a constructor or probe that raises skips the candidate, as available() does
            try:
                inst = slot[name](config)
            except Exception as exc:
                reasons.append(f"{name}: constructing it raised {type(exc).__name__}: {exc}")
                continue
            try:
                not_ok = list(inst.supports(**inputs))
            except Exception as exc:
                reasons.append(f"{name}: supports() raised {type(exc).__name__}: {exc}")
                continue
            if not not_ok:
                inst.fallback_reason = "; ".join(reasons)  # type: ignore[attr-defined]
                return inst
            reasons.append(f"{name}: {'; '.join(not_ok)}")
        inst = self.get(kind, None, config)
        why = "; ".join(reasons)
        # the fallback rule: say what was asked for, what is used and why (here even the default may not fit)
        logger.warning("apt registry: no %s provider among %s supports these inputs (%s); using the default %s/%s",
                       kind, ", ".join(order) or "none", why, kind, inst.name)
        inst.fallback_reason = why  # type: ignore[attr-defined]
        return inst

    def list_providers(self, kind: Optional[str] = None) -> list[ProviderInfo]:
        kinds = [kind] if kind is not None else self.kinds()
        out = []
        for k in kinds:
            for name, cls in self._check_kind(k).items():
                out.append(self._info(k, name, cls))
        return out

    def get_info(self, kind: str, name: str) -> ProviderInfo:
        return self._info(kind, name, self.provider_class(kind, name))

    @staticmethod
    def _info(kind: str, name: str, cls: type[Provider]) -> ProviderInfo:
        ok, why = _available(cls)
        return ProviderInfo(kind=kind, name=name, version=cls.version, available=ok, reason=why,
                            is_default=cls.is_default, priority=cls.priority,
                            description=cls.description or _own_doc(cls).split("\n")[0],
                            source=_qualname(cls))

    # ---- discovery ---------------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        # another thread waits here until the loading thread is done; the loading thread itself (a built-in or an
        # entry point registering) gets through, the lock being reentrant, and returns on _loading
        with self._lock:
            if self._loaded or self._loading:
                return
            self._loading = True
            try:
                importlib.import_module("apt.providers").register_builtin(self)
                self.load_entry_points()
            finally:
                self._loading = False
                self._loaded = True

    def load_entry_points(self, entry_points: Optional[Iterable[metadata.EntryPoint]] = None) -> None:
        """Load providers from the ``apt.providers`` entry-point group (or the given entry points).
        A broken entry point is logged and recorded in ``entry_point_errors``; it never stops the others."""
        eps = list(entry_points) if entry_points is not None else _group_entry_points(ENTRY_POINT_GROUP)
        for ep in eps:
            if ep.value.startswith("apt.providers:"):
                continue  # our own built-ins, already registered
            try:
                obj = ep.load()
                self._register_object(obj)
            except Exception as exc:  # third-party code: isolate failures
                msg = f"{type(exc).__name__}: {exc}"
                self.entry_point_errors[f"{ep.name} = {ep.value}"] = msg
                logger.warning("apt registry: entry point %s = %s failed to load: %s", ep.name, ep.value, msg)

    def _register_object(self, obj: Any) -> None:
        if inspect.isclass(obj) and issubclass(obj, Provider):
            try:
                self.register(obj)
            except RegistryError as exc:
                if "override=True" not in str(exc):
                    raise
                raise RegistryError(f"{exc} (an entry point naming a class cannot pass it: point the entry point at "
                                    f"a callable taking the registry that calls registry.register(cls, "
                                    f"override=True))") from None
        elif isinstance(obj, ModuleType):
            pass  # importing the module ran its @register decorators
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                self._register_object(item)
        elif callable(obj):
            result = obj(self)
            if result is not None:
                self._register_object(result)
        else:
            raise TypeError(f"entry point object {obj!r} is not a Provider class, module, list or callable")


def priority_order(p: Any) -> tuple[int, bool, str]:
    """Sort key of the order ``name="auto"`` and :meth:`Registry.select` try providers in (a provider class or a
    :class:`ProviderInfo`): highest priority first, the default before others of its priority, then by name."""
    return (-p.priority, not p.is_default, p.name)


def _own_doc(cls: type) -> str:
    """The class's own docstring (inspect.getdoc would give an undocumented provider its base class's)."""
    doc = cls.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _available(cls: type[Provider]) -> tuple[bool, str]:
    try:
        ok, why = cls.available()
    except Exception as exc:  # an availability probe must never take the registry down
        return False, f"available() raised {type(exc).__name__}: {exc}"
    return bool(ok), (why or ("" if ok else "unavailable (no reason given)"))


def _group_entry_points(group: str) -> list[metadata.EntryPoint]:
    eps = metadata.entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=group))
    return list(eps.get(group, []))  # type: ignore[union-attr]


# ---- the process-wide registry and its module-level API --------------------------------------------------
REGISTRY = Registry()


@overload
def register(cls: P, *, override: bool = False) -> P: ...
@overload
def register(cls: None = None, *, override: bool = False) -> Callable[[P], P]: ...


def register(cls: Optional[P] = None, *, override: bool = False) -> Union[P, Callable[[P], P]]:
    """Register a provider class: ``@register`` or ``@register(override=True)``."""
    if cls is None:
        return lambda c: REGISTRY.register(c, override=override)
    return REGISTRY.register(cls, override=override)


def register_kind(kind: str, description: str = "", methods: Iterable[str] = ()) -> None:
    REGISTRY.register_kind(kind, description, methods)


def get(kind: str, name: Optional[str] = None, config: Optional[dict[str, Any]] = None, *,
        strict: bool = False) -> Provider:
    return REGISTRY.get(kind, name, config, strict=strict)


def select(kind: str, names: Optional[Iterable[str]] = None, config: Optional[dict[str, Any]] = None,
           **inputs: Any) -> Provider:
    return REGISTRY.select(kind, names, config, **inputs)


def list_providers(kind: Optional[str] = None) -> list[ProviderInfo]:
    return REGISTRY.list_providers(kind)


def get_info(kind: str, name: str) -> ProviderInfo:
    return REGISTRY.get_info(kind, name)


def kinds() -> list[str]:
    return REGISTRY.kinds()
