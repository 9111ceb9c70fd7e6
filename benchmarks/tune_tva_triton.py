"""Time candidate launch configs of the fused Triton TVA kernels (apt_kernels/triton/tva.py) against torch SDPA's
flash backend on a CUDA GPU, and print a table and the best configs as JSON.

Case: plain causal attention, T = 4096 (--T), B = 16384 / T, H = 2048 / D, for each dtype (--dtypes, bf16 first)
and D (--dims): the shapes of `apt bench`'s attention grid. Forward configs are timed on the forward alone; dK/dV
configs on fwd+bwd with the best forward and the default dQ config, then dQ configs with the best two others.
Dtypes after the first try only their default and the first dtype's winner (--all-candidates: everything).
Each candidate is checked against SDPA (the "attention" tolerance of apt_kernels/testing.py) before it is timed;
one that is wrong or fails to compile is reported and never chosen. Candidates whose shared-memory estimate exceeds
the device's per-block limit are skipped. Most of the time goes into Triton compiles (~1-3 s per candidate): the
sweep starts no new candidate after --budget seconds (default 85; the default configs always run). Rows print as
they finish, then the whole table and one line "BEST {json}".

    python benchmarks/tune_tva_triton.py                      # D 64/128 x bf16/fp16
    python benchmarks/tune_tva_triton.py --dims 128 --dtypes bf16 --json tune.json
    python benchmarks/tune_tva_triton.py --dry-run            # the script's flow on the CPU (Triton interpreter,
                                                              # T=64, B=1, H=2, fp16, SDPA math); times mean nothing

Apply a result with APT_TVA_TRITON_CONFIG="<env string printed per case>" or copy it into the tables of
apt_kernels/triton/tva.py (_SM90_16BIT / _DEFAULT_16BIT).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

# reads TRITON_INTERPRET as Triton does; importing it does not import triton (set below for --dry-run first)
from apt_kernels.backends import triton_interpret

# (kernel, head dim) -> candidates (BLOCK_M, BLOCK_N, num_warps, num_stages), after the table's default. ptxas
# registers per thread for sm_90 (fp16, causal; compiled without a GPU) in the comments; "spills" = local memory.
CANDIDATES = {
    ("fwd", 64): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],              # 144, 228, 136
    ("fwd", 128): [(128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4)],             # 239, 234, 255
    ("dkdv", 64): [(32, 128, 8, 4), (64, 64, 4, 3), (32, 128, 4, 4)],              # 179, 237, 255 + spills
    ("dkdv", 128): [(32, 64, 8, 4), (64, 64, 8, 2), (32, 128, 8, 3)],              # 180, 248, 255 + spills
    ("dq", 64): [(128, 32, 4, 4), (128, 32, 8, 4), (64, 64, 4, 3)],                # 182, 104, 139
    ("dq", 128): [(128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3)],                # 181, 149, 199
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _fail(msg: str) -> None:
    print(f"tune_tva_triton.py: {msg}", file=sys.stderr)
    sys.exit(2)


def _time_ms(fn, reps: int) -> float:
    """Median of ``reps`` timed calls after one warm-up (CUDA events; --dry-run: one perf_counter call)."""
    fn()
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


HEADER = (f"{'case':<12} {'kernel':<6} {'config (BM,BN,warps,stages)':<28} {'smem':>6} {'mode':<8} {'ms':>8} "
          f"{'vs sdpa':>8} {'1st s':>6}  status")


def _show(r: dict) -> str:
    ms = f"{r['ms']:.3f}" if "ms" in r else "-"
    ratio = f"{r['vs_sdpa']:.3f}" if "vs_sdpa" in r else "-"
    return (f"{r['case']:<12} {r['kernel']:<6} {tuple(r['config'])!s:<28} {r['smem_kb']:>4}KB {r['mode']:<8} "
            f"{ms:>8} {ratio:>8} {r.get('first_call_s', '-'):>6}  {r.get('status', '')}")


class Case:
    """One (D, dtype) shape: its inputs, SDPA's outputs and times, and the timed calls of both providers."""

    def __init__(self, dev: torch.device, dtype: torch.dtype, B: int, H: int, T: int, D: int, backend,
                 reps: int) -> None:
        from torch.nn.attention import sdpa_kernel

        from apt_kernels.triton import tva

        g = torch.Generator(device="cpu").manual_seed(0)
        self.q, self.k, self.v, self.go = (torch.randn(B, H, T, D, generator=g).to(dev, dtype) for _ in range(4))
        self.leaves = [t.detach().clone().requires_grad_(True) for t in (self.q, self.k, self.v)]
        self._sdpa_ctx = lambda: sdpa_kernel(backend)
        self._tva = tva.tva_attention_triton
        self.ref = [t.detach() for t in self.sdpa_fwd_bwd()]
        self.sdpa_ms = {"fwd": _time_ms(self.sdpa_fwd, reps), "fwd+bwd": _time_ms(self.sdpa_fwd_bwd, reps)}

    def sdpa_fwd(self) -> torch.Tensor:
        with torch.no_grad(), self._sdpa_ctx():
            return torch.nn.functional.scaled_dot_product_attention(self.q, self.k, self.v, is_causal=True)

    def sdpa_fwd_bwd(self) -> tuple:
        with self._sdpa_ctx():
            o = torch.nn.functional.scaled_dot_product_attention(*self.leaves, is_causal=True)
        return (o, *torch.autograd.grad(o, self.leaves, self.go))

    def ours_fwd(self) -> torch.Tensor:
        with torch.no_grad():
            return self._tva(self.q, self.k, self.v, causal=True)

    def ours_fwd_bwd(self) -> tuple:
        o = self._tva(*self.leaves, causal=True)
        return (o, *torch.autograd.grad(o, self.leaves, self.go))


