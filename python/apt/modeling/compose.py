"""ModelBuilder: a profile -> an :class:`~apt.modeling.model.APTModel`, with every component taken from the
provider registry.

* attention: ``registry.get("attention", model.attention_name).create_layer(d_model, num_heads, **cfg)`` where
  cfg is ``model.tva`` merged with ``model.attention``, plus ``dropout`` when create_layer names that parameter
  (``model.tva`` keys the provider does not accept are dropped with a debug log; a ``model.attention`` key it does
  not accept is an error). A provider with only a core (``forward``) gets a TVAAttention layer around it. An
  unknown/unavailable name falls back to the kind's default (registry warning); if the kind has no usable
  provider at all, a plain causal attention (torch SDPA) is used with a warning.
* FFN: ``registry.get("ffn", model.ffn_name)`` (``dense`` by default). With ``model.moe.enabled``, every
  ``model.moe.every``-th block gets a :class:`MoEWrappedFFN` (dense FFN + the ``moe`` ffn provider's layer, which
  takes its layer from the ``router`` provider ``model.moe.router_name``); when no MoE layer can be built the
  block keeps its dense FFN and a warning says why.
* norms: ``model.norm``; backbone ``gpt`` (attention blocks) or ``mamba`` (selective-scan blocks, scan provider
  ``model.mamba.scan_name``).
"""
from __future__ import annotations

import copy
import difflib
import inspect
import logging
from typing import Any, Callable, Mapping, Optional

from torch import nn

from ..core import registry
from ..core.config import MOE_AS_FFN_NAME
from .layers import CausalSelfAttention, MoEWrappedFFN, default_d_ff, make_norm
from .mamba import MambaMixer
from .model import APTModel, GPTBlock, MambaBlock, init_embeddings

logger = logging.getLogger(__name__)

DEFAULT_VOCAB = 257  # the byte tokenizer


def not_taken(fn: Callable[..., Any], keys: Any) -> list[str]:
    """The names among ``keys`` that ``fn`` has no parameter for (none when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return []
    names = {p.name for p in params}
    return sorted(k for k in keys if k not in names)


def call_accepting(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with only the keyword arguments its signature accepts (all of them if it takes ``**kw``)."""
    dropped = not_taken(fn, kwargs)
    if dropped:
        logger.debug("%s does not take %s; not passed", getattr(fn, "__qualname__", fn), ", ".join(dropped))
    return fn(*args, **{k: v for k, v in kwargs.items() if k not in dropped})


def core_layer(core: Callable[..., Any]) -> Callable[..., nn.Module]:
    """create_layer for an attention provider that has only a core (``forward``): a TVAAttention around it.

    ``dropout`` is named so that the builder passes ``model.dropout`` (it passes it only to a create_layer that
    names it); the other keys go to TVAAttention, which refuses the ones it does not know (a typo in model.tva)."""
    def create_layer(d_model: int, num_heads: int, *, dropout: float = 0.0, **cfg: Any) -> nn.Module:
        """A TVAAttention layer on this provider's core. Keys: TVAAttention's (r, s, tau, alpha, window, causal,
        dropout); ``core`` is refused, as this layer's core is the provider's."""
        from apt_kernels.layers.tva import TVAAttention

        if "core" in cfg:
            raise TypeError("core: create_layer builds the layer on its provider's own core; to pick another core, "
                            "use that provider's create_layer or TVAAttention(core=...)")
        return TVAAttention(d_model, num_heads, dropout=dropout, core=core, **cfg)
    return create_layer


