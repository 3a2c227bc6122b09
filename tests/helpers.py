"""Helpers shared by the op tests: devices and backends (with skip reasons), output
poisoning, and the tolerance rules (from moe_kernels.testing.rules)."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch

from moe_kernels import _library
from moe_kernels.testing import rules

HAS_CUDA = torch.cuda.is_available()


def expect_inductor_bf16_round_trip(request, device: str, backend: str) -> None:
    """Marks a test that compares a compiled reference with eager as failing where torch's
    CPU Inductor drops a float32 -> bf16 -> float32 round trip after a matmul, with or
    without `emulate_precision_casts` (measured with torch 2.11.0: every element of a
    (6, 512) x (512, 256) product left unrounded; 2.13.0 keeps it). Our kernels are opaque
    to Inductor and unaffected; strict, so a torch that fixes it is noticed."""
    if backend == "reference" and device == "cpu" and torch.__version__ < "2.13":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            f"torch {torch.__version__}: CPU Inductor drops the reference's bf16 rounding")))
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _available_host_gib() -> float:
    """MemAvailable of /proc/meminfo in GiB (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0.0
    return kib / (1 << 20)


def big_memory_devices(gib: float) -> list:
    """("cpu", "cuda") params of a test whose tensors take about `gib` GiB: on the CPU it
    runs the C++ kernels (skipped without the extension or that much available host
    memory), on CUDA the default backend (skipped without a GPU that holds them)."""
    cpu_reason = (None if _library.extension_loaded() else "moe_kernels._C is not built")
    if cpu_reason is None and _available_host_gib() < gib * 1.25:
        cpu_reason = f"needs {gib * 1.25:.0f} GiB of available host memory"
    cuda_reason = "no CUDA device" if not HAS_CUDA else (
        None if torch.cuda.get_device_properties(0).total_memory >= gib * 1.25 * (1 << 30)
        else f"needs a GPU with {gib * 1.25:.0f} GiB")
    return [pytest.param(d, id=d, marks=[pytest.mark.skip(reason=r)] if r else [])
            for d, r in (("cpu", cpu_reason), ("cuda", cuda_reason))]


def backend_params(device: str, backends=_library.BACKENDS):
    """pytest params of the backends on `device`; those that cannot run here are skipped
    with the reason (never silently dropped, never a vacuous pass)."""
    params = []
    for b in backends:
        reason = _library.backend_unavailable_reason(b, torch.device(device))
        marks = [pytest.mark.skip(reason=f"{b} on {device}: {reason}")] if reason else []
        params.append(pytest.param(b, marks=marks, id=f"{device}-{b}"))
    return params


# The C++ backends are bound to one device type each; other pairs are not even listed.
_DEVICE_ONLY = {"cpu": "cpu", "cuda": "cuda"}


def device_backend_params(backends=_library.BACKENDS, devices=("cpu", "cuda")):
    """(device, backend) params over every device, skipping what cannot run here."""
    params = []
    for d in devices:
        if d == "cuda" and not HAS_CUDA:
            params.append(pytest.param(d, "any", id="cuda-any",
                                       marks=pytest.mark.skip(reason="no CUDA device")))
            continue
        usable = [b for b in backends if _DEVICE_ONLY.get(b, d) == d]
        params += [pytest.param(d, p.values[0], marks=p.marks, id=p.id)
                   for p in backend_params(d, usable)]
    return params


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bytes (on the CPU, flattened, NaN payloads included) for bit-for-bit compares,
    from a copy with standard strides: contiguous() keeps the strides of size-0 and size-1
    dimensions, which view() refuses."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t.detach()).reshape(-1).view(torch.uint8)


def poison_allocator(device: str) -> None:
    """Fill the CUDA caching allocator's free blocks with NaN so that an output element a
    kernel forgets to write reads as NaN (or a huge int) instead of a plausible value.
    On the CPU, fresh allocations hold whatever malloc returns; every test compares every
    element with the reference, which catches unwritten outputs there too."""
    if device != "cuda":
        return
    free, _ = torch.cuda.mem_get_info()
    n = min(free // 4, 256 << 20) // 4
    junk = torch.full((n,), float("nan"), device=device)
    del junk


# opcheck's utils that run on CPU fp8 inputs: test_schema re-runs the op under a mode that
# needs arithmetic on every input dtype, which the CPU lacks for float8_e4m3fn.
FP8_INPUT_OPCHECKS = ("test_faketensor", "test_autograd_registration",
                      "test_aot_dispatch_dynamic")


# The float comparison rule is written once, in moe_kernels.testing.rules (the checker other
# codebases run holds them to what our backends are held to): (rtol, atol) per dtype.
TOLERANCES = rules.TOLERANCES
calc_diff = rules.calc_diff
fp8_ordinal = rules.fp8_ordinal


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype=None, msg=""):
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.cpu().to(expected.dtype), expected.cpu(), rtol=rtol,
                               atol=atol, equal_nan=False, msg=lambda m: f"{msg}\n{m}")


def assert_int_equal(actual: torch.Tensor, expected: torch.Tensor, msg=""):
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    bad = (actual.cpu() != expected.cpu())
    assert not bad.any(), (f"{msg}: {int(bad.sum())} of {bad.numel()} differ, first at "
                           f"{bad.nonzero()[0].tolist()}")


