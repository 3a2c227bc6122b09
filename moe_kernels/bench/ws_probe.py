"""Whether the warp-specialised grouped GEMMs (`_ws_contiguous_kernel`,
`_ws_segments_kernel`, docs/fp8.md) run on this GPU: each launched once on small operands,
in a child process bounded in time, before the bench rows and tests that use them.

Of every kernel, theirs is the first run likeliest to hang: a barrier whose phase or count
slips never completes, and nothing in the process can interrupt it. Probed apart, a hang
costs TIMEOUT_S once, and their rows and tests fail at once with the probe's finding,
instead of each hanging until its own limit and taking the GEMM module's other rows with
it (docs/benchmarks.md, "A run that a kernel breaks").

`python -m moe_kernels.bench.ws_probe` runs the probe itself (exit 0: both ran and agree
with the reference).
"""

from __future__ import annotations

import fcntl
import functools
import os
import subprocess
import sys

# two Gluon compiles and the launches, with the child's torch import and CUDA start
TIMEOUT_S = 120
# Where set, the file shares the verdict between the processes of one GPU run (the bench's
# children, each xdist worker): the first one probes, the others read.
VERDICT_ENV = "MOE_KERNELS_WS_PROBE_FILE"
OK = "ok"


def _command() -> list[str]:
    return [sys.executable, "-m", "moe_kernels.bench.ws_probe"]


def _probe_in_child() -> str:
    """OK, or why the ws kernels cannot be used here."""
    try:
        r = subprocess.run(_command(), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return (f"the ws probe (moe_kernels/bench/ws_probe.py) did not finish in "
                f"{TIMEOUT_S} s: a ws kernel that hangs?")
    if r.returncode != 0:
        tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])
        return f"the ws probe failed (exit status {r.returncode}): {tail}"
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
    -1 rows (K = 384: three K blocks), each against the float32 reference; the contiguous
    kernel's -1 rows must be zeros. On the CPU (a test of the probe itself) the same calls
    run the interpreter's fallback tiles."""
    import torch

    from moe_kernels.configs import grouped_gemm as configs
    from moe_kernels.reference import fp8 as ref_fp8
    from moe_kernels.reference import grouped_gemm as ref_gemm
    from moe_kernels.triton import grouped_gemm as kernels

    g = torch.Generator().manual_seed(0)
    counts, N, K = [70, 0, 150], 256, 384
    m = torch.tensor([e for e, c in enumerate(counts) for _ in range(c)] + [-1] * 5,
                     dtype=torch.int32)
    a, a_s = ref_fp8.quantize_fp8_per_token_group(torch.randn(m.numel(), K, generator=g))
    b, b_s = ref_fp8.quantize_fp8_block(torch.randn(len(counts), N, K, generator=g) / 16)
    want = ref_gemm.grouped_gemm_fp8(a, a_s, b, b_s, m).float()
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
        got = configs.with_table(ws, call).float().cpu()
        err = ((got[rows] - want[rows]).norm() / want[rows].norm()).item()
        if not err < 1e-2:
            raise SystemExit(f"ws probe: the {kind} kernel is off: relative error {err:.3g}")
        if kind == "contiguous" and got[~rows].any():
            raise SystemExit("ws probe: the contiguous kernel wrote -1 rows that are not zero")
        print(f"ws probe: {kind} kernel ran, relative error {err:.2g}", flush=True)


if __name__ == "__main__":
    probe()
