"""The provider registry: registration, lookup, fallback with a warning, errors, entry points."""
from __future__ import annotations

import logging
from importlib import metadata

import pytest

from apt.core.registry import KIND_METHODS, Provider, Registry, RegistryError


def _stub(self, *args, **kwargs):
    raise NotImplementedError


def make(kind, name, *, default=False, ok=True, why="", priority=0, supports=None):
    attrs = dict(kind=kind, name=name, is_default=default, priority=priority,
                 available=classmethod(lambda cls: (ok, why)))
    attrs.update({m: _stub for m in (KIND_METHODS.get(kind) or [()])[0]})  # the kind's interface
    if supports is not None:
        attrs["supports"] = lambda self, **inputs: supports(inputs)
    return type(f"P_{kind}_{name}", (Provider,), attrs)


@pytest.fixture
def reg():
    return Registry(load_builtin=False)


def test_register_get_and_info(reg):
    reg.register(make("attention", "ref", default=True))
    reg.register(make("attention", "fast", priority=5))
    p = reg.get("attention", "fast", {"x": 1})
    assert p.name == "fast" and p.config == {"x": 1} and p.fallback_reason == ""
    assert reg.get("attention").name == "ref"
    info = reg.get_info("attention", "fast")
    assert info.available and info.reason == "" and not info.is_default and info.priority == 5
    names = {(i.kind, i.name) for i in reg.list_providers()}
    assert names == {("attention", "ref"), ("attention", "fast")}
    assert [i.name for i in reg.list_providers("attention")] == ["ref", "fast"]
    assert reg.list_providers("scan") == []


def test_fallback_unavailable_logs_asked_used_why(reg, caplog):
    reg.register(make("scan", "reference", default=True))
    reg.register(make("scan", "triton", ok=False, why="no CUDA device"))
    with caplog.at_level(logging.WARNING, logger="apt.core.registry"):
        p = reg.get("scan", "triton")
    assert p.name == "reference"
    assert "no CUDA device" in p.fallback_reason
    msg = caplog.records[-1].getMessage()
    assert "scan/triton" in msg and "scan/reference" in msg and "no CUDA device" in msg


def test_fallback_missing_name(reg, caplog):
    reg.register(make("router", "topk_default", default=True))
    with caplog.at_level(logging.WARNING, logger="apt.core.registry"):
        p = reg.get("router", "megablocks")
    assert p.name == "topk_default"
    assert "'megablocks' is not registered" in caplog.records[-1].getMessage()
    assert "did you mean" not in caplog.records[-1].getMessage()
    reg.register(make("router", "cpu_native"))
    with caplog.at_level(logging.WARNING, logger="apt.core.registry"):
        reg.get("router", "cpu_natve")  # a typo: the warning names the close match
    assert "did you mean 'cpu_native'?" in caplog.records[-1].getMessage()


def test_strict_raises_instead_of_fallback(reg):
    reg.register(make("scan", "reference", default=True))
    reg.register(make("scan", "cuda", ok=False, why="built without CUDA"))
    with pytest.raises(RegistryError, match="built without CUDA"):
        reg.get("scan", "cuda", strict=True)


def test_no_default_is_a_clear_error(reg):
    reg.register(make("retrieval", "tfidf"))
    with pytest.raises(RegistryError, match="no default provider"):
        reg.get("retrieval")
    with pytest.raises(RegistryError, match="no default provider to fall back to"):
        reg.get("retrieval", "missing")


def test_unknown_kind_and_bad_registration(reg):
    with pytest.raises(RegistryError, match="unknown provider kind 'nope'"):
        reg.get("nope")
    with pytest.raises(TypeError, match="subclass of apt.core.registry.Provider"):
        reg.register(object)
    with pytest.raises(ValueError, match="'kind' and 'name' must be set"):
        reg.register(type("Bad", (Provider,), {}))


def test_duplicate_and_second_default_rejected(reg):
    reg.register(make("ffn", "mlp", default=True))
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(type("OtherMlp", (Provider,), dict(kind="ffn", name="mlp", create_layer=_stub)))
    with pytest.raises(RegistryError, match="already has default provider 'mlp'"):
        reg.register(make("ffn", "other", default=True))
    with pytest.raises(RegistryError, match="already has default provider 'mlp'"):  # override does not make two
        reg.register(make("ffn", "other", default=True), override=True)
    with pytest.raises(RegistryError, match="is the kind's default: .* only with is_default = True"):
        reg.register(make("ffn", "mlp"), override=True)  # the kind would be left without a default
    new = reg.register(make("ffn", "mlp", default=True), override=True)
    assert reg.provider_class("ffn", "mlp") is new and reg.default_name("ffn") == "mlp"


