"""Whether the warp-specialised grouped GEMMs (`_ws_contiguous_kernel`,
`_ws_segments_kernel`, docs/fp8.md) run on this GPU: each launched once on small operands,
in a child process bounded in time, before the bench rows and tests that use them.

Of every kernel, theirs is the first run likeliest to hang: a barrier whose phase or count
slips never completes, and nothing in the process can interrupt it. Probed apart, a hang
costs RUN_S seconds after the launch once, and their rows and tests fail at once with the
probe's finding, instead of each hanging until its own limit and taking the GEMM module's
other rows with it (docs/benchmarks.md, "A run that a kernel breaks").

`python -m moe_kernels.bench.ws_probe` runs the probe itself (exit 0: both ran and agree
with the reference); with `--verdict`, in a child process as `failure()` does, printing
the verdict (exit 0: ok), which benchmarks/gpu_check.sh does once before the rows and
tests that read it.
"""

from __future__ import annotations

import fcntl
import functools
import os
import select
import subprocess
import sys
import time

# The child's deadlines, renewed by each line it prints: up to a launch (its torch import
# and CUDA start, or the next kernel's compile), and from a launch to its end (the kernels
# take microseconds: only a hang takes seconds).
COMPILE_S = 90
RUN_S = 15
LAUNCHED = "ws probe: launched"
# Where set, the file shares the verdict between the processes of one GPU run (the bench's
# children, each xdist worker): the first one probes, the others read.
VERDICT_ENV = "MOE_KERNELS_WS_PROBE_FILE"
OK = "ok"


def _command() -> list[str]:
    return [sys.executable, "-m", "moe_kernels.bench.ws_probe"]


def _probe_in_child() -> str:
    """OK, or why the ws kernels cannot be used here."""
    proc = subprocess.Popen(_command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, pending, start = [], b"", time.monotonic()
    deadline = start + COMPILE_S
    with proc:
        fd = proc.stdout.fileno()
        # os.read, not readline: a buffered reader can hold a line that select never sees
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                last = lines[-1] if lines else "no output"
                hang = " (a ws kernel that hangs)" if last.startswith(LAUNCHED) else ""
                return (f"the ws probe (moe_kernels/bench/ws_probe.py) was stopped after "
                        f"{time.monotonic() - start:.0f} s{hang}; its last line: {last}")
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            *done, pending = (pending + chunk).split(b"\n")
            for line in (x.decode(errors="replace").rstrip() for x in done):
                lines.append(line)
                deadline = time.monotonic() + (RUN_S if line.startswith(LAUNCHED)
                                               else COMPILE_S)
        status = proc.wait()
    if pending.strip():
        lines.append(pending.decode(errors="replace").rstrip())
    if status != 0:
        return f"the ws probe failed (exit status {status}): {' | '.join(lines[-3:])}"
    return OK


@functools.lru_cache(maxsize=None)
def failure() -> str | None:
    """None where the ws kernels ran and agreed in the probe; else why not (a CUDA sm_90
    device: the callers' condition). Probed once per process, or once per file where
    MOE_KERNELS_WS_PROBE_FILE is set."""
    path = os.environ.get(VERDICT_ENV)
    if not path:
        verdict = _probe_in_child()
    else:
        with open(f"{path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)     # one prober; the rest wait, then read
            if os.path.exists(path):
                with open(path) as f:
                    verdict = f.read()
            else:
                verdict = _probe_in_child()
                with open(path, "w") as f:
                    f.write(verdict)
    return None if verdict == OK else verdict


def probe(device: str = "cuda") -> None:
    """Both ws kernels on tiles of one expert, of two, a partial one, an empty expert and
    -1 rows (K = 384: three K blocks), each against the reference by the GEMM rule of the
    tests and moe-check (`testing.rules.gemm`: calc_diff per row); the contiguous kernel's
    -1 rows must be zeros. On the CPU (a test of the probe itself) the same calls
    run the interpreter's fallback tiles."""
    import torch

    from moe_kernels.configs import grouped_gemm as configs
    from moe_kernels.reference import fp8 as ref_fp8
    from moe_kernels.reference import grouped_gemm as ref_gemm
    from moe_kernels.testing import rules
    from moe_kernels.triton import grouped_gemm as kernels

    g = torch.Generator().manual_seed(0)
    counts, N, K = [70, 0, 150], 256, 384
    m = torch.tensor([e for e, c in enumerate(counts) for _ in range(c)] + [-1] * 5,
                     dtype=torch.int32)
    a, a_s = ref_fp8.quantize_fp8_per_token_group(torch.randn(m.numel(), K, generator=g))
    b, b_s = ref_fp8.quantize_fp8_block(torch.randn(len(counts), N, K, generator=g) / 16)
    want = ref_gemm.grouped_gemm_fp8(a, a_s, b, b_s, m)
    a, a_s, b, b_s, m_dev = (t.to(device) for t in (a, a_s, b, b_s, m))
    if device == "cuda" and not kernels._ws_ready(a, b):
        raise SystemExit("ws probe: these operands do not take the ws kernels here")
    c = torch.tensor(counts, dtype=torch.int32, device=device)
    offsets = torch.cat([c.new_zeros(1), c.cumsum(0)]).long()
    ws = configs.with_ws(configs.table_in_force(a.device))
    calls = {"contiguous": lambda: kernels.grouped_gemm_fp8(a, a_s, b, b_s, m_dev,
                                                            torch.bfloat16),
             "segments": lambda: kernels.grouped_gemm_fp8_segments(a, a_s, b, b_s, offsets,
                                                                   c, torch.bfloat16)}
    rows = m >= 0
    for kind, call in calls.items():
        out = configs.with_table(ws, call)       # compiles, then launches without waiting
        print(f"{LAUNCHED} the {kind} kernel", flush=True)
        got = out.cpu()
        verdict = rules.gemm("rows", got[rows], want[rows])
        if not verdict.passed:
            raise SystemExit(f"ws probe: the {kind} kernel is off: {verdict}")
        if kind == "contiguous" and got[~rows].any():
            raise SystemExit("ws probe: the contiguous kernel wrote -1 rows that are not zero")
        print(f"ws probe: the {kind} kernel ran: {verdict}", flush=True)


def main(argv: list[str]) -> int:
    if argv == ["--verdict"]:
        why = failure()
        print(f"ws probe: {why or 'ok'}", flush=True)
        return 1 if why else 0
    if argv:
        raise SystemExit("usage: python -m moe_kernels.bench.ws_probe [--verdict]")
    probe()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