def tune_case(case: Case, key: str, dtype: torch.dtype, D: int, defaults: dict, pools: dict, reps: int,
              deadline: float, smem_limit: int, rows: list) -> dict:
    """Sweep fwd, then dkdv, then dq candidates (the table default first) on one case; return the winners."""
    from apt_kernels.testing import assert_close
    from apt_kernels.triton import tva

    chosen = dict(defaults)
    result: dict = {}
    for kernel in tva.KERNELS:
        mode = "fwd" if kernel == "fwd" else "fwd+bwd"
        cands = [tuple(defaults[kernel])] + [c for c in pools[kernel] if c != tuple(defaults[kernel])]
        best_ms, best_cfg = float("inf"), defaults[kernel]
        for i, cand in enumerate(cands):
            cfg = tva.KernelConfig(*cand)
            smem = tva.smem_estimate(kernel, cfg, D, 2)
            row = {"case": key, "kernel": kernel, "config": list(cand), "smem_kb": smem // 1024, "mode": mode}
            rows.append(row)
            if smem > smem_limit:
                row["status"] = f"skipped: needs ~{smem // 1024} KB"
            elif i > 0 and time.perf_counter() > deadline:
                row["status"] = "skipped: over --budget"
            else:
                tva.CONFIG_OVERRIDES.clear()
                tva.CONFIG_OVERRIDES.update({**chosen, kernel: cfg})
                try:
                    tc = time.perf_counter()
                    if kernel == "fwd":
                        assert_close(case.ours_fwd(), case.ref[0], dtype=dtype, family="attention", msg="o")
                    else:
                        for what, got, exp in zip(("o", "dq", "dk", "dv"), case.ours_fwd_bwd(), case.ref):
                            assert_close(got, exp, dtype=dtype, family="attention", grad=what != "o", msg=what)
                    row["first_call_s"] = round(time.perf_counter() - tc, 2)
                    ms = _time_ms(case.ours_fwd if kernel == "fwd" else case.ours_fwd_bwd, reps)
                    row.update(status="ok", ms=round(ms, 4), vs_sdpa=round(ms / case.sdpa_ms[mode], 3))
                    if ms < best_ms:
                        best_ms, best_cfg = ms, cfg
                except AssertionError as e:
                    row["status"] = "WRONG: " + " ".join(str(e).split())[:100]
                except Exception as e:  # noqa: BLE001 - compile errors, out of resources: report, try the next
                    row["status"] = f"error: {type(e).__name__}: {' '.join(str(e).split())[:100]}"
                finally:
                    tva.CONFIG_OVERRIDES.clear()
            print(_show(row), flush=True)
        chosen[kernel] = best_cfg
        result[kernel] = list(best_cfg)
        result[f"{kernel}_ms"] = round(best_ms, 4) if best_ms < float("inf") else None
    fb_ms = result["dq_ms"] or result["dkdv_ms"]  # the last fwd+bwd sweep ran with every chosen config
    result.update(sdpa_fwd_ms=round(case.sdpa_ms["fwd"], 4), sdpa_fwd_bwd_ms=round(case.sdpa_ms["fwd+bwd"], 4),
                  fwd_vs_sdpa=round(result["fwd_ms"] / case.sdpa_ms["fwd"], 3) if result["fwd_ms"] else None,
                  fwd_bwd_vs_sdpa=round(fb_ms / case.sdpa_ms["fwd+bwd"], 3) if fb_ms else None,
                  env=";".join(f"{n}={','.join(map(str, chosen[n]))}" for n in tva.KERNELS))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--budget", type=float, default=85.0, help="seconds after which no new candidate starts")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--all-candidates", action="store_true",
                    help="sweep every candidate for each dtype (default: dtypes after the first try only the "
                         "default and the first dtype's winner, to stay within the budget)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--dry-run", action="store_true",
                    help="run the flow on the CPU in the Triton interpreter (T=64, B=1, H=2, fp16, SDPA math)")
    args = ap.parse_args()

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (apt_kernels.triton.tva, below)
        args.T, args.dtypes = min(args.T, 64), "fp16"
    elif triton_interpret():
        _fail("TRITON_INTERPRET is set: this script times compiled kernels on a GPU; unset it")
    elif not torch.cuda.is_available():
        _fail("needs a CUDA GPU (torch.cuda.is_available() is False); nothing was timed")
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        _fail("needs torch.nn.attention.sdpa_kernel (torch >= 2.3)")
    backend = SDPBackend.MATH if args.dry_run else SDPBackend.FLASH_ATTENTION
    os.environ.pop("APT_TVA_TRITON_CONFIG", None)  # time the module's tables, not a leftover override
    from apt_kernels.triton import tva

    t0 = time.perf_counter()
    if args.dry_run:
        dev, name, cap, smem_limit = torch.device("cpu"), "cpu (dry run: Triton interpreter)", (9, 0), 227 * 1024
    else:
        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
        name, cap = props.name, (props.major, props.minor)
        smem_limit = getattr(props, "shared_memory_per_block_optin", 0) or 227 * 1024
    print(f"# {name} (sm_{cap[0]}{cap[1]}), shared memory per block {smem_limit // 1024} KB, torch "
          f"{torch.__version__}, T={args.T}, causal, budget {args.budget:.0f} s", flush=True)
    print(HEADER, flush=True)
    rows: list = []
    best: dict = {}
    dnames = args.dtypes.split(",")
    for n_dtype, dname in enumerate(dnames):
        dtype = DTYPES[dname]
        for D in (int(d) for d in args.dims.split(",")):
            B, H = (1, 2) if args.dry_run else (max(1, 16384 // args.T), 2048 // D)
            key = f"D{D}/{dname}"
            case = Case(dev, dtype, B, H, args.T, D, backend, args.reps)
            print(f"# {key}: B={B} H={H}, sdpa ({backend.name.lower()}) fwd {case.sdpa_ms['fwd']:.3f} ms, "
                  f"fwd+bwd {case.sdpa_ms['fwd+bwd']:.3f} ms  [{time.perf_counter() - t0:.0f} s]", flush=True)
            first = best.get(f"D{D}/{dnames[0]}") if n_dtype > 0 and not args.all_candidates else None
            pools = {k: [tuple(first[k])] if first else CANDIDATES[(k, 64 if D <= 64 else 128)] for k in tva.KERNELS}
            best[key] = tune_case(case, key, dtype, D, tva.table_configs(cap, dtype, D), pools, args.reps,
                                  t0 + args.budget, smem_limit, rows)
            del case
            if not args.dry_run:
                torch.cuda.empty_cache()

    print("\n" + HEADER)
    for r in rows:
        print(_show(r))
    out = {"device": name, "capability": f"sm_{cap[0]}{cap[1]}", "T": args.T, "causal": True,
           "target_fwd_bwd_vs_sdpa": 1.15, "elapsed_s": round(time.perf_counter() - t0, 1)}
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in best.items())
    print("\nBEST " + json.dumps(out)[:-1] + ', "best": {\n' + body + "\n}}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**out, "best": best, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