class AutoAttentionCore:
    """The core of a layer built with ``model.attention_name: auto``: for each call, the highest-priority attention
    provider that is available *and supports the call's inputs* (device, dtype, head dim, padding mask, window),
    chosen by ``registry.select`` and remembered per combination (as the Mamba mixer's ``scan_name: auto`` does).
    ``registry.get("attention", "auto")`` alone ranks by priority only: a model built on a CUDA machine took
    ``tva_cuda`` and failed at its first forward for a head dim of 16, float64, or CPU tensors, and on the CPU
    ``tva_cpu`` refused float64 where the reference works. Picklable (the choices are not saved)."""

    def __init__(self) -> None:
        self._chosen: dict[tuple[Any, ...], Any] = {}
        self._warmed: list[tuple[Any, ...]] = []  # the layer settings warm() chose for, chosen again on a copy
        self.__name__ = self.__qualname__ = "attention[auto]"

    def __getstate__(self) -> dict[str, Any]:
        return {"_chosen": {}, "_warmed": list(self._warmed), "__name__": self.__name__,
                "__qualname__": self.__qualname__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy (copy.deepcopy, pickle, torch.save of the model) chooses again, here and now, for what the
        # original was warmed for: else its first forward under torch.compile(fullgraph=True) / torch.export
        # reached registry.select's lock ("Unsupported context manager")
        self.__dict__.update(state)
        self._chosen = {}
        self.__dict__.setdefault("_warmed", [])
        for dev in _warm_devices():
            self.warm_device(dev)

    def provider_for(self, q: Any, key_padding_mask: Any = None, window: Any = None, sinks: int = 0,
                     causal: bool = True) -> Any:
        key = (str(q.device), q.dtype, int(q.shape[-1]), key_padding_mask is not None, window is not None,
               bool(sinks), bool(causal))
        prov = self._chosen.get(key)
        if prov is None:
            # among the providers with a core only: one with a layer of its own (a create_layer, no forward) has
            # nothing this layer can call (its forward was a bare NotImplementedError)
            prov = registry.select("attention", _core_provider_names(), q=q, key_padding_mask=key_padding_mask,
                                   window=window, sinks=sinks, causal=causal)
            logger.debug("apt model: attention provider for %s: %s", key, prov.name)
            self._chosen[key] = prov
        return prov

    def warm(self, layer: Any) -> None:
        """Choose now, outside any forward, for the layer's settings on the CPU (and the current CUDA device once
        CUDA is in use) in fp32, bf16, fp16 and fp64 without a padding mask: the registry lookup takes a lock that
        torch.compile cannot trace. The model re-warms for the device it is moved to (APTModel._apply)."""
        heads, dim = getattr(layer, "num_heads", None), getattr(layer, "head_dim", None)
        if not (isinstance(heads, int) and isinstance(dim, int)):
            return
        window, causal = getattr(layer, "window", None), getattr(layer, "causal", True)
        sinks = getattr(layer, "sinks", 0) if window is not None else 0
        spec = (heads, dim, window, sinks, causal)
        if spec not in self._warmed:
            self._warmed.append(spec)
        for dev in _warm_devices():
            self._warm(spec, dev)

    def warm_device(self, device: Any) -> None:
        """Choose for every layer setting warmed so far on ``device`` (the model was moved there)."""
        for spec in self._warmed:
            self._warm(spec, device)

    def _warm(self, spec: tuple[Any, ...], device: Any) -> None:
        heads, dim, window, sinks, causal = spec
        for t in _warm_tensors(device, (1, heads, 1, dim)):
            self.provider_for(t, None, window, sinks, causal)

    def __call__(self, q, k, v, delta=None, gate=None, coef=0.0, causal=True, window=None, sinks=0,
                 key_padding_mask=None, softmax_scale=None):
        prov = self.provider_for(q, key_padding_mask, window, sinks, causal)
        return prov.forward(q, k, v, delta, gate, coef, causal=causal, window=window, sinks=sinks,
                            key_padding_mask=key_padding_mask, softmax_scale=softmax_scale)


class AutoRouter(registry.Provider):
    """The router of MoE layers built with ``model.moe.router_name: auto``: route / dispatch / combine through the
    highest-priority router provider that is available and supports the tensors' device and dtype, chosen by
    ``registry.select`` per (device, dtype) and remembered. One pick by priority at build took, on a GPU machine,
    the CUDA router for a model run on the CPU. Not registered; picklable (the choices are not saved)."""

    kind, name = "router", "auto"
    description = "per device/dtype: the best available router provider supporting the tensors"

    def __init__(self, config: Optional[dict[str, Any]] = None) -> None:
        super().__init__(config)
        self._chosen: dict[tuple[str, Any], Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_chosen": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy chooses again now, as the original was warmed at build (torch.compile(fullgraph=True) of a
        # deep-copied / unpickled model failed at registry.select's lock)
        self.__dict__.update(state)
        self._chosen = {}
        self.warm()

    def warm_device(self, device: Any) -> None:
        """Choose for ``device`` in every dtype (the model was moved there)."""
        for t in _warm_tensors(device, (0,)):
            self.provider_for(t)

    def provider_for(self, t: Any) -> Any:
        key = (str(t.device), t.dtype)
        prov = self._chosen.get(key)
        if prov is None:
            prov = registry.select("router", None, device=t.device, dtype=t.dtype)
            logger.debug("apt model: router provider for %s %s tensors: %s", t.device, t.dtype, prov.name)
            self._chosen[key] = prov
        return prov

    def warm(self) -> None:
        """Choose now for the CPU (and the current CUDA device once CUDA is in use) in fp32 / bf16 / fp16 / fp64,
        outside any forward: the registry lookup takes a lock that torch.compile cannot trace. The model re-warms
        for the device it is moved to (APTModel._apply)."""
        for dev in _warm_devices():
            self.warm_device(dev)

    def route(self, logits: Any, k: int, capacity_factor: Optional[float] = None, min_capacity: int = 4,
              renormalize: Optional[bool] = None) -> Any:
        return self.provider_for(logits).route(logits, k, capacity_factor, min_capacity, renormalize)

    def dispatch(self, x: Any, routing: Any) -> Any:
        return self.provider_for(x).dispatch(x, routing)

    def combine(self, expert_out: Any, routing: Any) -> Any:
        return self.provider_for(expert_out).combine(expert_out, routing)

    def aux_losses(self, logits: Any, routing: Any) -> Any:
        return self.provider_for(logits).aux_losses(logits, routing)

    def __repr__(self) -> str:
        return "<AutoRouter router/auto: per device/dtype>"


def _warm_tensors(device: Any, shape: tuple[int, ...]) -> list[Any]:
    """Empty probes on ``device`` in the dtypes the auto choosers choose for ahead of use: fp32, bf16, fp16, fp64,
    less those the device cannot hold (MPS has no float64: the probe raised, and with it ``model.to("mps")``);
    such a dtype is never met in a forward there either."""
    import torch

    out = []
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        try:
            out.append(torch.empty(shape, device=device, dtype=dt))
        except (TypeError, RuntimeError) as exc:
            logger.debug("apt model: no %s %s probe for the auto choosers (%s)", device, dt, exc)
    return out


def _warm_devices() -> list[Any]:
    """Where the auto choices are made ahead of use: the CPU, and the current CUDA device only once CUDA is
    initialised -- a tensor on "cuda" would create a context on GPU 0 in every process of a multi-GPU job built
    before torch.cuda.set_device; a model moved to a GPU is warmed for it then."""
    import torch

    devs: list[Any] = [torch.device("cpu")]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devs.append(torch.device("cuda", torch.cuda.current_device()))
    return devs


def _is_core_class(cls: Any) -> bool:
    """Whether a provider class's layer is the plain TVAAttention around its ``forward`` (no create_layer of its
    own)."""
    from ..providers.attention import _AttentionProvider

    own = getattr(cls, "create_layer", None)
    return callable(getattr(cls, "forward", None)) and own in (None, _AttentionProvider.create_layer)


def _is_core_provider(prov: Any) -> bool:
    """Whether the provider's layer is the plain TVAAttention around its ``forward`` (no create_layer of its own)."""
    return _is_core_class(type(prov)) and callable(getattr(prov, "forward", None))


def _core_provider_names() -> list[str]:
    """The registered attention providers with a core only (:func:`_is_core_class`), by priority as
    ``registry.select`` ranks them."""
    infos = sorted(registry.list_providers("attention"), key=registry.priority_order)
    return [i.name for i in infos if _is_core_class(registry.REGISTRY.provider_class("attention", i.name))]


def _is_plain_router(prov: Any) -> bool:
    """Whether the router provider's MoE layer is MoEFFN routed through it (no create_layer of its own)."""
    from ..providers.router import _RouterBase

    own = getattr(type(prov), "create_layer", None)
    return isinstance(prov, registry.Provider) and own in (None, _RouterBase.create_layer)


def _takes(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` has a parameter called ``name`` (not merely ``**kwargs``)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def resolve_vocab_size(configured: Optional[int], tokenizer_vocab: Optional[int]) -> int:
    """The embedding size: ``model.vocab_size`` when set (a padded vocabulary, e.g. a multiple of 64 for the
    GEMMs, is fine), else the tokenizer's. A configured size below the tokenizer's would index past the table."""
    if configured is None:
        return int(tokenizer_vocab or DEFAULT_VOCAB)
    if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
        raise ValueError(f"model.vocab_size: expected a positive int or null, got {configured!r}")
    if tokenizer_vocab is not None and configured < tokenizer_vocab:
        raise ValueError(f"model.vocab_size: {configured} is smaller than the tokenizer's vocabulary "
                         f"({tokenizer_vocab} ids); set it to >= {tokenizer_vocab} or null (use the tokenizer's)")
    return int(configured)


class ModelBuilder:
    def __init__(self, profile_cfg: Mapping[str, Any], vocab_size: Optional[int] = None) -> None:
        self.cfg = copy.deepcopy(dict(profile_cfg))
        if "model" not in self.cfg:
            raise ValueError("profile: no 'model' section")
        m = self.cfg["model"]
        m["vocab_size"] = resolve_vocab_size(m.get("vocab_size"), vocab_size)
        self.m = m
        self.report: dict[str, str] = {}  # component -> provider actually used (and why, if a fallback)
        self._attn_provider: Any = None
        self._attn_error: Optional[Exception] = None
        self._auto_core: Optional[AutoAttentionCore] = None  # one for the model: one choice per input kind
        self._ffn_provider: Any = None
        self._router: Any = None  # the router provider, resolved once (one fallback warning, not one per layer)

    # ---- components --------------------------------------------------------------------------------------
    def attention(self) -> nn.Module:
        m = self.m
        cfg = dict(m.get("tva") or {})
        cfg.update(m.get("attention") or {})
        name = m.get("attention_name")
        if self._attn_provider is None and self._attn_error is None:  # resolve once: one warning, not per layer
            try:
                self._attn_provider = registry.get("attention", name)
            except registry.RegistryError as exc:
                self._attn_error = exc
        prov = self._attn_provider
        try:
            if prov is None:
                raise self._attn_error  # type: ignore[misc]
            auto_core = name == "auto" and _is_core_provider(prov)
            if auto_core:  # chosen per call for the tensors' device / dtype / head dim, not once by priority
                if self._auto_core is None:
                    self._auto_core = AutoAttentionCore()
                create = core_layer(self._auto_core)
            else:
                create = getattr(prov, "create_layer", None) or core_layer(prov.forward)  # type: ignore[attr-defined]
            if _takes(create, "dropout"):
                cfg.setdefault("dropout", float(m.get("dropout", 0.0)))
            try:
                # model.tva holds TVA's settings, which a provider may not take; model.attention is addressed to
                # the provider itself, so a key of it that create_layer has no parameter for is the user's error
                refused = not_taken(create, (m.get("attention") or {}).keys())
                if refused:
                    raise TypeError(f"create_layer takes no {', '.join(map(repr, refused))} (from model.attention)")
                layer = call_accepting(create, m["d_model"], m["num_heads"], **cfg)
                if auto_core:
                    self._auto_core.warm(layer)  # type: ignore[union-attr]
            except (TypeError, ValueError) as exc:  # a key the layer does not take, a value it refuses
                raise ValueError(f"model.attention / model.tva: the {prov.name!r} layer refused its settings: "
                                 f"{exc}") from None
            if auto_core:
                self.report["attention"] = "auto (per call: the best provider supporting the inputs' device, dtype " \
                                           "and head dim)"
            else:
                self.report["attention"] = prov.name + (f" (fallback: {prov.fallback_reason})"
                                                        if getattr(prov, "fallback_reason", "") else "")
            return layer
        except (registry.RegistryError, AttributeError, ImportError) as exc:
            if "attention" not in self.report:
                logger.warning("apt model: attention provider %r unusable (%s); using plain causal attention",
                               name, exc)
            self.report["attention"] = f"builtin causal attention ({exc})"
            return CausalSelfAttention(m["d_model"], m["num_heads"], dropout=float(m.get("dropout", 0.0)))

    def _d_ff(self, activation: str) -> int:
        return int(self.m.get("d_ff") or default_d_ff(self.m["d_model"], activation))

    def dense_ffn(self) -> nn.Module:
        m = self.m
        act = (m.get("ffn") or {}).get("activation", "gelu")
        if self._ffn_provider is None:
            self._ffn_provider = self._resolve_ffn(m.get("ffn_name") or None)
        prov = self._ffn_provider
        if prov.name == "moe":  # its layer returns (y, aux): a TypeError in the first forward, far from here
            raise ValueError(f"model.ffn_name: {MOE_AS_FFN_NAME}")
        why = getattr(prov, "fallback_reason", "")
        self.report["ffn"] = prov.name + (f" (fallback: {why})" if why else "")
        return call_accepting(prov.create_layer, m["d_model"], self._d_ff(act),  # type: ignore[attr-defined]
                              activation=act, dropout=float(m.get("dropout", 0.0)))

    @staticmethod
    def _resolve_ffn(name: Optional[str]) -> Any:
        """The dense FFN provider for ``model.ffn_name``. An unregistered name falls back to the default, as the
        registry's would, but the warning lists only the names model.ffn_name takes: 'moe' (which it refuses, the
        builder places MoE layers itself) was offered too."""
        slot = [i.name for i in registry.list_providers("ffn")]
        if name is None or name == "auto" or name in slot:
            return registry.get("ffn", name)
        usable = [n for n in slot if n != "moe"]
        close = difflib.get_close_matches(str(name), usable, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        why = (f"{name!r} is not registered for kind 'ffn' (dense FFN providers: {', '.join(usable) or 'none'}"
               f"{hint}; MoE layers come from model.moe.enabled)")
        prov = registry.get("ffn", None)
        logger.warning("apt model: asked for ffn/%s, using ffn/%s instead: %s", name, prov.name, why)
        prov.fallback_reason = why
        prov.requested_name = name
        return prov

    def moe_ffn(self) -> Optional[nn.Module]:
        m, moe = self.m, self.m["moe"]
        act = moe.get("activation") or (m.get("ffn") or {}).get("activation", "swiglu")
        try:
            prov = registry.get("ffn", "moe", strict=True)
            if self._router is None:
                try:
                    self._router = registry.get("router", moe.get("router_name"))
                except registry.RegistryError:
                    self._router = moe.get("router_name")  # the ffn provider says why, or uses MoEFFN's own
                if moe.get("router_name") == "auto" and _is_plain_router(self._router):
                    self._router = AutoRouter()  # chosen per call's device / dtype, not once by priority
                    self._router.warm()
            layer = prov.create_layer(  # type: ignore[attr-defined]
                m["d_model"], self._d_ff(act), num_experts=moe["num_experts"], k=moe["k"],
                capacity_factor=moe.get("capacity_factor"), min_capacity=moe.get("min_capacity", 4),
                activation=act, shared_expert=moe.get("shared_expert", False),
                noisy_gating=moe.get("noisy_gating", False), router_name=self._router,
                router_cfg=moe.get("router") or {}, balance_coef=moe.get("balance_coef", 0.01),
                z_coef=moe.get("z_coef", 0.001), eval_capacity_factor=moe.get("eval_capacity_factor"))
            why = getattr(self._router, "fallback_reason", "")
            self.report["moe"] = getattr(prov, "last_source", prov.name) + (f" (fallback: {why})" if why else "")
            if isinstance(self._router, AutoRouter):
                import torch

                cpu = self._router.provider_for(torch.empty(0, device="cpu")).name  # not meta, in a meta build
                self.report["moe"] = f"router/auto (per device/dtype; {cpu} for cpu float32) in MoEFFN"
            return layer
        except (TypeError, ValueError) as exc:  # a setting the layer does not take (a typo under model.moe.router,
            # say) or refuses: the user's error, not a missing back end, so no silent fallback to a dense model
            raise ValueError(f"model.moe: the MoE layer refused its settings: {exc}") from None
        except (registry.RegistryError, ImportError) as exc:
            logger.warning("apt model: MoE requested but no MoE layer can be built (%s); keeping dense FFNs", exc)
            self.report["moe"] = f"unavailable ({exc})"
            return None

    def norm(self) -> nn.Module:
        return make_norm(self.m.get("norm", "layernorm"), self.m["d_model"], float(self.m.get("norm_eps", 1e-5)))

    # ---- model -------------------------------------------------------------------------------------------
    def build(self) -> APTModel:
        m = self.m
        backbone = m.get("backbone", "gpt")
        d = m["d_model"]
        drop = float(m.get("dropout", 0.0))
        embed = nn.Embedding(m["vocab_size"], d)
        blocks: list[nn.Module] = []
        pos = None
        if backbone == "gpt":
            pos = nn.Embedding(m["max_seq_len"], d)
            moe_cfg = m.get("moe") or {}
            every = int(moe_cfg.get("every", 1))
            for i in range(m["num_layers"]):
                ffn = self.dense_ffn()
                if moe_cfg.get("enabled") and (i + 1) % every == 0:
                    moe = self.moe_ffn()
                    if moe is not None:
                        ffn = MoEWrappedFFN(ffn, moe, active=True)
                blocks.append(GPTBlock(self.attention(), ffn, self.norm(), self.norm(), drop))
        elif backbone == "mamba":
            if (m.get("moe") or {}).get("enabled"):
                logger.warning("apt model: model.moe.enabled is ignored by the mamba backbone (its blocks have no FFN)")
            mc = m.get("mamba") or {}
            scan: Any = mc.get("scan_name")
            if scan != "auto":  # resolved once: one fallback warning for the model, not one per layer
                try:
                    scan = registry.get("scan", scan)
                except registry.RegistryError:
                    pass  # each mixer says why and uses its built-in scan
            for _ in range(m["num_layers"]):
                mixer = MambaMixer(d, d_state=mc.get("d_state", 16), d_conv=mc.get("d_conv", 4),
                                   expand=mc.get("expand", 2), dt_rank=mc.get("dt_rank"), scan_name=scan)
                why = getattr(scan, "fallback_reason", "") if mixer.scan_provider != "builtin-sequential" else ""
                if mixer.auto_scan:  # re-chosen per device / dtype: the pick for the weights as built is not the
                    # one a model moved to the GPU (Trainer) runs
                    w = mixer.in_proj.weight
                    self.report["scan"] = (f"auto (per device/dtype; {mixer.scan_provider} for "
                                           f"{w.device.type} {str(w.dtype).replace('torch.', '')})")
                else:
                    self.report["scan"] = mixer.scan_provider + (f" (fallback: {why})" if why else "")
                blocks.append(MambaBlock(mixer, self.norm()))
        else:
            raise ValueError(f"model.backbone: expected 'gpt' or 'mamba', got {backbone!r}")
        head = nn.Linear(d, m["vocab_size"], bias=False)
        if m.get("tie_embeddings", True):
            head.weight = embed.weight
        init_embeddings(embed, pos, head, float(m.get("init_std", 0.02)))
        model = APTModel(self.cfg, embed, blocks, self.norm(), head, pos_embed=pos, dropout=drop)
        model.build_report = dict(self.report)  # type: ignore[attr-defined]
        # the auto choosers re-warm when the model moves (model.to("cuda:1")): see APTModel._apply
        model.auto_choosers = [c for c in (self._auto_core, self._router)  # type: ignore[attr-defined]
                               if isinstance(c, (AutoAttentionCore, AutoRouter))]
        logger.info("apt model: %s backbone, %.2fM parameters, components %s", backbone,
                    model.num_parameters() / 1e6, self.report)
        return model
