"""``apt plugin``: list plugins (or providers of any kind), show one, enable / disable one in a profile file.

    apt plugin list [--kind router]
    apt plugin info plugin align
    apt plugin enable align --profile my.yaml
    apt plugin disable align --profile my.yaml

enable / disable rewrite only the ``plugins.enabled`` line of the file (comments and layout elsewhere are kept);
when the file's layout cannot be edited in place it is rewritten whole, and a warning says its comments are lost.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import re
import sys
from pathlib import Path
from typing import Optional

import yaml

from ...core import registry
from ...core.config import ConfigError, get_dotted, load_profile, read_yaml, yaml_load
from ..main import CLIError

logger = logging.getLogger("apt.cli.plugin")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def cmd_list(args: argparse.Namespace) -> int:
    kind = args.kind or "plugin"
    try:
        infos = registry.list_providers(kind)
    except registry.RegistryError as exc:
        raise CLIError(str(exc)) from None
    if not infos:
        print(f"no providers of kind {kind!r}")
        return 0
    rows = [[i.name + (" *" if i.is_default else ""), i.version, "yes" if i.available else f"no ({i.reason})",
             i.description] for i in infos]
    print(_table(rows, [f"{kind} (* default)", "version", "available", "description"]))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    try:
        info = registry.get_info(args.kind, args.name)
        cls = registry.REGISTRY.provider_class(args.kind, args.name)
    except registry.RegistryError as exc:
        raise CLIError(str(exc)) from None
    lines = [f"{info.kind}/{info.name} v{info.version}" + (" (default)" if info.is_default else ""),
             f"available: {'yes' if info.available else 'no: ' + info.reason}",
             f"priority: {info.priority}", f"source: {info.source}", f"description: {info.description}"]
    doc = inspect.getdoc(sys.modules.get(cls.__module__)) or ""
    cdoc = inspect.cleandoc(cls.__dict__["__doc__"]) if cls.__dict__.get("__doc__") else ""
    if cdoc:
        lines += ["", cdoc]
    if doc:
        lines += ["", doc]
    print("\n".join(lines))
    return 0


# ---- editing plugins.enabled in a YAML file, keeping its comments -------------------------------------------
_TOP = re.compile(r"^plugins:\s*(#.*)?$")
_KEY = re.compile(r"^(?P<indent>\s+)enabled:(?P<value>[^#]*?)(?P<comment>\s+#.*)?$")


def _flow(names: list[str]) -> str:
    return "[" + ", ".join(names) + "]"


def edit_enabled_text(text: str, names: list[str]) -> Optional[str]:
    """``text`` with ``plugins.enabled`` set to ``names``, other lines untouched; None if the layout is not one
    this editor understands (flow-style ``plugins: {...}``, say)."""
    lines = text.splitlines(keepends=True)
    nl = "\r\n" if "\r\n" in text else "\n"  # new lines in the file's own line ending
    top = next((i for i, ln in enumerate(lines) if _TOP.match(ln.rstrip("\r\n"))), None)
    if top is None:
        if any(re.match(r"^plugins\s*:", ln) for ln in lines):
            return None
        sep = "" if not text or text.endswith("\n") else nl
        return text + sep + f"plugins:{nl}  enabled: {_flow(names)}{nl}"
    end = len(lines)
    for j in range(top + 1, len(lines)):
        s = lines[j].rstrip("\r\n")
        if s.strip() and not s.startswith((" ", "\t")) and not s.lstrip().startswith("#"):
            end = j
            break
    child_indent = None
    for j in range(top + 1, end):
        s = lines[j].rstrip("\r\n")
        if s.strip() and not s.lstrip().startswith("#"):
            child_indent = len(s) - len(s.lstrip())
            break
    for j in range(top + 1, end):
        s = lines[j].rstrip("\r\n")
        m = _KEY.match(s)
        if not m or (child_indent is not None and len(m.group("indent")) != child_indent):
            continue
        eol = lines[j][len(s):] or nl
        value = m.group("value").strip()
        k = j + 1
        if value == "":  # block list below: drop its items
            while k < end:
                t = lines[k].rstrip("\r\n")
                st = t.lstrip()
                ind = len(t) - len(st)
                if st.startswith("- ") or st == "-" or (st and ind > len(m.group("indent"))):
                    k += 1
                elif not st:
                    break
                else:
                    break
        elif not (value.startswith("[") and value.endswith("]")):
            return None
        new = f"{m.group('indent')}enabled: {_flow(names)}{m.group('comment') or ''}{eol}"
        # the dropped block items' comments (``- moe  # why``, comment lines between them) stay, as comment lines
        kept_comments = [f"{m.group('indent')}#{ln.split('#', 1)[1].rstrip(chr(13) + chr(10))}{eol}"
                         for ln in lines[j + 1:k] if "#" in ln]
        return "".join(lines[:j] + [new] + kept_comments + lines[k:])
    indent = " " * (child_indent or 2)
    return "".join(lines[:top + 1] + [f"{indent}enabled: {_flow(names)}{nl}"] + lines[top + 1:])


def set_enabled(path: Path, names: list[str]) -> bool:
    """Write ``plugins.enabled = names`` into the profile file; True if comments/layout were kept."""
    text = path.read_bytes().decode("utf-8")  # not read_text: it would turn CRLF into LF
    before = read_yaml(path)
    new_text = edit_enabled_text(text, names)
    kept = False
    if new_text is not None:
        try:
            after = yaml_load(new_text) or {}
            expect = dict(before)
            expect["plugins"] = dict(expect.get("plugins") or {})
            expect["plugins"]["enabled"] = names
            kept = after == expect
        except yaml.YAMLError:
            kept = False
    if not kept:
        logger.warning("%s: could not edit plugins.enabled in place; rewriting the file (comments are lost)", path)
        data = dict(before)
        data["plugins"] = dict(data.get("plugins") or {})
        data["plugins"]["enabled"] = names
        new_text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
        if "\r\n" in text:
            new_text = new_text.replace("\n", "\r\n")
    path.write_bytes(new_text.encode("utf-8"))  # type: ignore[union-attr]
    return kept


def _toggle(args: argparse.Namespace, enable: bool) -> int:
    path = Path(args.profile)
    if not path.is_file():
        raise CLIError(f"profile file not found: {path}")
    try:
        cfg = load_profile(path)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    current = list(get_dotted(cfg, "plugins.enabled", []) or [])
    name = args.name
    if enable:
        known = {i.name for i in registry.list_providers("plugin")}
        if name not in known:
            raise CLIError(f"unknown plugin {name!r} (registered plugins: {', '.join(sorted(known)) or 'none'})")
        if name in current:
            print(f"{name} is already enabled in {path}")
            return 0
        names = current + [name]
    else:
        if name not in current:
            print(f"{name} is not enabled in {path}")
            return 0
        names = [n for n in current if n != name]
    kept = set_enabled(path, names)
    try:
        load_profile(path)
    except ConfigError as exc:
        print(f"warning: {path} no longer validates: {exc}", file=sys.stderr)
    print(f"{'enabled' if enable else 'disabled'} {name} in {path}: plugins.enabled = {_flow(names)}"
          + ("" if kept else " (file rewritten; comments lost)"))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugin", help="list, inspect, enable or disable plugins",
                       description="List plugins (or providers of another kind), show one provider's details, "
                                   "or enable / disable a plugin in a profile file.")
    ps = p.add_subparsers(dest="plugin_command", metavar="ACTION")
    ls = ps.add_parser("list", help="list plugins (or the providers of --kind)",
                       description="List the registered plugins, or the providers of another kind.")
    ls.add_argument("--kind", default=None, help="provider kind to list (default: plugin); see `apt info`")
    ls.set_defaults(func=cmd_list)
    inf = ps.add_parser("info", help="show one provider: version, availability, documentation",
                        description="Show a provider's version, availability (and why not), source and docs.")
    inf.add_argument("kind", help="provider kind, e.g. plugin, router, attention")
    inf.add_argument("name", help="provider name")
    inf.set_defaults(func=cmd_info)
    for action, enable in (("enable", True), ("disable", False)):
        a = ps.add_parser(action, help=f"{action} a plugin in a profile file (edits plugins.enabled)",
                          description=f"{action.capitalize()} a plugin in a profile YAML file by editing its "
                                      "plugins.enabled list, keeping comments where possible.")
        a.add_argument("name", help="plugin name")
        a.add_argument("--profile", required=True, help="profile YAML file to edit")
        a.set_defaults(func=lambda args, _e=enable: _toggle(args, _e))

    def no_action(args: argparse.Namespace) -> int:
        p.print_help()
        return 1

    p.set_defaults(func=no_action)
