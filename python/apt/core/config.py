"""Profiles: YAML files describing a model, its data, its training run, its plugins and their schedules.

A profile may ``extends:`` another (a built-in profile name such as ``base``, or a path relative to the extending
file); the child is deep-merged over the parent (mappings merge key by key, a null section keeps the parent's,
anything else replaces), except ``name``, which is never inherited: a profile file's name is its own ``name:`` or
its file's stem (a mapping's: its own or ``run``), and it names the run directory (``apt_runs/<name>/``). Dotted
overrides (``--model.attention_name flash_v2``, ``--training.max_epochs=3``, or ``{"training.lr": 1e-3}``) are
applied last, with values parsed as YAML scalars (``3`` -> int, ``1e-3`` -> float, ``[a, b]`` -> list); a mapping
value merges into the section it names key by key, as a child profile's would (``--plugins.align '{weight: 0.2}'``
keeps the profile's other align settings). A key written twice in one YAML mapping is an error (PyYAML kept the
last one), and integers are read the YAML 1.2 way (``010`` is 10, not octal 8; ``1:30`` is a string, not 90).

Every merged profile is validated against :data:`SCHEMA`: an unknown key, a value of the wrong type or an
impossible combination raises :class:`ConfigError` whose message names the key (and, for a misspelt key, the
closest known one) and where it came from: the profile file, or the override as the user wrote it
(``--training.bogus: unknown key 'training.bogus'``) when an override set it. Free-form sections (provider
arguments such as ``model.attention`` and the per-plugin settings under ``plugins.<name>``) are passed through
unchecked: their owner validates them.

The result is a plain nested ``dict`` (what checkpoints store and what ``ModelBuilder`` takes).
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import yaml

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"

_NUM = (int, float)
_MISSING = object()
# one text for this check and the model builder's (which also sees configs built without validation)
MOE_AS_FFN_NAME = ("'moe' is the mixture-of-experts layer, which the builder places itself: set model.moe.enabled: "
                   "true (configured by model.moe.*) and keep model.ffn_name a dense FFN provider (dense)")


class _ProfileLoader(yaml.SafeLoader):
    """SafeLoader reading numbers the YAML 1.2 way: PyYAML (YAML 1.1) reads ``1e-3`` and ``3e4``, without a dot,
    as strings, and a profile's ``lr: 1e-3`` would then be rejected as "expected number, got str"."""


_ProfileLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ProfileLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