def assert_fp8_close(actual: torch.Tensor, expected: torch.Tensor, *, max_steps: int = 0,
                     msg: str = ""):
    """FP8 tensors equal up to max_steps representable values (0: bit-exact up to the sign
    of zero); NaN (0x7F / 0xFF) only where expected has NaN."""
    assert actual.dtype == expected.dtype == torch.float8_e4m3fn, f"{msg}: dtypes"
    verdict = rules.fp8_steps("q", actual, expected, max_steps)
    assert verdict.passed, f"{msg}: {verdict}"


TMA = "triton-tma"


def with_tma(params: list) -> list:
    """params plus, for each (device, "triton") one, (device, "triton-tma"): the triton
    backend with every FP8 grouped-GEMM tile config loading its operands through TMA
    descriptors (configs/grouped_gemm.py `tma_table`), a path of its own in the kernels."""
    return params + [pytest.param(p.values[0], TMA, marks=p.marks, id=f"{p.id}-tma")
                     for p in params if p.values[1] == "triton"]


WS = "triton-ws"
HAS_SM90 = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9


def with_ws(params: list) -> list:
    """params plus (cuda, "triton-ws"): the triton backend with every contiguous and
    segments grouped-GEMM bucket on the warp-specialised Gluon kernels
    (configs/grouped_gemm.py `with_ws`). Gluon has no interpreter, so they run on an sm_90
    GPU only; elsewhere the param is listed, skipped with the reason."""
    reason = None if HAS_SM90 else ("no CUDA device" if not HAS_CUDA else "not an sm_90 GPU")
    marks = [pytest.mark.skip(reason=f"{reason}: the ws kernels are Gluon for sm_90, "
                              "which has no interpreter")] if reason else []
    return params + [pytest.param("cuda", WS, marks=marks, id="cuda-triton-ws")]


def outcome(call):
    """(call(), None), or (None, the type of the ValueError / TypeError / RuntimeError it
    raised): for comparing two calls that may both refuse their inputs."""
    try:
        return call(), None
    except (ValueError, TypeError, RuntimeError) as exc:
        return None, type(exc)


def require_ws_probe() -> None:
    """Fails the test at once, with the finding, where the ws kernels did not run in the
    ws probe (moe_kernels/bench/ws_probe.py): a kernel that hangs would cost each ws test
    its process's time limit."""
    from moe_kernels.bench import ws_probe
    why = ws_probe.failure()
    if why:
        pytest.fail(why, pytrace=False)


def call_backend(fn, *args, backend: str, **kwargs):
    """fn(*args, backend=backend, **kwargs); "triton-tma" runs backend="triton" under the
    TMA variant of the tile table in force on the first tensor argument's device,
    "triton-ws" under its warp-specialised variant (where the ws probe passed)."""
    if backend not in (TMA, WS):
        return fn(*args, backend=backend, **kwargs)
    if backend == WS:
        require_ws_probe()
    from moe_kernels.configs import grouped_gemm as configs
    device = next(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
    table = (configs.tma_table(device) if backend == TMA
             else configs.with_ws(configs.table_in_force(device)))
    return configs.with_table(table, lambda: fn(*args, backend="triton", **kwargs))


def non_strided(t: torch.Tensor):
    """(label, t in a layout no kernel reads): sparse COO (for fp8, which torch cannot
    convert, an empty one of t's shape), CSR for a matrix, mkldnn for the float types on
    the CPU. Each has no strides (CSR raises on reading them) and no data pointer."""
    try:
        coo = t.to_sparse()
    except (RuntimeError, NotImplementedError):
        coo = torch.sparse_coo_tensor(torch.zeros(t.dim(), 0, dtype=torch.long),
                                      torch.empty(0, dtype=t.dtype), t.shape,
                                      device=t.device, check_invariants=False)
    yield "sparse_coo", coo
    if t.dim() == 2:
        with warnings.catch_warnings():   # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            csr = t.to_sparse_csr()
        yield "sparse_csr", csr
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16, torch.float16):
        yield "mkldnn", t.to_mkldnn()


class GemmLifetimes:
    """Spies on the grouped GEMMs of the internal layer (monkeypatch), which the expert
    MLPs call: at each GEMM call, which of the earlier calls' tensors ("a", "a_scales",
    "out") are still alive. Weak references only, so the spy keeps nothing alive."""

    def __init__(self, monkeypatch):
        from moe_kernels.ops import grouped_gemm
        self.calls: list = []       # per call: {name: weakref}
        self.alive_at: list = []    # per call: {(j, name): alive when this call started}
        for fn in ("grouped_gemm_fp8_unchecked", "grouped_gemm_fp8_segments_unchecked",
                   "grouped_gemm_fp8_masked_out_unchecked"):
            monkeypatch.setattr(grouped_gemm, fn, self._spy(getattr(grouped_gemm, fn)))

    def _spy(self, gemm):
        def call(*args):
            a, a_scales = [x for x in args if isinstance(x, torch.Tensor)][:2]
            self.alive_at.append({(j, name): ref() is not None
                                  for j, refs in enumerate(self.calls)
                                  for name, ref in refs.items()})
            out = gemm(*args)
            written = out if out is not None else args[-2]   # the _out form: (..., out, zf)
            self.calls.append({"a": weakref.ref(a), "a_scales": weakref.ref(a_scales),
                               "out": weakref.ref(written)})
            return out
        return call

    def alive_when(self, i: int) -> list:
        """The (j, name) of earlier calls' tensors alive when call i started."""
        return sorted(key for key, alive in self.alive_at[i].items() if alive)
