"""``apt info``: versions, back ends, and every provider of every kind with its availability and reason."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

from ...core import registry
from ..main import CLIError


def environment() -> dict[str, Any]:
    import torch

    import apt_kernels
    from apt_kernels import backends

    native_ok, native_why = backends.native_status()
    mod = None
    if native_ok:
        from apt_kernels._native import native_module

        mod = native_module()
    dev = None
    if torch.cuda.is_available():  # first: it initialises CUDA, which the sm_80+ check below needs
        dev = torch.cuda.get_device_name(0)
    cuda_ok, cuda_why = backends.native_cuda_status()
    triton_ok, triton_why = backends.triton_status()
    from apt_kernels._native import host_cache_stats, host_pool_status

    pool = host_cache_stats()
    pool_on, pool_why = host_pool_status()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "apt_kernels": apt_kernels.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": dev,
        "cpu_threads": torch.get_num_threads(),
        "triton": backends.triton_version(),
        "triton_usable": triton_ok,
        "triton_reason": triton_why,
        "triton_interpret": backends.triton_interpret(),
        "native_module": native_ok,
        "native_reason": native_why,
        "native_families": list(getattr(mod, "families", [])) if mod else [],
        "native_openmp": bool(getattr(mod, "with_openmp", False)) if mod else False,
        "cpu_kernel_isa": backends.cpu_kernel_isas(),
        "cpu_isa_env": dict(backends.CPU_ISA_ENV),
        "native_built_with_cuda": bool(getattr(mod, "with_cuda", False)) if mod else False,
        "native_cuda_usable": cuda_ok,
        "native_cuda_reason": cuda_why,
        "host_cache_limit_bytes": pool.get("limit_bytes"),
        "host_pool_on": pool_on,
        "host_pool": pool_why,
    }


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render(env: dict[str, Any], infos: list[registry.ProviderInfo]) -> str:
    out = ["apt environment"]
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    rows = [
        ["python", env["python"]],
        ["torch", f"{env['torch']} (CUDA {env['torch_cuda'] or 'none'})"],
        ["CUDA device", env["cuda_device"] or "none"],
        ["CPU threads", str(env["cpu_threads"])],
        ["triton", f"{env['triton'] or 'not installed'}; usable: {yes(env['triton_usable'])}"
                   + (f" ({env['triton_reason']})" if env["triton_reason"] else "")
                   + (" [TRITON_INTERPRET=1]" if env["triton_interpret"] else "")],
        ["apt_kernels._C", ("built; families: " + ", ".join(env["native_families"])
                            + f"; OpenMP: {yes(env['native_openmp'])}; CUDA kernels: "
                            + yes(env["native_built_with_cuda"])) if env["native_module"] else
                           f"unavailable ({env['native_reason']})"],
        ["CPU kernel ISA", (", ".join(f"{f} {isa}" for f, isa in env["cpu_kernel_isa"].items())
                            + " (caps: " + ", ".join(env["cpu_isa_env"][f] for f in env["cpu_kernel_isa"])
                            + " = generic|avx2)") if env.get("cpu_kernel_isa") else "-"],
        ["native CUDA", "usable" if env["native_cuda_usable"] else f"no ({env['native_cuda_reason']})"],
        ["CPU output pool", env["host_pool"]],
    ]
    out.append(_table(rows, ["component", "status"]))
    out.append("")
    out.append("providers")
    prow = [[i.kind, i.name + (" *" if i.is_default else ""), i.version, "yes" if i.available else "no",
             i.reason if not i.available else ""] for i in infos]
    out.append(_table(prow, ["kind", "name (* default)", "version", "available", "reason"]))
    errors = dict(registry.REGISTRY.entry_point_errors)
    from ... import providers as builtin

    errors.update({f"apt.providers.{k}": v for k, v in builtin.IMPORT_ERRORS.items()})
    if errors:
        out.append("")
        out.append("provider modules that failed to load")
        out.extend(f"  {k}: {v}" for k, v in errors.items())
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    import torch

    if torch.cuda.is_available():
        # native_cuda_status() checks the GPU's compute capability (sm_80+) only once CUDA is initialised (it must
        # not initialise it in a library call, before a fork); a CLI may: else a V100 lists the CUDA kernels usable
        torch.cuda.init()
    try:
        infos = registry.list_providers(args.kind) if args.kind else registry.list_providers()
    except registry.RegistryError as exc:
        raise CLIError(f"--kind: {exc}") from None
    env = environment()
    if args.json:
        json.dump({"environment": env, "providers": [i.as_dict() for i in infos],
                   "entry_point_errors": registry.REGISTRY.entry_point_errors}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(env, infos))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show versions, back ends and every provider with its availability",
                       description="Show torch/Triton/CUDA/compiled-module status and, per kind, every provider "
                                   "with whether it is available here and why not.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--kind", default=None, help="only this kind")
    p.set_defaults(func=run)