# YAML 1.2 integers: PyYAML (YAML 1.1) reads ``010`` as 8 (octal) and ``1:30`` as 90 (base 60), silently; here
# ``010`` is 10, ``0o10`` is 8 and ``1:30`` stays a string (a type error where a number is expected).
_ProfileLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in _ProfileLoader.yaml_implicit_resolvers.items()}
_ProfileLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    # a digit after the prefix: "0x_" alone was a ValueError from int(), not a ConfigError; a sign as PyYAML took it
    re.compile(r"^[-+]?(?:[0-9][0-9_]*|0o_*[0-7][0-7_]*|0x_*[0-9a-fA-F][0-9a-fA-F_]*|0b_*[01][01_]*)$"),
    list("-+0123456789"))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    try:
        if body[:2] in ("0o", "0x", "0b"):
            return sign * int(body, 0)
        return sign * int(body, 10)
    except ValueError:  # an explicit !!int tag on a non-number: a YAML error (a ConfigError naming the file)
        raise yaml.constructor.ConstructorError(None, None, f"expected an integer, got {text!r}",
                                                node.start_mark) from None


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    """A mapping whose keys are unique: PyYAML keeps the last of two equal keys, so a second ``model:`` section
    (or a second ``lr:``) silently dropped the first one."""
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:  # the mapping's own keys: one may override a key merged in by ``<<: *anchor``
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # the constructor reports an unhashable key
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r} (first at line "
                f"{seen[key].line + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=True)


_ProfileLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_ProfileLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def yaml_load(stream: Any) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats (``1e-3`` is a number); what profiles and overrides are read with."""
    return yaml.load(stream, Loader=_ProfileLoader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A profile cannot be loaded or is invalid. The message names the offending key and its source (the profile
    file, or the override that set it)."""


# dotted key -> (accepted types, allow None). Sections listed in FREE_SECTIONS accept any sub-keys.
SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), True),
    "description": ((str,), True),
    "seed": ((int,), False),
    # model
    "model.backbone": ((str,), False),
    "model.vocab_size": ((int,), True),
    "model.d_model": ((int,), False),
    "model.num_layers": ((int,), False),
    "model.num_heads": ((int,), False),
    "model.d_ff": ((int,), True),
    "model.max_seq_len": ((int,), False),
    "model.dropout": (_NUM, False),
    "model.norm": ((str,), False),
    "model.norm_eps": (_NUM, False),
    "model.tie_embeddings": ((bool,), False),
    "model.init_std": (_NUM, False),
    "model.attention_name": ((str,), True),
    "model.attention": ((dict,), False),
    "model.tva.r": ((int,), False),
    "model.tva.s": ((int,), False),
    "model.tva.tau": (_NUM, False),
    "model.tva.alpha": (_NUM, False),
    "model.tva.window": ((int,), True),
    "model.ffn_name": ((str,), True),
    "model.ffn.activation": ((str,), False),
    "model.moe.enabled": ((bool,), False),
    "model.moe.num_experts": ((int,), False),
    "model.moe.k": ((int,), False),
    "model.moe.capacity_factor": (_NUM, True),
    "model.moe.eval_capacity_factor": ((int, float, str), True),
    "model.moe.min_capacity": ((int,), False),
    "model.moe.router_name": ((str,), True),
    "model.moe.router": ((dict,), False),
    "model.moe.balance_coef": (_NUM, False),
    "model.moe.z_coef": (_NUM, False),
    "model.moe.every": ((int,), False),
    "model.moe.shared_expert": ((bool,), False),
    "model.moe.noisy_gating": ((bool,), False),
    "model.moe.activation": ((str,), True),
    "model.mamba.d_state": ((int,), False),
    "model.mamba.d_conv": ((int,), False),
    "model.mamba.expand": ((int,), False),
    "model.mamba.dt_rank": ((int,), True),
    "model.mamba.scan_name": ((str,), True),
    # data
    "data.dataset": ((str,), False),
    "data.path": ((str,), True),
    "data.text_field": ((str,), False),
    "data.tokenizer": ((str,), False),
    "data.tokenizer_path": ((str,), True),
    "data.bpe_vocab_size": ((int,), False),
    "data.seq_len": ((int,), False),
    "data.batch_size": ((int,), False),
    "data.val_fraction": (_NUM, False),
    # training
    "training.max_epochs": ((int,), False),
    "training.max_steps": ((int,), True),
    "training.steps_per_epoch": ((int,), True),
    "training.lr": (_NUM, False),
    "training.min_lr_ratio": (_NUM, False),
    "training.weight_decay": (_NUM, False),
    "training.betas": ((list,), False),
    "training.warmup_steps": ((int,), False),
    "training.grad_clip": (_NUM, True),
    "training.grad_accum": ((int,), False),
    "training.amp": ((str, bool), False),
    "training.device": ((str,), False),
    "training.out_dir": ((str,), True),
    "training.save_every": ((int,), True),
    "training.log_every": ((int,), False),
    "training.progress": ((bool,), False),
    "training.eval": ((bool,), False),
    "training.eval_batches": ((int,), True),
    "training.resume": ((str,), True),
    # plugins + schedules
    "plugins.enabled": ((list,), False),
    "schedules": ((dict,), False),
}

# Sections whose sub-keys are not checked here (their provider / plugin checks them).
FREE_SECTIONS = ("model.attention", "model.moe.router", "schedules")

