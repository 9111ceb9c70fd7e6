#!/usr/bin/env python
"""Compile the Triton kernels ahead of time for a GPU target, without a GPU: catches the real compiler's errors that
TRITON_INTERPRET=1 never sees, and reports shared memory, registers and spills (from the bundled ptxas -v).

Usage:
    python scripts/triton_aot_check.py [--only scan,moe,tva] [--arch 90] [--full] [--jobs N] [--quiet]

How: each launcher in apt_kernels/triton/{scan,moe}.py is called with small CPU tensors (in the dtypes and layouts
that apt_kernels/ops/{scan,moe}.py hand it) while its kernels are replaced by a recorder; every recorded launch is
then specialized exactly as Triton's runtime would (the native ``specialize_impl``: integers equal to 1 become
constexpr 1, integers and pointers divisible by 16 get ``tt.divisibility``, big integers become i64) and compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` at the launcher's num_warps/num_stages
(Triton's defaults: none set them). Each kernel is compiled in a "typical" layout (contiguous, sizes multiples of
16) and an "odd" one (odd sizes, row strides and unaligned base pointers), over its boolean constexpr flags: all
on, all off, and each flag flipped from both (--full: every combination), with fp32/fp16/bf16 rotated over them.
TVA (--only tva, or the default set) compiles its configuration tables as /tmp/tvawork/aot.py did.

Prints one line per variant (kernel, flags, shared KB, regs, spills) and a summary; exit code 1 if any variant
fails to compile, 2 if triton's CUDA backend or ptxas is missing. Runs with TRITON_INTERPRET unset (it is
removed here before triton is imported); no GPU or CUDA driver is needed.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton: the kernels must be built for the real compiler

import argparse
import itertools
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
DT_NAME = {F32: "fp32", F16: "fp16", BF16: "bf16"}


def _backend_problem(arch=90):
    """None, or why triton's NVIDIA back end / ptxas cannot be used here."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler.compiler import ASTSource  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return f"triton (or its compiler front end) is not importable: {e!r}"
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:
        return f"triton's NVIDIA (CUDA) backend is missing: {e!r}"
    p = _ptxas(arch)
    if p is None:
        return "ptxas is missing (triton's bundled backends/nvidia/bin/ptxas-blackwell, or TRITON_PTXAS_BLACKWELL_PATH)"
    return None


