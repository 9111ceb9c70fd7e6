"""``apt bench``: benchmark every available provider of each kernel kind, or render benchmarks/RESULTS.md."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from . import count_type as _count

KINDS = ("attention", "router", "scan")
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "bf16": "bfloat16",
          "bfloat16": "bfloat16"}


def repo_benchmarks_dir() -> Path:
    """benchmarks/ of the source checkout holding this package, else ./benchmarks."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "benchmarks").is_dir() and (parent / "pyproject.toml").is_file():
            return parent / "benchmarks"
    return Path.cwd() / "benchmarks"


def _report(args: argparse.Namespace) -> int:
    from ...bench import report
    from ..main import CLIError

    results = Path(args.results_dir) if args.results_dir else repo_benchmarks_dir() / "results"
    target = Path(args.report_out) if args.report_out else results.parent / "RESULTS.md"
    if args.results_dir and not results.is_dir():  # a typo would replace RESULTS.md with "no result files yet"
        raise CLIError(f"--results-dir: no such directory: {results}; {target} not written")
    rep = report.results_report(results, source=args.results_dir)
    if rep.skipped and not rep.rendered:
        # keep the RESULTS.md there is rather than replace it with "no result files yet"
        raise CLIError(f"--report: none of the {len(rep.skipped)} result file(s) in {results} is a valid run (the "
                       f"warnings above name each file and its bad field); {target} not written")
    if target.is_dir():
        raise CLIError(f"--report-out: {target} is a directory; name the file to write (e.g. {target / 'RESULTS.md'})")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(rep.text + "\n")
    except OSError as exc:
        raise CLIError(f"--report-out: cannot write {target}: {exc.strerror or exc}") from None
    skipped = (f"; skipped {len(rep.skipped)} malformed file(s): {', '.join(f.name for f, _ in rep.skipped)}"
               if rep.skipped else "")
    print(f"apt bench: rendered {len(rep.rendered)} result file(s) from {results} into {target}{skipped}")
    return 0


def _list(kinds: list[str], device: str, quick: bool) -> int:
    """What a run would do: each kind's grid and every provider/peer with its availability."""
    import torch

    from ...bench import peers
    from ...bench.cases import get_case
    from ...core import registry

    for kind in kinds:
        case = get_case(kind)
        grid = case.grid(device, quick)
        print(f"{kind} ({'quick' if quick else 'full'} {device} grid, {len(grid)} shapes; modes: "
              f"{', '.join(case.modes)})")
        print(f"  grid: {case.grid_doc(device, quick)}")
        for info in registry.list_providers(kind):
            state = "available" if info.available else f"unavailable: {info.reason}"
            print(f"  provider {info.name}{' (reference)' if info.is_default else ''}: {state}")
        for peer in peers.peers_for(kind):
            ok, why = peer.available(torch.device(device))
            print(f"  peer {peer.name}: {'available' if ok else 'unavailable: ' + why}")
    return 0


def _list_targets(kinds: list[str], device: str) -> int:
    """The performance targets of ``kinds``: which ``--targets`` would run on ``device``, and why not the others."""
    import torch

    from ...bench import targets
    from ...bench.cases import get_case

    for t in targets.all_targets(kinds):
        where = "runs" if t.device == device else f"not run: {targets.not_run_reason(t.device, torch.device(device))}"
        print(f"{t.name} (issue #{t.issue}; {where}): {t.title} at {get_case(t.kind).label(t.shape)}; "
              f"threshold {t.threshold}")
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _threads(text: str) -> str:
    if text != "auto":
        _count(1)(text)
    return text