CHOICES: dict[str, tuple[str, ...]] = {
    "model.backbone": ("gpt", "mamba"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.ffn.activation": ("gelu", "swiglu", "relu"),
    "training.amp": ("auto", "off", "bf16", "fp16", "true", "false"),
}


# other frameworks' names for profile keys (Hugging Face, nanoGPT, Megatron...): a "did you mean" by spelling alone
# sent `training.learning_rate` to min_lr_ratio and `model.n_embd` to norm
ALIASES: dict[str, tuple[str, ...]] = {
    "model.d_model": ("n_embd", "hidden_size", "dim", "d_embed", "embed_dim", "width"),
    "model.num_layers": ("n_layer", "n_layers", "num_hidden_layers", "layers", "depth"),
    "model.num_heads": ("n_head", "n_heads", "num_attention_heads", "heads"),
    "model.d_ff": ("intermediate_size", "ffn_dim", "ffn_hidden_size", "d_hidden"),
    "model.max_seq_len": ("block_size", "n_positions", "max_position_embeddings", "context_length", "n_ctx"),
    "model.moe.k": ("top_k", "topk", "num_experts_per_tok", "experts_per_token"),
    "model.moe.num_experts": ("n_experts", "experts", "n_routed_experts"),
    "model.moe.capacity_factor": ("capacity",),
    "data.seq_len": ("seq_length", "sequence_length", "context_len"),
    "data.batch_size": ("bs", "batch", "micro_batch_size"),
    "training.lr": ("learning_rate", "lr_max", "max_lr"),
    "training.max_epochs": ("epochs", "num_epochs", "num_train_epochs", "n_epochs"),
    "training.max_steps": ("steps", "total_steps", "num_steps", "train_steps"),
    "training.warmup_steps": ("warmup", "num_warmup_steps", "warmup_iters"),
    "training.grad_clip": ("clip_grad", "max_grad_norm", "clip_grad_norm", "gradient_clipping"),
    "training.grad_accum": ("gradient_accumulation_steps", "accumulate_grad_batches", "grad_accumulation"),
}


def suggest_key(key: str, known: Iterable[str]) -> Optional[str]:
    """The known key a misspelt / misplaced / foreign-named ``key`` most likely means, or None: a same-section key
    close to its last part (or to an alias of it), else the same last part in another section (``lr`` ->
    ``training.lr``), else the closest dotted path."""
    known = sorted(set(known))
    section, _, leaf = key.rpartition(".")
    names: dict[str, str] = {}  # leaf spelling in this section -> key
    for k in known:
        ksec, _, kleaf = k.rpartition(".")
        if ksec == section:
            names.setdefault(kleaf, k)
            for alias in ALIASES.get(k, ()):
                names.setdefault(alias, k)
    close = difflib.get_close_matches(leaf, list(names), n=1, cutoff=0.75)
    if close:
        return names[close[0]]
    elsewhere = [k for k in known if k.rpartition(".")[2] == leaf or leaf in ALIASES.get(k, ())]
    if elsewhere:
        return elsewhere[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _known_sections() -> set[str]:
    out = set()
    for key in SCHEMA:
        parts = key.split(".")
        for i in range(1, len(parts)):
            out.add(".".join(parts[:i]))
    return out


# ---- loading -----------------------------------------------------------------------------------------------
def builtin_profiles() -> list[str]:
    """Names of the profiles shipped in ``apt/profiles``."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def resolve_profile_path(name_or_path: Union[str, os.PathLike], base_dir: Optional[Path] = None) -> Path:
    """A profile given by path (absolute, or relative to ``base_dir`` / the working directory) or by the name of
    a built-in profile (``tiny_debug`` or ``tiny_debug.yaml``)."""
    s = str(name_or_path)
    candidates = []
    p = Path(s).expanduser()
    if base_dir is not None and not p.is_absolute():
        candidates.append(base_dir / p)
    candidates.append(p)
    stem = s[:-5] if s.endswith((".yaml", ".yml")) else s
    if "/" not in stem and os.sep not in stem:
        candidates.append(PROFILE_DIR / f"{stem}.yaml")
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"profile {s!r} not found (looked for {', '.join(str(c) for c in candidates)}; "
                      f"built-in profiles: {', '.join(builtin_profiles())})")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"profile {path}: invalid YAML: {exc}") from None
    except UnicodeDecodeError as exc:  # a binary file, or a profile saved as UTF-16 / Latin-1
        raise ConfigError(f"profile {path}: not UTF-8 text ({exc.reason}: byte "
                          f"{exc.object[exc.start:exc.start + 1]!r})") from None
    except OSError as exc:
        raise ConfigError(f"profile {path}: cannot read: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"profile {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings merge recursively, other values replace. A null over a
    section keeps the section: ``training:`` with every line under it commented out is YAML null, and meant
    "the defaults", not "drop them"."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if v is None and isinstance(out.get(k), Mapping):
            continue
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_chain(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path in seen:
        chain = " -> ".join(str(p.name) for p in seen + (path,))
        raise ConfigError(f"profile {path}: circular 'extends:' ({chain})")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parents = parent if isinstance(parent, list) else [parent]
    merged: dict[str, Any] = {}
    for par in parents:
        if not isinstance(par, str):
            raise ConfigError(f"profile {path}: 'extends' must be a profile name or path, got {par!r}")
        try:
            ppath = resolve_profile_path(par, base_dir=path.parent)
        except ConfigError as exc:
            raise ConfigError(f"profile {path}: extends {par!r}: {exc}") from None
        merged = deep_merge(merged, _inherited(ppath, seen + (path,)))
    return deep_merge(merged, data)


def _inherited(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """What a child takes from the parent profile at ``path``: all of it but ``name``, which names the child's run
    directory (an inherited one made a child of tiny_debug overwrite, and `--resume auto` continue, tiny_debug's
    run)."""
    parent = _load_chain(path, seen)
    parent.pop("name", None)
    return parent


def parse_overrides(items: Union[None, Sequence[str], Mapping[str, Any]]) -> dict[str, Any]:
    """Dotted overrides from CLI-style strings (``["--a.b", "1", "--c.d=x", "e.f=2"]``) or a mapping
    (``{"a.b": 1}``) into ``{"a.b": value}``; string values are parsed as YAML scalars."""
    return {key: value for key, (value, _) in _parse_overrides_labelled(items).items()}


def _parse_overrides_labelled(items: Union[None, Sequence[str], Mapping[str, Any]]) -> dict[str, tuple[Any, str]]:
    """Like :func:`parse_overrides`, with each value paired with how the user wrote its key: ``--a.b`` for a
    command-line flag, ``override a.b`` otherwise. Validation errors about the key name that label rather than
    the profile file."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return {str(k).lstrip("-"): ((_parse_value(v) if isinstance(v, str) else v), f"override {str(k).lstrip('-')}")
                for k, v in items.items()}
    out: dict[str, tuple[Any, str]] = {}
    it = list(items)
    i = 0
    while i < len(it):
        tok = it[i]
        if not isinstance(tok, str):
            raise ConfigError(f"override {tok!r}: expected a string")
        key = tok.lstrip("-")
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        else:
            if not tok.startswith("--"):
                raise ConfigError(f"override {tok!r}: expected --section.key VALUE or section.key=VALUE")
            # the next flag is not a value ('--training.lr --model.d_model 64' set the LR to '--model.d_model')
            if i + 1 >= len(it) or (isinstance(it[i + 1], str) and it[i + 1].startswith("--")):
                raise ConfigError(f"override {tok!r} has no value")
            val = it[i + 1]
            i += 2
        if not key or not re.fullmatch(r"[A-Za-z_][\w\-]*(\.[\w\-]+)*", key):
            raise ConfigError(f"override {tok!r}: {key!r} is not a dotted key")
        out[key] = (_parse_value(val), f"--{key}" if tok.startswith("--") else f"override {key}")
    return out


def _parse_value(s: str) -> Any:
    try:
        return yaml_load(s) if s.strip() != "" else ""
    except yaml.YAMLError:
        return s


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is a {type(nxt).__name__}, not a section")
        node = nxt
    node[parts[-1]] = value


def get_dotted(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def load_profile(profile: Union[str, os.PathLike, Mapping[str, Any]],
                 overrides: Union[None, Sequence[str], Mapping[str, Any]] = None,
                 plugins: Optional[Iterable[str]] = None, validate_cfg: bool = True,
                 override_labels: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """Load a profile (name, path or an already-parsed mapping), resolve ``extends:``, apply ``overrides`` and the
    extra ``plugins`` to enable, validate, and return the nested dict. Profiles are merged over ``base``.

    A validation error about an overridden key names the override, not the profile file: ``--training.lr`` for
    a command-line style override, ``override training.lr`` for the others, or its entry in ``override_labels``
    (``{"training.max_steps": "--max-steps"}``: the option the user typed)."""
    if isinstance(profile, Mapping):
        data = copy.deepcopy(dict(profile))
        parent = data.pop("extends", "base")
        src = "<mapping>"
        cfg = deep_merge(_inherited(resolve_profile_path(parent)) if parent else {}, data)
        cfg.setdefault("name", "run")  # the Trainer's own fallback: apt_runs/run/
    else:
        path = resolve_profile_path(profile)
        src = str(path)
        cfg = _load_chain(path, ())
        if path != (PROFILE_DIR / "base.yaml").resolve():
            cfg = deep_merge(_inherited((PROFILE_DIR / "base.yaml").resolve()), cfg)
        cfg.setdefault("name", path.stem)
    labelled = _parse_overrides_labelled(overrides)
    for key, (value, _) in labelled.items():
        current = get_dotted(cfg, key, _MISSING)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            # merged key by key, as a child profile's section is: --plugins.align '{weight: 0.2}' replaced the
            # whole section, silently dropping the profile's alpha / beta / tau_align (and --model.moe
            # '{enabled: true}' lost num_experts, a KeyError in the model builder)
            value = deep_merge(current, value)
        set_dotted(cfg, key, value)
    if isinstance(plugins, str):  # "moe,align" or "voter": names, not characters
        plugins = [plugins]
    if plugins:
        enabled = list(get_dotted(cfg, "plugins.enabled", []) or [])
        for p in plugins:
            for name in str(p).split(","):
                name = name.strip()
                if name and name not in enabled:
                    enabled.append(name)
        set_dotted(cfg, "plugins.enabled", enabled)
    if validate_cfg:
        labels = {key: label for key, (_, label) in labelled.items()}
        labels.update({k: v for k, v in (override_labels or {}).items() if k in labels})
        validate(cfg, source=src, overrides=labels)
    return cfg


# ---- validation --------------------------------------------------------------------------------------------
class _Where:
    """Who to blame for a key: the override that set it (or a section above it), named as the user wrote it
    (``--training.lr``), else the profile ``source``."""

    def __init__(self, source: str, overrides: Optional[Mapping[str, str]]) -> None:
        self.source = source
        self.overrides = dict(overrides or {})

    def override_of(self, key: str) -> Optional[str]:
        """The override key that set ``key``, a section above it, or (``key`` being a section) a key below it."""
        for o in self.overrides:
            if key == o or key.startswith(o + ".") or o.startswith(key + "."):
                return o
        return None

    def key(self, key: str) -> str:
        """Prefix of a message about one key: ``<file>: key`` or ``--key`` (``--section: key`` for a key inside a
        section given whole on the command line)."""
        o = self.override_of(key)
        if o is None:
            return f"{self.source}: {key}"
        label = self.overrides[o]
        return label if o == key or o.startswith(key + ".") else f"{label}: {key}"

    def of(self, *keys: str) -> str:
        """Prefix of a message about a combination of keys: the first overridden one's label, else the file."""
        for k in keys:
            o = self.override_of(k)
            if o is not None:
                return self.overrides[o]
        return self.source


def validate(cfg: Mapping[str, Any], source: str = "profile", overrides: Optional[Mapping[str, str]] = None) -> None:
    """Raise :class:`ConfigError` naming the first bad key: unknown keys, wrong types, bad choices, impossible
    combinations. ``overrides`` maps the dotted keys set after loading ``source`` (by the command line or a
    mapping) to how to name them (``--training.lr``); an error about such a key names it instead of ``source``."""
    sections = _known_sections()
    known = set(SCHEMA)
    where = _Where(source, overrides)

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where.of(prefix.rstrip('.'))}: key {k!r} under {prefix or 'top level'} "
                                  f"is not a string")
            key = f"{prefix}{k}"
            if any(key == f or key.startswith(f + ".") for f in FREE_SECTIONS):
                if key in SCHEMA:
                    _check_type(key, v, where)
                continue
            if prefix == "plugins." and k != "enabled":
                if v is not None and not isinstance(v, dict):
                    raise ConfigError(f"{where.key(key)}: expected a mapping of plugin settings, got {v!r}")
                continue  # per-plugin settings: the plugin validates them
            if key in known:
                _check_type(key, v, where)
            elif key in sections:
                if v is None:
                    continue
                if not isinstance(v, Mapping):
                    raise ConfigError(f"{where.key(key)}: expected a section (mapping), got {type(v).__name__} {v!r}")
                walk(v, key + ".")
            else:
                o = where.override_of(key)
                if o is not None:  # name the key as typed: 'trainig.max_epochs', not just 'trainig'
                    # ... but a bad key inside a section given whole (--model.tva '{bogus: 1}') is that key
                    bad = o if o.startswith(key + ".") or o == key else key
                    close = suggest_key(bad, known | sections)
                    hint = f" (did you mean {close!r}?)" if close and close != bad else ""
                    raise ConfigError(f"{where.overrides[o]}: unknown key {bad!r}{hint}")
                close = suggest_key(key, known | sections)
                hint = f" (did you mean {close!r}?)" if close else ""
                raise ConfigError(f"{source}: unknown key {key!r}{hint}")

    walk(cfg, "")
    # a profile that extends nothing (a mapping with extends: null) gets no defaults: a missing key was a
    # KeyError deep in the trainer or the model builder
    for key, (_, nullable) in SCHEMA.items():
        if not nullable and get_dotted(cfg, key, _MISSING) is _MISSING:
            o = where.override_of(key)
            if o is not None:  # --model.moe null: the override emptied the section, not the profile
                raise ConfigError(f"{where.overrides[o]}: leaves required key {key!r} unset (set the keys to "
                                  "change, e.g. --model.moe.enabled false, not the whole section to null)")
            raise ConfigError(f"{source}: missing required key {key!r} (extend 'base' for the defaults)")
    _check_semantics(cfg, where)


def _check_type(key: str, value: Any, where: _Where) -> None:
    types, nullable = SCHEMA[key]
    if value is None:
        if not nullable:
            raise ConfigError(f"{where.key(key)} must be set (got null)")
        return
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join("number" if t is float else t.__name__ for t in types if t is not int or float not in types)
        raise ConfigError(f"{where.key(key)}: expected {names}, got {type(value).__name__} {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and key != "seed" and abs(value) >= 2 ** 63:
        # a size past int64 was torch's "Overflow when unpacking long long" TypeError deep in the model builder
        raise ConfigError(f"{where.key(key)}: {value} is out of range (at most 2**63 - 1)")
    if isinstance(value, float) and not math.isfinite(value):  # .nan / .inf would pass every range test below
        raise ConfigError(f"{where.key(key)}: expected a finite number, got {value!r}")
    choices = CHOICES.get(key)
    if choices and isinstance(value, str) and value not in choices:
        raise ConfigError(f"{where.key(key)}: {value!r} is not one of {', '.join(choices)}")


def run_name_problem(name: Any) -> Optional[str]:
    """Why ``name`` cannot name a run directory under ``apt_runs/``, or None: a path separator or a '.' / '..'
    part made ``name: ../escape`` write ``./escape/last.pt``, outside ``apt_runs/``."""
    if not isinstance(name, str):
        return None
    if "/" in name or "\\" in name or name in (".", ".."):
        return (f"{name!r} names the run directory apt_runs/<name>/, so it cannot be '.' or '..' or hold a "
                "path separator; rename the run, or set training.out_dir (--out-dir) for its directory")
    return None


def _check_semantics(cfg: Mapping[str, Any], where: _Where) -> None:
    g = lambda k, d=None: get_dotted(cfg, k, d)  # noqa: E731
    bad_name = run_name_problem(cfg.get("name")) if g("training.out_dir") is None else None  # else only a label
    if bad_name:
        raise ConfigError(f"{where.key('name')}: {bad_name}")
    for key in ("model.d_model", "model.num_layers", "model.num_heads", "model.max_seq_len", "data.seq_len",
                "data.batch_size", "training.max_epochs", "training.grad_accum", "model.moe.num_experts",
                "model.moe.k", "model.moe.every", "model.mamba.d_state", "model.mamba.d_conv", "model.mamba.expand",
                "training.log_every", "model.tva.r"):
        v = g(key)
        if isinstance(v, int) and v < 1:
            raise ConfigError(f"{where.key(key)}: must be >= 1, got {v}")
    for key in ("training.max_steps", "training.steps_per_epoch", "training.save_every", "training.eval_batches",
                "model.d_ff",
                "model.vocab_size", "model.mamba.dt_rank", "model.tva.window"):  # 0 would silently mean the default
        v = g(key)
        if isinstance(v, int) and v < 1:
            raise ConfigError(f"{where.key(key)}: must be >= 1 or null, got {v}")
    d, h = g("model.d_model"), g("model.num_heads")
    if g("model.backbone") == "gpt" and isinstance(d, int) and isinstance(h, int) and d % h:
        raise ConfigError(f"{where.of('model.d_model', 'model.num_heads')}: model.d_model ({d}) must be divisible by "
                          f"model.num_heads ({h})")
    if isinstance(g("model.moe.k"), int) and isinstance(g("model.moe.num_experts"), int) \
            and g("model.moe.k") > g("model.moe.num_experts"):
        raise ConfigError(f"{where.of('model.moe.k', 'model.moe.num_experts')}: model.moe.k ({g('model.moe.k')}) "
                          f"must be <= model.moe.num_experts ({g('model.moe.num_experts')})")
    every, layers = g("model.moe.every"), g("model.num_layers")
    if g("model.backbone") == "gpt" and g("model.moe.enabled") is True and isinstance(every, int) \
            and isinstance(layers, int) and every > layers:
        raise ConfigError(f"{where.of('model.moe.every', 'model.num_layers')}: model.moe.every ({every}) exceeds "
                          f"model.num_layers ({layers}): no block would get an MoE FFN (model.moe.enabled is true)")
    if g("model.ffn_name") == "moe":
        raise ConfigError(f"{where.key('model.ffn_name')}: {MOE_AS_FFN_NAME}")
    sl, ml = g("data.seq_len"), g("model.max_seq_len")
    if g("model.backbone") == "gpt" and isinstance(sl, int) and isinstance(ml, int) and sl > ml:
        raise ConfigError(f"{where.of('data.seq_len', 'model.max_seq_len')}: data.seq_len ({sl}) exceeds "
                          f"model.max_seq_len ({ml})")
    lr = g("training.lr")
    if isinstance(lr, (int, float)) and lr <= 0:
        raise ConfigError(f"{where.key('training.lr')}: must be > 0, got {lr}")
    # numbers the trainer would take without complaint and misuse (a negative grad_clip flips the gradient)
    ranges = (("training.grad_clip", lambda v: v >= 0, "must be >= 0 or null (0 or null: no clipping)"),
              ("training.warmup_steps", lambda v: v >= 0, "must be >= 0"),
              ("training.weight_decay", lambda v: v >= 0, "must be >= 0"),
              ("training.min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
              ("model.dropout", lambda v: 0 <= v < 1, "must be in [0, 1)"),
              ("model.norm_eps", lambda v: v > 0, "must be > 0"),
              ("model.init_std", lambda v: v > 0, "must be > 0"),
              ("model.tva.s", lambda v: v >= 0, "must be >= 0"),
              # a negative coefficient rewards the collapse (or the logit growth) the auxiliary loss penalises
              ("model.moe.balance_coef", lambda v: v >= 0, "must be >= 0"),
              ("model.moe.z_coef", lambda v: v >= 0, "must be >= 0"),
              # torch.manual_seed's range: past it, "Overflow when unpacking long long" naming no key
              ("seed", lambda v: -2 ** 63 <= v < 2 ** 64, "must be in [-2**63, 2**64)"))
    for key, ok, rule in ranges:
        v = g(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not ok(v):
            raise ConfigError(f"{where.key(key)}: {rule}, got {v}")
    vf = g("data.val_fraction")
    if isinstance(vf, (int, float)) and not 0 <= vf < 1:
        raise ConfigError(f"{where.key('data.val_fraction')}: must be in [0, 1), got {vf}")
    betas = g("training.betas")
    if isinstance(betas, list) and (len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"{where.key('training.betas')}: expected two numbers in [0, 1), got {betas!r}")
    enabled = g("plugins.enabled") or []
    if not all(isinstance(p, str) for p in enabled):
        raise ConfigError(f"{where.key('plugins.enabled')}: expected a list of plugin names, got {enabled!r}")
    twice = next((p for i, p in enumerate(enabled) if p in enabled[:i]), None)
    if twice is not None:  # two instances would get every hook twice and share one checkpoint slot
        raise ConfigError(f"{where.key('plugins.enabled')}: {twice!r} is listed twice")
    sched = g("schedules")
    if sched:
        from .schedules import validate_schedules

        try:
            validate_schedules(sched)
        except ValueError as exc:
            # blame the override whose schedule the message names (or one that set the whole section)
            named = [k for k in where.overrides if k == "schedules" or (k.startswith("schedules.") and k in str(exc))]
            raise ConfigError(f"{where.of(*named) if named else where.source}: {exc}") from None


def dump_profile(cfg: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=False)