def _ptxas(arch=90):
    """The ptxas triton itself uses for arch (get_ptxas: ptxas-blackwell from sm_90 on), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        p = get_ptxas(arch).path
    except Exception:
        return None
    return p if p and os.access(p, os.X_OK) else None


# ---------------------------------------------------------------------------------------------------------------
# recording launches
class _Recorder:
    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.fn.__name__, args, kwargs))
        return launch


def record(module, call):
    """Run call() with every @triton.jit kernel of module replaced by a recorder; the recorded launches."""
    import triton
    log, saved = [], {}
    for name, obj in vars(module).items():
        if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
            saved[name] = obj
            setattr(module, name, _Recorder(obj, log))
    try:
        call()
    finally:
        for name, obj in saved.items():
            setattr(module, name, obj)
    return log


def _t(shape, dtype, odd=False, device="cpu"):
    """A tensor of shape; odd: a view with its base pointer one element off alignment and padded row strides."""
    if not odd:
        return torch.zeros(shape, dtype=dtype, device=device)
    big = torch.zeros(*shape[:-1], shape[-1] + 3, dtype=dtype, device=device)
    return big[..., 1:shape[-1] + 1]


def specialize(fn, args, kwargs):
    """(signature, constexprs, attrs, desc) for a launch of fn, as Triton's runtime specializes it."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    sig, cx, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        val = args[i] if i < len(args) else kwargs[name]
        if p.is_constexpr:
            sig[name] = "constexpr"
            cx[name] = val
            continue
        ty, spec = native_specialize_impl(CUDABackend, val, False, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        if ty == "constexpr":
            sig[name] = "constexpr"
            cx[name] = spec
        else:
            sig[name] = ty
            a = CUDABackend.parse_attr(spec) if isinstance(spec, str) else []
            if a:
                attrs[(i,)] = a
    return sig, cx, attrs


# ---------------------------------------------------------------------------------------------------------------
# variants
def _flag_sets(names, full):
    if full:
        return [dict(zip(names, v)) for v in itertools.product((False, True), repeat=len(names))]
    sets = [dict.fromkeys(names, True), dict.fromkeys(names, False)]
    for n in names:
        sets.append({m: m != n for m in names})
        sets.append({m: m == n for m in names})
    return list({tuple(s.values()): s for s in sets}.values())  # without repeats, in first-seen order


def scan_launches(full):
    """(label, kernel_name, args, kwargs) for the scan kernels."""
    from apt_kernels.triton import scan as ts
    out = []

    def bc(kind, batch, dim, N, L, G, dtype, odd):
        if kind == "const":
            return _t((dim, N), dtype, odd)
        if kind == "var":
            return _t((batch, N, L), dtype, odd)
        return _t((batch, G, N, L), dtype, odd)

    def fwd_bwd(flags, dtype, pdtype, odd, N, label):
        batch, dim, L = (2, 40, 37) if odd else (2, 64, 128)
        G = 2
        bk = ("var" if not odd else "group") if flags["B_VAR"] else "const"
        ck = ("group" if not odd else "var") if flags["C_VAR"] else "const"
        u = _t((batch, dim, L), dtype, odd)
        delta = _t((batch, dim, L), dtype, odd)
        z = _t((batch, dim, L), dtype, odd) if flags["HAS_Z"] else None
        A = _t((dim, N), pdtype, odd)
        B = bc(bk, batch, dim, N, L, G, pdtype, odd)
        C = bc(ck, batch, dim, N, L, G, pdtype, odd)
        D = _t((dim,), pdtype) if flags["HAS_D"] else None
        bias = _t((dim,), pdtype) if flags["HAS_BIAS"] else None
        sp = flags["SOFTPLUS"]
        log = record(ts, lambda: ts.selective_scan_fwd_triton(u, delta, A, B, C, D, z, bias, sp, 64))
        for name, a, k in log:
            out.append((label, name, a, k))
        if "HAS_DLAST" in flags:
            _, last, ckpt = (None, torch.zeros(batch, dim, N), torch.zeros(batch, dim, (L + 63) // 64, N))
            dout = _t((batch, dim, L), dtype, odd)
            dlast = last if flags["HAS_DLAST"] else None
            log = record(ts, lambda: ts.selective_scan_bwd_triton(u, delta, A, B, C, D, z, bias, dout, dlast, ckpt,
                                                                  sp, 64))
            for name, a, k in log:
                out.append((label, name, a, k))

    def keep(launches, kernel):
        return [x for x in launches if x[1] == kernel]

    # forward: its six flags; backward: the same plus HAS_DLAST (each bwd variant's fwd launch is dropped)
    fnames = ["HAS_D", "HAS_Z", "HAS_BIAS", "SOFTPLUS", "B_VAR", "C_VAR"]
    for kernel, names in (("_scan_fwd_kernel", fnames), ("_scan_bwd_kernel", fnames + ["HAS_DLAST"])):
        before = len(out)
        for i, flags in enumerate(_flag_sets(names, full)):
            for odd in (False, True):
                dtype = DTYPES[(i + odd) % 3]
                f = dict(flags)
                if kernel == "_scan_fwd_kernel":
                    f.pop("HAS_DLAST", None)
                fwd_bwd(f, dtype, F32, odd, 5 if odd else 16, "odd" if odd else "typical")
        new = keep(out[before:], kernel)
        del out[before:]
        out.extend(new)
        # state sizes: N=64 and N=128 (BLOCK_D 32 / 16), fp32 params and bf16 params
        before = len(out)
        allon = dict.fromkeys(names, True)
        if kernel == "_scan_fwd_kernel":
            allon.pop("HAS_DLAST", None)
        for N, dtype, pdtype in ((64, BF16, F32), (128, F16, F32), (16, BF16, BF16)):
            fwd_bwd(dict(allon), dtype, pdtype, False, N, f"N{N}-params-{DT_NAME[pdtype]}")
        new = keep(out[before:], kernel)
        del out[before:]
        out.extend(new)

    # decode step
    names = ["HAS_D", "HAS_Z", "HAS_BIAS", "SOFTPLUS"]

    def step(flags, dtype, sdtype, pdtype, odd, N, G, label):
        batch, dim = (3, 40) if odd else (4, 64)
        state = _t((batch, dim, N), sdtype, odd)
        x, dt = _t((batch, dim), dtype, odd), _t((batch, dim), dtype, odd)
        z = _t((batch, dim), dtype, odd) if flags["HAS_Z"] else None
        A = _t((dim, N), pdtype, odd)
        B = _t((batch, N), pdtype, odd) if G == 0 else _t((batch, G, N), pdtype, odd)
        C = _t((batch, G or 1, N), pdtype, odd)
        D = _t((dim,), pdtype) if flags["HAS_D"] else None
        bias = _t((dim,), pdtype) if flags["HAS_BIAS"] else None
        log = record(ts, lambda: ts.selective_state_update_triton(state, x, dt, A, B, C, D, z, bias,
                                                                  flags["SOFTPLUS"]))
        for name, a, k in log:
            out.append((label, name, a, k))

    for i, flags in enumerate(_flag_sets(names, full)):
        for odd in (False, True):
            dtype = DTYPES[(i + odd) % 3]
            step(flags, dtype, DTYPES[(i + 1 + odd) % 3], F32, odd, 5 if odd else 16, 0 if i % 2 else 2,
                 "odd" if odd else "typical")
    for N, dtype, sdtype in ((128, BF16, F32), (64, F16, F16)):
        step(dict.fromkeys(names, True), dtype, sdtype, F32, False, N, 1, f"N{N}-state-{DT_NAME[sdtype]}")
    return out


def moe_launches(full):
    from apt_kernels.triton import moe as tm
    out = []

    def add(label, log):
        for name, a, k in log:
            out.append((label, name, a, k))

    # routing: (N tokens, E experts, k, cap); the probabilities are fp32 (the ops' softmax)
    route_cases = [(256, 8, 2, -1, False), (256, 64, 2, 64, False), (512, 256, 8, -1, False),
                   (64, 4096, 2, 16, False), (48, 128, 1, 1, False), (37, 6, 2, 13, True), (37, 61, 3, -1, True),
                   (5, 1000, 4, 7, True), (33, 2048, 1, -1, True)]
    for n, e, k, cap, odd in route_cases:
        probs = _t((n, e), F32, odd)
        add(f"{'odd' if odd else 'typical'} N{n} E{e} k{k} cap{cap}", record(tm, lambda: tm.route(probs, k, cap)))

    # dispatch / combine and their backwards: row C values in any float dtype, fp32 weights, int64 indices
    cases = [(1024, 2, False), (4096, 1, False), (512, 8, False), (1000, 2, True), (77, 3, True), (8, 1, True)]
    for i, (c, k, odd) in enumerate(cases):
        for dtype in (DTYPES if full else (DTYPES[i % 3], DTYPES[(i + 1) % 3])):
            n, e, cap = (64, 8, 16) if not odd else (37, 5, 11)
            s = e * cap
            x = _t((n, c), dtype, odd)
            tos = torch.full((s,), -1, dtype=torch.int64)
            slot = torch.zeros(n, k, dtype=torch.int64)
            w = torch.zeros(n, k, dtype=F32)
            buf = _t((s, c), dtype, odd)
            gy = _t((n, c), dtype, odd)
            label = f"{'odd' if odd else 'typical'} C{c} k{k} {DT_NAME[dtype]}"
            add(label, record(tm, lambda: tm.dispatch(x, tos)))
            add(label, record(tm, lambda: tm.dispatch_backward(buf, slot, n)))
            add(label, record(tm, lambda: tm.combine(buf, w, slot)))
            add(label, record(tm, lambda: tm.combine_backward(gy, buf, w, slot, tos)))
    return out


def tva_jobs():
    """(label, kernel_name, sig, cx, attrs, warps, stages) for the TVA configuration tables."""
    from apt_kernels.triton import tva
    jobs = []
    PTR = {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "DELTA": "*fp16", "GATE": "*fp16", "COEF": "*fp32",
           "PAD": "*i8", "O": "*fp16", "LSE": "*fp32", "DO": "*fp16", "DI": "*fp32", "DK": "*fp16", "DV": "*fp16",
           "DQ": "*fp16", "DDELTA": "*fp16", "ROWDOT": "*fp32"}
    ONES = {"sqd", "skd", "svd", "sdd", "sod", "sgd_", "sgh", "spt"}
    FLOATS = {"qk_scale", "scale"}
    for dtype, table in (("fp16", tva._SM90_16BIT), ("bf16", tva._SM90_16BIT), ("fp32", tva._FP32)):
        for (which, bucket), cfg in table.items():
            c = tva.KernelConfig(*cfg)
            consts = dict(CAUSAL=True, HAS_WINDOW=False, HAS_PAD=False, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                          BLOCK_D=bucket, EVEN_D=True, PREC="ieee" if dtype == "fp32" else "tf32")
            kern = {"fwd": "_tva_fwd_kernel", "dkdv": "_tva_bwd_dkdv_kernel"}.get(which, "_tva_bwd_dq_kernel")
            if which == "fwd":
                consts.update(HAS_DELTA=False, HAS_GATE=False)
            fn = getattr(tva, kern)
            sig, cx, attrs = {}, {}, {}
            for i, name in enumerate(fn.arg_names):
                if name in consts:
                    sig[name] = "constexpr"
                    cx[name] = consts[name]
                elif name in PTR:
                    sig[name] = PTR[name].replace("fp16", dtype)
                    attrs[(i,)] = [["tt.divisibility", 16]]
                elif name in ONES:
                    sig[name] = "constexpr"
                    cx[name] = 1
                elif name in FLOATS:
                    sig[name] = "fp32"
                else:
                    sig[name] = "i32"
                    if name.startswith("s"):
                        attrs[(i,)] = [["tt.divisibility", 16]]
            jobs.append((f"tva D{bucket} {dtype} {tuple(cfg)}", "tva", kern, sig, cx, attrs, c.num_warps,
                         c.num_stages))
    return jobs


def _with_i64_strides(launches, mod):
    """The launches, plus for each kernel's first one an "i64-strides" copy: its strides > 1 grown by 2**32 (same
    residue mod 16), as for tensors past 2**31 elements, which Triton passes as i64."""
    done = set()
    for label, kern, args, kwargs in launches:
        yield label, kern, args, kwargs
        if kern in done:
            continue
        done.add(kern)
        fn = getattr(mod, kern)
        names = [p.name for p in fn.params]
        big = list(args)
        changed = False
        for i, v in enumerate(args):
            n = names[i]
            if (n.startswith("s_") or n.startswith("stride")) and isinstance(v, int) and not isinstance(v, bool) \
                    and v > 1 and not fn.params[i].is_constexpr:
                big[i] = v + 2 ** 32
                changed = True
        if changed:
            yield "i64-strides", kern, tuple(big), kwargs


# ---------------------------------------------------------------------------------------------------------------
# compiling
_FLAG_RE = re.compile(r"^(HAS_|B_VAR|C_VAR|SOFTPLUS|CAUSAL|EVEN_D)")


def _compile_job(job):
    label, modname, kern, sig, cx, attrs, warps, stages, arch = job
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource
    mod = importlib.import_module(f"apt_kernels.triton.{modname}")
    fn = getattr(mod, kern)
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, sig, cx, attrs), target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=warps, num_stages=stages))
    except Exception as e:
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
        return dict(job=job, ok=False, error=msg[-4000:], secs=time.perf_counter() - t0)
    regs = spill_st = spill_ld = stack = "?"
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(k.asm["ptx"])
        gpu = f"sm_{arch}{'a' if arch >= 90 else ''}"
        r = subprocess.run([_ptxas(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", p, "-o",
                            os.path.join(d, "k.o")], check=False, capture_output=True, text=True)
        info = r.stderr
        if r.returncode:
            return dict(job=job, ok=False, error=f"ptxas -v failed: {info.strip()[-2000:]}",
                        secs=time.perf_counter() - t0)
        m = re.findall(r"Used (\d+) registers", info)
        regs = m[-1] if m else "?"
        m = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", info)
        if m:
            stack, spill_st, spill_ld = m[-1]
    return dict(job=job, ok=True, shared=k.metadata.shared, regs=regs, spill_st=spill_st, spill_ld=spill_ld,
                stack=stack, secs=time.perf_counter() - t0)


def _describe(sig, cx):
    flags = [f"{n}={int(v)}" for n, v in cx.items() if _FLAG_RE.match(n) and isinstance(v, bool)]
    blocks = [f"{n}={v}" for n, v in cx.items() if n.startswith("BLOCK") or n in ("K", "CHUNK")]
    ptrs = sorted({t for t in sig.values() if t.startswith("*")})
    ones = [n for n, v in cx.items() if sig.get(n) == "constexpr" and v == 1 and not isinstance(v, bool)
            and not n.isupper()]
    i64 = sum(1 for t in sig.values() if t == "i64")
    return " ".join(flags + blocks), ",".join(ptrs) + (f" i64-args={i64}" if i64 else ""), len(ones)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="scan,moe,tva", help="comma-separated subset of scan,moe,tva")
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an int (90: H100/H200)")
    ap.add_argument("--full", action="store_true", help="every combination of the boolean flags")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    a = ap.parse_args(argv)
    why = _backend_problem(a.arch)
    if why:
        print(f"triton_aot_check: cannot compile for CUDA here: {why}", file=sys.stderr)
        return 2
    which = [w.strip() for w in a.only.split(",") if w.strip()]
    t0 = time.perf_counter()
    jobs = []
    for w, launches in (("scan", scan_launches), ("moe", moe_launches)):
        if w not in which:
            continue
        from importlib import import_module
        mod = import_module(f"apt_kernels.triton.{w}")
        seen = set()
        for label, kern, args, kwargs in _with_i64_strides(launches(a.full), mod):
            fn = getattr(mod, kern)
            sig, cx, attrs = specialize(fn, args, kwargs)
            key = (kern, tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in cx.items())),
                   tuple(sorted(attrs)), kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))
            if key in seen:
                continue
            seen.add(key)
            # the launch's num_warps/num_stages, else Triton's defaults
            jobs.append((label, w, kern, sig, cx, attrs, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3),
                         a.arch))
    if "tva" in which:
        jobs += [j + (a.arch,) for j in tva_jobs()]
    print(f"triton_aot_check: {len(jobs)} variants for sm_{a.arch} ({', '.join(which)}), {a.jobs} processes",
          flush=True)
    results = []
    if a.jobs > 1:
        import multiprocessing as mp
        with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("fork")) as ex:
            it = ex.map(_compile_job, jobs)
            for r in it:
                results.append(r)
                _print(r, a.quiet)
    else:
        for j in jobs:
            r = _compile_job(j)
            results.append(r)
            _print(r, a.quiet)
    bad = [r for r in results if not r["ok"]]
    spills = [r for r in results if r["ok"] and r["spill_st"] not in ("0", "?")]
    print(f"\nsummary: {len(results) - len(bad)}/{len(results)} compiled in {time.perf_counter() - t0:.1f}s; "
          f"{len(bad)} failed; {len(spills)} with register spills")
    per = {}
    for r in results:
        if r["ok"]:
            k = r["job"][2]
            d = per.setdefault(k, dict(n=0, regs=0, shared=0, spill=0))
            d["n"] += 1
            d["regs"] = max(d["regs"], int(r["regs"]) if r["regs"] != "?" else 0)
            d["shared"] = max(d["shared"], r["shared"])
            d["spill"] = max(d["spill"], int(r["spill_st"]) if r["spill_st"] != "?" else 0)
    for k, d in per.items():
        print(f"  {k:26s} {d['n']:3d} variants  max regs {d['regs']:3d}  max shared {d['shared'] / 1024:6.1f} KB  "
              f"max spill stores {d['spill']} B")
    for r in bad:
        print(f"FAILED {r['job'][2]} [{r['job'][0]}]: {r['error'].splitlines()[-1][:300] if r['error'] else ''}")
    return 1 if bad else 0


def _print(r, quiet):
    label, _, kern, sig, cx, _, warps, stages, _ = r["job"]
    flags, ptrs, ones = _describe(sig, cx)
    if r["ok"]:
        if not quiet:
            print(f"ok   {kern:24s} [{label}] {flags} ptrs={ptrs} ones={ones} | shared {r['shared'] / 1024:.1f} KB, "
                  f"regs {r['regs']}, spill st/ld {r['spill_st']}/{r['spill_ld']} B, stack {r['stack']} B "
                  f"({r['secs']:.1f}s)", flush=True)
    else:
        print(f"FAIL {kern:24s} [{label}] {flags} ptrs={ptrs}\n{r['error']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
