"""Command line of moe-bench (also `python -m moe_kernels.bench`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys

import torch

from moe_kernels import _library
from moe_kernels.bench import OPS
from moe_kernels.bench.common import copy_bandwidth_gbps, device_name, format_table


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="moe-bench", description=__doc__)
    p.add_argument("--op", action="append", choices=sorted(OPS),
                   help="op to run (repeatable; default: all)")
    p.add_argument("--backend", action="append", choices=[b for b in _library.BACKENDS
                                                          if b != "reference"],
                   help="kernel backend to time (repeatable; default: all that run here)")
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")],
                   help="comma-separated token counts (default: per op and device)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile reference (saves its compile time)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Inductor's compile workers are processes that outlive the compile and compete with
    # the timed CPU kernels for cores (2.5x slower CPU figures seen with them).
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import triton
    meta = {"device": device_name(args.device), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "commit": _git_commit(), "extension": _library.extension_loaded(),
            "extension_cuda": _library.extension_has_cuda(),
            "copy_gbps": round(copy_bandwidth_gbps(args.device), 1)}
    print("moe-bench: " + ", ".join(f"{k}={v}" for k, v in meta.items()), flush=True)
    results = []
    for name in args.op or sorted(OPS):
        results += OPS[name].run(args.device, args.backend, args.tokens,
                                 compile_reference=not args.no_compile)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": [dict(dataclasses.asdict(r), gbps=r.gbps,
                                                      roofline_pct=r.roofline_pct, tflops=r.tflops)
                                                 for r in results]}, f, indent=1)
    failed = [r for r in results if r.correct is False]
    if failed:
        print(f"moe-bench: {len(failed)} results disagree with the reference", file=sys.stderr)
        return 1
    return 0