def run(args: argparse.Namespace) -> int:
    import torch

    from ..main import CLIError

    if args.report:
        return _report(args)
    from ...bench import report, runner

    if args.device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: torch reports no CUDA device")
    kinds = list(KINDS) if args.kind == "all" else [args.kind]
    # an empty --providers (e.g. "$NAMES" unset in a script) means every provider, as when it is not given
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    if args.targets:
        clash = [flag for flag, on in (("--quick", args.quick), ("--providers", providers is not None),
                                       ("--max-shapes", args.max_shapes is not None), ("--no-peers", args.no_peers))
                 if on]
        if clash:
            raise CLIError(f"--targets runs the issues' shapes, modes and providers: it cannot be combined with "
                           f"{', '.join(clash)}")
    try:
        runner.check_provider_names(kinds, providers)
    except ValueError as exc:
        raise CLIError(f"--{exc}") from None
    if args.targets and args.list:
        return _list_targets(kinds, device)
    if args.list:
        return _list(kinds, device, args.quick)
    try:  # before minutes of benchmarking, not after
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--out: cannot create {args.out}: {exc.strerror or exc}") from None
    results = Path(args.results_dir) if args.results_dir else repo_benchmarks_dir() / "results"
    if args.save:  # the same for --save's folder: a file there was a traceback after the whole run
        try:
            results.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CLIError(f"--results-dir: cannot create {results}: {exc.strerror or exc}") from None
    # the thread count is this run's only: an in-process caller (a test suite, a notebook) gets its own back
    threads_before = torch.get_num_threads()
    try:
        if args.threads == "auto":
            if device == "cpu":
                n = runner.auto_threads()
                if n != torch.get_num_threads():
                    print(f"apt bench: using {n} CPU thread(s) of {torch.get_num_threads()}: the others' cores are "
                          f"busy (load average {os.getloadavg()[0]:.1f}); --threads N overrides", file=sys.stderr)
                torch.set_num_threads(n)
        elif args.threads:
            torch.set_num_threads(int(args.threads))
        dtype: Optional[torch.dtype] = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
        progress = None if args.quiet else (lambda s: print(f"  {s}", file=sys.stderr, flush=True))
        if args.targets:
            from ...bench import targets

            bench_run = targets.run_targets(kinds, device, dtype=dtype, warmup=args.warmup, repeats=args.repeats,
                                            budget_s=args.budget, progress=progress)
        else:
            kw = dict(providers=providers, dtype=dtype, warmup=args.warmup, repeats=args.repeats, budget_s=args.budget,
                      include_peers=not args.no_peers, max_shapes=args.max_shapes, progress=progress)
            bench_run = runner.run_benchmarks(kinds, device, quick=args.quick, **kw)
        paths = report.write_all(bench_run, args.out, plots=not args.no_plots)
        if args.save:
            dest = results / report.result_file_name(bench_run)
            shutil.copyfile(paths["json"], dest)
            print(f"apt bench: saved {dest} (render with `apt bench --report`)")
        if not args.quiet:
            print(report.render_markdown(bench_run))
        wrong = [r for r in bench_run.results if r.status == "wrong"]
        print(f"apt bench: {len(bench_run.results)} rows in {bench_run.meta['wall_s']:.1f} s; wrote "
              f"{paths['markdown']}, {paths['json']}"
              + (f" and {len(paths['plots'])} plot(s)" if paths["plots"] else "")
              + (f"; {len(wrong)} WRONG provider result(s)" if wrong else ""))
        if bench_run.targets is not None:
            print(f"apt bench: targets: {report.target_summary(bench_run.targets)}")
        return 1 if (wrong and args.fail_on_wrong) else 0
    finally:
        torch.set_num_threads(threads_before)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="benchmark every available provider (attention, router, scan) against the reference",
        description="Check each available provider against the reference on the same inputs, then time it "
                    "(warm-up, repeats, median and IQR, peak memory) over a documented grid of shapes; write "
                    "bench.md, bench.json and PNG plots to --out. --quick uses a small grid (under 2 minutes on "
                    "2 CPU cores). --targets runs only the shapes the issues set performance targets at and "
                    "reports each target MET / NOT MET / NOT MEASURABLE. --report renders benchmarks/RESULTS.md "
                    "from benchmarks/results/*.json.")
    p.add_argument("--kind", choices=KINDS + ("all",), default="all", help="which kind to benchmark (default all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="small grid, fewer repeats")
    p.add_argument("--out", default="bench_out", help="output directory (default bench_out/)")
    p.add_argument("--providers", default=None,
                   help="comma-separated provider/peer names to run (the reference always runs); a name that is no "
                        "provider or peer of the kinds run is an error")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--warmup", type=_count(0), default=None, help="untimed calls before timing (default 2; quick 1)")
    p.add_argument("--repeats", type=_count(1), default=None, help="timed calls per measurement (default 10; quick 5)")
    p.add_argument("--budget", type=_seconds, default=None,
                   help="seconds per measurement; fewer repeats (min 3) for slow calls (default 2; quick 0.5)")
    p.add_argument("--max-shapes", type=_count(1), default=None, help="only the first N shapes of each grid")
    p.add_argument("--threads", type=_threads, default="auto",
                   help="torch CPU threads, or 'auto' (default): torch's default lowered to the idle cores")
    p.add_argument("--no-peers", action="store_true", help="skip outside implementations (flash-attn, mamba_ssm...)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--save", action="store_true",
                   help="also copy the JSON into benchmarks/results/ (device and time in the file name)")
    p.add_argument("--targets", action="store_true",
                   help="run the issues' performance targets (their shapes, modes and providers) and report each as "
                        "MET / NOT MET / NOT MEASURABLE with the measured value and threshold; targets set for "
                        "another device type are listed as not measurable (CPU ones run here in well under 2 "
                        "minutes; --device cuda runs the GPU ones); --list --targets lists them")
    p.add_argument("--report", action="store_true",
                   help="render benchmarks/RESULTS.md from benchmarks/results/*.json and exit")
    p.add_argument("--results-dir", default=None, help="results directory for --save/--report")
    p.add_argument("--report-out", default=None,
                   help="file --report writes (default RESULTS.md beside the results folder: benchmarks/RESULTS.md)")
    p.add_argument("--list", action="store_true", help="print the grids and every provider/peer, run nothing")
    p.add_argument("--fail-on-wrong", action="store_true", help="exit 1 when a provider is reported wrong")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines, no table on stdout")
    p.set_defaults(func=run)