def test_redefined_class_replaces_its_earlier_definition(reg):
    """A module reloaded (a notebook cell run again) redefines its classes: the registry kept the old one."""
    first = reg.register(make("scan", "mine"))
    second = reg.register(make("scan", "mine"))  # same module and qualname, another class object
    assert first is not second and reg.provider_class("scan", "mine") is second


@pytest.mark.parametrize("attrs, exc, fragment", [
    (dict(kind="scan", name="s1", selective_scan_fn=_stub), TypeError,
     "must define selective_scan_fn, selective_state_update \\(it has selective_scan_fn\\)"),
    (dict(kind="router", name="r1", route=_stub), TypeError, "must define route, dispatch, combine or create_layer"),
    (dict(kind="attention", name="a1"), TypeError, "must define forward or create_layer$"),
    (dict(kind="ffn", name="f1", create_layer=3), TypeError, "must define create_layer"),
    (dict(kind="scan", name=123), TypeError, "'kind' and 'name' must be strings"),
    (dict(kind="scan", name="auto"), ValueError, "the name 'auto' is reserved"),
])
def test_registration_checks_the_kinds_interface(reg, attrs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        reg.register(type("P", (Provider,), attrs))


def test_attention_provider_may_be_a_core_or_a_layer(reg):
    reg.register(type("Core", (Provider,), dict(kind="attention", name="core_only", forward=_stub)))
    reg.register(type("Layer", (Provider,), dict(kind="attention", name="layer_only", create_layer=_stub)))
    reg.register_kind("mine", methods=["run"])
    with pytest.raises(TypeError, match="a 'mine' provider must define run"):
        reg.register(type("M", (Provider,), dict(kind="mine", name="m")))
    reg.register(type("M", (Provider,), dict(kind="mine", name="m", run=_stub)))


def test_config_must_be_a_mapping(reg):
    reg.register(make("scan", "reference", default=True))
    with pytest.raises(TypeError, match="config: expected a mapping or None, got str"):
        reg.get("scan", None, "abc")


def test_info_shows_a_providers_own_docstring_only(reg):
    class Documented(Provider):
        """Does things."""
        kind, name = "mine", "documented"

    reg.register(Documented)
    reg.register(type("Undocumented", (Provider,), dict(kind="mine", name="plain")))
    assert reg.get_info("mine", "documented").description == "Does things."
    assert reg.get_info("mine", "plain").description == ""  # was Provider's "Base class of every provider..."


def test_new_kind_is_created_on_registration(reg):
    reg.register(make("tokenizer", "bytes", default=True))
    assert "tokenizer" in reg.kinds()
    assert reg.get("tokenizer").name == "bytes"


def test_default_unavailable_is_an_error(reg):
    reg.register(make("scan", "reference", default=True, ok=False, why="broken"))
    with pytest.raises(RegistryError, match="default provider 'reference' is unavailable: broken"):
        reg.get("scan")


def test_available_raising_counts_as_unavailable(reg):
    def boom(cls):
        raise RuntimeError("probe failed")

    cls = type("Boom", (make("scan", "boom"),), dict(available=classmethod(boom)))
    reg.register(make("scan", "reference", default=True))
    reg.register(cls)
    info = reg.get_info("scan", "boom")
    assert not info.available and "probe failed" in info.reason
    assert reg.get("scan", "boom").name == "reference"


def test_auto_and_select(reg):
    reg.register(make("attention", "ref", default=True))
    reg.register(make("attention", "fast", priority=10, ok=False, why="no GPU"))
    reg.register(make("attention", "mid", priority=5,
                      supports=lambda inp: ["head dim > 128"] if inp.get("head_dim", 0) > 128 else []))
    assert reg.get("attention", "auto").name == "mid"
    assert reg.select("attention", head_dim=64).name == "mid"
    chosen = reg.select("attention", head_dim=256)
    assert chosen.name == "ref"


def test_select_skips_a_candidate_whose_constructor_or_supports_raises(reg, caplog):
    def boom(inputs):
        raise RuntimeError("supports boom")

    class BadInit(make("scan", "bad_init", priority=20)):
        def __init__(self, config=None):
            raise ValueError("init boom")

    reg.register(make("scan", "reference", default=True))
    reg.register(make("scan", "bad_supports", priority=30, supports=boom))
    reg.register(BadInit)
    with caplog.at_level(logging.WARNING, logger="apt.core.registry"):
        chosen = reg.select("scan", u=1)
    assert chosen.name == "reference"
    assert "bad_supports: supports() raised RuntimeError: supports boom" in chosen.fallback_reason
    assert "bad_init: constructing it raised ValueError: init boom" in chosen.fallback_reason


def test_select_with_no_fitting_provider_warns_asked_used_why(reg, caplog):
    reg.register(make("attention", "ref", default=True,
                      supports=lambda inp: ["T > 8192"] if inp.get("T", 0) > 8192 else []))
    reg.register(make("attention", "fast", priority=10, ok=False, why="no GPU"))
    with caplog.at_level(logging.WARNING, logger="apt.core.registry"):
        chosen = reg.select("attention", names=["fast", "nope"], T=100)
    assert chosen.name == "ref"
    assert "fast, nope" in caplog.text and "fast: no GPU" in caplog.text and "nope: not registered" in caplog.text
    assert "using the default attention/ref" in caplog.text
    assert chosen.fallback_reason == "fast: no GPU; nope: not registered"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="apt.core.registry"):
        assert reg.select("attention", T=10_000).name == "ref"
    assert "ref: T > 8192" in caplog.text


