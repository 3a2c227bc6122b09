"""Command line of moe-bench (also `python -m moe_kernels.bench`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

import torch

from moe_kernels import _library
from moe_kernels.bench import MODULES, OPS, runs
from moe_kernels.bench.common import (behind_compile, copy_bandwidth_gbps, device_name,
                                      eager_call_rows, format_table, is_peer, measuring,
                                      noise_warning, only_rows)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="moe-bench", description=__doc__)
    p.add_argument("--op", action="append", choices=sorted(OPS),
                   help="public op (or DeepseekV3MoE) to measure (repeatable; default: all)")
    p.add_argument("--backend", action="append", choices=[b for b in _library.BACKENDS
                                                          if b != "reference"],
                   help="kernel backend to time (repeatable; default: all that run here)")
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")],
                   help="comma-separated token counts (default: per op and device)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile reference (saves its compile time)")
    p.add_argument("--only-compile", action="store_true",
                   help="time the torch.compile rows alone (a second pass after a run with "
                        "--no-compile, whose rows come first when time is short)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON (rewritten "
                   "after each op module, with each module's state: a stopped run keeps its rows)")
    p.add_argument("--stall-timeout", type=float, metavar="S",
                   help="an op module that goes S seconds without a row checked or timed "
                        "ends the process, its state 'stalled' (a kernel that hangs; needs "
                        "--json)")
    p.add_argument("--resume", action="store_true",
                   help="go on with the run in --json: keep its rows, skip the modules it "
                        "has a state for")
    p.add_argument("--supervise", action="store_true",
                   help="measure in child processes (--resume), a fresh one after a child "
                        "stopped inside a module: a hang (--stall-timeout), a crash, a lost "
                        "CUDA context (needs --json)")
    p.add_argument("--warm", action="store_true",
                   help="no timing: one call of each of our rows, processes per op module "
                        "at once, so that a timed run after it loads each Triton kernel from "
                        "Triton's cache on disk instead of compiling it (bench/warm.py)")
    p.add_argument("--warm-shards", type=int, default=2, metavar="K",
                   help="--warm: K processes per op module, each a share of its rows "
                        "(default 2)")
    p.add_argument("--warm-module", help=argparse.SUPPRESS)
    p.add_argument("--plot", metavar="PATH",
                   help="also write a PNG of each kernel's %% of roofline (needs matplotlib: "
                        "pip install 'moe_kernels[plot]')")
    p.add_argument("--compare", nargs="+", metavar="JSON",
                   help="no run: A.json B.json prints B's speedup over A per op/case/backend "
                        "and flags regressions; with B.json alone, or both, flags every case "
                        "where a kernel is slower than torch.compile (exit 1 if any flag)")
    p.add_argument("--sm90-report", nargs="?", const="-", metavar="PATH",
                   help="no run: compile every Triton kernel for the H100 (sm_90a, no GPU "
                        "needed), print registers / spills / shared memory / wgmma / waits "
                        "per launch, write the Markdown table to PATH; exit 1 on a gate "
                        "violation")
    p.add_argument("--targets", metavar="JSON",
                   help="no run: judge a results file (--json) against the speed goals "
                        "(docs/benchmarks.md), a Markdown table")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="--compare: a slowdown beyond this fraction is a regression "
                        "(default 0.05)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.sm90_report:
        from moe_kernels.bench import sm90
        return sm90.main([] if args.sm90_report == "-" else ["--markdown", args.sm90_report])
    if args.targets:
        from moe_kernels.bench import targets
        return targets.main(args.targets)
    if args.compare:
        if len(args.compare) > 2:
            raise SystemExit("moe-bench --compare takes B.json or A.json B.json")
        a, b = (None, *args.compare) if len(args.compare) == 1 else args.compare
        table, flagged = compare(a, b, threshold=args.threshold)
        print(table)
        return 1 if flagged else 0
    if args.no_compile and args.only_compile:
        raise SystemExit("moe-bench: --no-compile and --only-compile exclude each other")
    if (args.supervise or args.resume or args.stall_timeout) and not args.json:
        raise SystemExit("moe-bench: --supervise, --resume and --stall-timeout keep the "
                         "run's state in --json PATH")
    if args.warm:
        if args.json or args.plot or args.only_compile:
            raise SystemExit("moe-bench: --warm times nothing: no --json, --plot or "
                             "--only-compile")
        from moe_kernels.bench import warm
        return warm.main(args, sys.argv[1:] if argv is None else argv)
    if args.supervise:
        argv = sys.argv[1:] if argv is None else argv
        return runs.supervise([a for a in argv if a != "--supervise"], args.json)
    if args.plot:
        _require_matplotlib()
    if args.device == "cpu":
        # Inductor's compile workers are processes that outlive the compile and compete with
        # the timed CPU kernels for cores (2.5x slower CPU figures seen with them); GPU
        # timings do not share the cores, and there parallel compiles save minutes.
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import triton
    meta = {"device": device_name(args.device), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "commit": _git_commit(), "extension": _library.extension_loaded(),
            "extension_cuda": _library.extension_has_cuda(),
            "cpu_isa": _library._C.cpu_isa() if _library.extension_loaded() else None,
            "copy_gbps": round(copy_bandwidth_gbps(args.device), 1)}
    print("moe-bench: " + ", ".join(f"{k}={v}" for k, v in meta.items()), flush=True)
    run = (runs.RunState.resumed(args.json, meta) if args.resume
           else runs.RunState(args.json, meta))
    try:
        with runs.stop_on_sigterm():
            status = _run_modules(args, run)
    except runs.Interrupted:
        stopped_in = run.running
        if stopped_in:
            run.set(stopped_in, "interrupted")
        print(f"moe-bench: stopped by SIGTERM{f' inside {stopped_in}' if stopped_in else ''}"
              f" (--resume goes on from there)", file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM
    if status is not None:
        return status
    results = run.results
    print(format_table(results))
    warning = noise_warning(results)
    if warning:
        print(warning, file=sys.stderr)
    for op, case, backend, speedup in behind_compile(results):
        print(f"moe-bench: {op} '{case}' {backend}: {speedup:.2f}x torch.compile (behind)",
              file=sys.stderr)
    if args.plot:
        plot_roofline(results, meta, args.plot)
        print(f"moe-bench: wrote {args.plot}")
    failed = [r for r in results if r.correct is False]
    if failed:
        print(f"moe-bench: {len(failed)} results disagree with the reference", file=sys.stderr)
    failed_modules = run.failed()
    if failed_modules:
        print(f"moe-bench: modules that failed (tracebacks above, or in the output of the "
              f"process that stopped): {', '.join(failed_modules)}", file=sys.stderr)
    return 1 if failed or failed_modules else 0


def _run_modules(args, run) -> int | None:
    """Each selected op module not yet in `run` measured into it; runs.RESTART where one
    lost the CUDA context (the process must stop), else None."""
    selected = set(args.op or OPS)
    row_filter = only_rows({"torch-compile"}) if args.only_compile else contextlib.nullcontext()
    with measuring(selected), row_filter:
        # in MODULES' order: the kernels first, the layer and expert parallelism (which
        # run them all) last, so that a run stopped by a time limit has the op rows
        for module in (m for m in MODULES if selected & set(m.MEASURES)):
            name = runs.module_name(module)
            if name in run.modules:
                print(f"moe-bench: {name}: {run.modules[name]} (resumed run)", file=sys.stderr)
                continue
            t0 = time.perf_counter()
            run.set(name, "running")
            rows, lost = _measure_module(module, args, run, name)
            if lost:
                run.set(name, "lost")
                print(f"moe-bench: the CUDA context is unusable after {name}; stopped "
                      f"(--supervise goes on in a fresh process)", file=sys.stderr)
                return runs.RESTART
            if rows is None:
                run.set(name, "raised")
                continue
            run.set(name, "ok", rows)
            print(f"moe-bench: {name}: {len(rows)} rows in "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return None


def _measure_module(module, args, run, name) -> tuple[list | None, bool]:
    """(the module's rows or None where it raised, whether the CUDA context was lost),
    under the watchdog of --stall-timeout (a check of a broken context can hang too),
    except for a module whose processes have a bound of their own (OWN_TIMEOUT_S): ending
    this process would leave them running on the device."""
    seconds = None if hasattr(module, "OWN_TIMEOUT_S") else args.stall_timeout
    with runs.watchdog(seconds, run, name):
        try:
            rows = module.run(args.device, args.backend, args.tokens,
                              compile_reference=not args.no_compile)
            if args.only_compile:   # modules that time outside measure() too
                return [r for r in rows if r.backend == "torch-compile"], False
            return rows + eager_call_rows(module.MEASURES, args.device, args.backend), False
        except Exception:
            # one op failing (a kernel that does not compile on this device, say) must not
            # cost the rows of the others: a GPU run is short and rare
            traceback.print_exc()
            return None, runs.context_lost(args.device)


def _key(r: dict) -> tuple[str, str, str]:
    return r["op"], r["case"], r["backend"]


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def compare(path_a: str | None, path_b: str, threshold: float = 0.05) -> tuple[str, list]:
    """(table, flagged). With A: B's speedup over A for every (op, case, backend) in both,
    REGRESSION where B is slower than A by more than `threshold`, INCORRECT where B
    disagrees with the reference. Always: BEHIND COMPILE where a kernel of B is slower than
    torch.compile in B's same case."""
    b = _load(path_b)
    a = _load(path_a) if path_a else {"meta": {}, "results": []}
    a_by = {_key(r): r for r in a["results"]}
    behind = {(op, case, backend): f"BEHIND COMPILE ({speedup:.2f}x)"
              for op, case, backend, speedup in behind_compile(b["results"])}
    head = ("op", "case", "backend", "A us", "B us", "speedup", "")
    rows, flagged = [], []
    for r in b["results"]:
        old = a_by.get(_key(r))
        speedup = "-"
        flags = []
        if old is not None:
            if old["time_us"] > 0 and r["time_us"] > 0:  # 0: a peer that could not run
                ratio = old["time_us"] / r["time_us"]
                speedup = f"{ratio:.2f}x"
                if ratio < 1.0 / (1.0 + threshold):
                    flags.append("REGRESSION")
        elif path_a:
            flags.append("new")
        if r.get("correct") is False:
            flags.append("INCORRECT")
        if _key(r) in behind:
            flags.append(behind[_key(r)])
        if any(f != "new" for f in flags):
            flagged.append(_key(r))
        rows.append((*_key(r), f"{old['time_us']:.2f}" if old else "-", f"{r['time_us']:.2f}",
                     speedup, " ".join(flags)))
    missing = [k for k in a_by if k not in {_key(r) for r in b["results"]}]
    rows += [(*k, f"{a_by[k]['time_us']:.2f}", "-", "-", "missing in B") for k in missing]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    title = (f"A: {path_a} ({a['meta'].get('device')}, {a['meta'].get('commit')})\n"
             if path_a else "")
    title += f"B: {path_b} ({b['meta'].get('device')}, {b['meta'].get('commit')})"
    n_reg = sum("REGRESSION" in r[-1] for r in rows)
    summary = (f"{n_reg} regression(s) beyond {threshold:.0%}, {len(behind)} case(s) behind "
               f"torch.compile")
    return "\n".join([title, line(head), line(["-" * w for w in widths])]
                     + [line(r) for r in rows] + [summary]), flagged


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("moe-bench --plot needs matplotlib: pip install 'moe_kernels[plot]'")


def plot_roofline(results, meta: dict, path: str) -> None:
    """Horizontal bars: each kernel's % of its roofline (memory or compute floor), the
    torch baselines beside in grey; 100% is the device's limit."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r.op} | {r.case} | {r.backend}" for r in results]
    values = [r.roofline_pct for r in results]
    colors = ["0.7" if is_peer(r.backend) else "tab:blue" for r in results]
    fig, ax = plt.subplots(figsize=(12, 0.28 * len(results) + 1.5))
    ax.barh(range(len(results)), values, color=colors)
    ax.set_yticks(range(len(results)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(100.0, color="k", linewidth=0.8)
    ax.set_xlabel("% of roofline (floor time / measured time)")
    ax.set_title(f"moe-bench, {meta.get('device')}, commit {meta.get('commit')}\n"
                 f"blue: moe_kernels, grey: the torch path", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
