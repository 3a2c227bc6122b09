"""`moe-bench --warm`: one untimed call of each of our rows, two processes per op module
at once, before the timed run of a fresh GPU machine.

Why: a run compiles each Triton kernel at its first call, one after another in its one
process (the sm_90a compile gate's 148 launches took 80 s in one process under triton 3.6
on a 2-core VM). Triton keeps what it compiles in its cache on disk (`~/.triton/cache`,
shared by processes, written atomically), so the first calls made here by `--warm-shards`
processes per op module (default 2, each a share of the module's rows, by a hash of the
row's key) compile on as many cores, and the timed run that follows loads each kernel from
the cache instead. A call goes through the row's own function, so it compiles exactly the
kernel, constexprs and argument specialisation that the timed row launches.

Only our rows are called (a torch peer compiles no Triton kernel), nothing is checked or
timed (a call that raises is the timed run's to report), and the expert-parallel module is
left out: its ranks are processes of their own. Each module builds its inputs as its timed
run does, so the processes' device memory adds up while they run together (DeepSeek-V3's
fused MoE and layer weights, ~11 GB a process: ~44 GB with two shards).
"""

from __future__ import annotations

import subprocess
import sys
import time
import traceback

from moe_kernels.bench import MODULES, OPS, common, runs


def warmed_modules(ops) -> list:
    """The modules a warm pass runs for the public names `ops` (None: all)."""
    selected = set(ops or OPS)
    return [m for m in MODULES
            if selected & set(m.MEASURES) and not hasattr(m, "OWN_TIMEOUT_S")]


def main(args, argv: list[str]) -> int:
    """argv: moe-bench's arguments (with --warm). 0 when every module's process ended
    well, else 1."""
    if args.warm_module:
        return _warm_one(args)
    t0 = time.perf_counter()
    names = [runs.module_name(m) for m in warmed_modules(args.op)]
    command = [sys.executable, "-m", "moe_kernels.bench", *argv]
    shards = args.warm_shards
    procs = {f"{name} {i}/{shards}": subprocess.Popen(
                 [*command, "--warm-module", f"{name}:{i}/{shards}"])
             for name in names for i in range(shards)}
    failed = [name for name, proc in procs.items() if proc.wait() != 0]
    print(f"moe-bench --warm: {len(names)} module(s) in {len(procs)} processes, "
          f"{time.perf_counter() - t0:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def _warm_one(args) -> int:
    """The process of one module's shard (--warm-module NAME:I/K): the rows in_shard."""
    name, shard = args.warm_module.split(":")
    index, count = map(int, shard.split("/"))
    module = {runs.module_name(m): m for m in warmed_modules(None)}[name]
    t0, rc = time.perf_counter(), 0
    with common.measuring(set(args.op or OPS)), common.warming(index, count) as calls:
        try:
            module.run(args.device, args.backend, args.tokens, compile_reference=False)
            common.eager_call_rows(module.MEASURES, args.device, args.backend)
        except Exception:          # the module's own setup failed: the timed run will too
            traceback.print_exc()
            rc = 1
    print(f"moe-bench --warm {name} {index}/{count}: {len(calls)} first calls in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return rc