def test_entry_points_register_classes_callables_and_isolate_failures(reg, monkeypatch):
    import sys
    import types

    mod = types.ModuleType("fake_apt_plugin")
    mod.Ext = make("attention", "outside_pkg")

    def hook(registry):
        registry.register(make("scan", "outside_scan"))

    mod.hook = hook
    monkeypatch.setitem(sys.modules, "fake_apt_plugin", mod)
    eps = [
        metadata.EntryPoint(name="ext", value="fake_apt_plugin:Ext", group="apt.providers"),
        metadata.EntryPoint(name="hook", value="fake_apt_plugin:hook", group="apt.providers"),
        metadata.EntryPoint(name="broken", value="does_not_exist_pkg:thing", group="apt.providers"),
    ]
    reg.load_entry_points(eps)
    assert reg.provider_class("attention", "outside_pkg") is mod.Ext
    assert reg.provider_class("scan", "outside_scan")
    assert any("broken" in k for k in reg.entry_point_errors)


def test_global_registry_loads_builtins():
    from apt.core import registry

    kinds = registry.kinds()
    for k in ("attention", "ffn", "router", "scan", "align", "retrieval", "dataset"):
        assert k in kinds


def test_a_registration_before_the_first_lookup_loads_the_builtins_first():
    """Overriding a built-in before anything looked the registry up made the built-ins' own registration fail
    half way (blaming the built-in, suggesting override=True, which had been passed) and left the kinds after it
    empty: no scan or plugin providers for the rest of the process."""
    reg = Registry()  # loads the built-ins and entry points at its first use, like apt.core.registry.REGISTRY

    class MySdpa(Provider):
        kind, name = "attention", "sdpa"

        def forward(self, q, k, v, **kw):
            raise NotImplementedError

    reg.register(MySdpa, override=True)
    assert reg.provider_class("attention", "sdpa") is MySdpa
    assert {"reference", "cpu_native"} <= {i.name for i in reg.list_providers("scan")}
    assert "tva_default" in {i.name for i in reg.list_providers("attention")}

    other = Registry()
    with pytest.raises(RegistryError, match="attention/sdpa is already registered by apt.providers.attention.SDPA"):
        other.register(MySdpa)
    assert {i.name for i in other.list_providers("plugin")}  # the built-ins are all there


def test_lookups_while_another_thread_registers(reg):
    """Lookups walked the providers dict without the lock: 'dictionary changed size during iteration', or a
    RegistryError for a provider that went away mid-listing."""
    import threading
    import time

    reg.register(make("scan", "reference", default=True))
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            reg.register(make("scan", f"p{i % 50}"))
            reg.unregister("scan", f"p{(i + 25) % 50}")
            i += 1

    worker = threading.Thread(target=churn)
    worker.start()
    errors = []
    try:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            try:
                reg.list_providers("scan")
                reg.default_name("scan")
                reg.resolve("scan", "auto")
                reg.select("scan", u=1)
            except Exception as exc:  # any failure is the bug
                errors.append(repr(exc))
    finally:
        stop.set()
        worker.join()
    assert not errors, errors[:3]
