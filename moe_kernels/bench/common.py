"""Timing, device ceilings and the result table shared by every op's benchmark.

GPU timing: each call in a CUDA graph of `reps` calls over rotating input sets (so L2
does not hold the inputs between calls), median over several replays, per call; a call
slower than ~3 ms (a torch path at DeepSeek-V3's size) gets fewer calls and replays,
about a second of device time a row (graph_shape). CPU
timing: median wall time of single calls. Roofline: the larger of bytes moved / measured
copy bandwidth of this device (a device-to-device copy, counting bytes read plus
written) and flops / the FP8 tensor-core peak (GPU cases with flops only).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
import zlib
import contextlib
import contextvars
from typing import Callable

import torch

from moe_kernels import _library
from moe_kernels._common import FP8, SCALE_BLOCK, cdiv
from moe_kernels.reference import fp8 as ref_fp8


@dataclasses.dataclass
class Result:
    op: str
    case: str
    backend: str          # kernel backend, or "torch-eager" / "torch-compile" (the reference)
    device: str
    time_us: float
    bytes: int
    flops: int = 0
    copy_gbps: float = 0.0
    correct: bool | None = None
    note: str = ""
    peak_tflops: float = 0.0  # 0: judged on bytes only
    spread: float = 0.0       # (p90 - p10) / median of the timed repetitions

    @property
    def gbps(self) -> float:
        return self.bytes / self.time_us / 1e3 if self.time_us > 0 else 0.0

    @property
    def tflops(self) -> float:
        return self.flops / self.time_us / 1e6 if self.time_us > 0 else 0.0

    @property
    def floor_us(self) -> float:
        """Roofline time: memory (bytes / copy bandwidth) or compute, the larger."""
        mem = self.bytes / self.copy_gbps / 1e3 if self.copy_gbps else 0.0
        comp = self.flops / self.peak_tflops / 1e6 if self.peak_tflops else 0.0
        return max(mem, comp)

    @property
    def roofline_pct(self) -> float:
        return 100.0 * self.floor_us / self.time_us if self.time_us > 0 else 0.0


def kernel_backends(device: str, backends, supported) -> list[str]:
    """The backends to time: those asked for, else every one that runs here (not the
    interpreter)."""
    dev = torch.device(device)
    if backends is None:
        backends = [b for b in ("cuda", "triton", "cpu")
                    if _library.backend_unavailable_reason(b, dev) is None
                    and not (b == "triton" and device == "cpu")]
    return [b for b in backends if b in supported]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# A row whose repetitions spread wider than this (p90 - p10 over the median) is flagged: on
# a loaded machine, OpenMP spin-waits slowed both our C++ and torch's CPU paths ~20x.
NOISY_SPREAD = 0.25


def _summary(times: list[float], scale: float) -> tuple[float, float]:
    """(median * scale, (p90 - p10) / median) of the repetitions' times."""
    median = statistics.median(times)
    if len(times) < 5 or median <= 0:
        return median * scale, 0.0
    deciles = statistics.quantiles(times, n=10)
    return median * scale, (deciles[-1] - deciles[0]) / median


def _time_cpu(fn: Callable[[int], object], n_sets: int,
              min_time_s: float = 0.3) -> tuple[float, float]:
    return _time_cpu_interleaved([fn], n_sets, min_time_s)[0]


# Rounds of the CPU timing: each function runs a slice of its repetitions per round, in
# turn, so that a machine whose speed drifts over seconds (a shared host: the same matmul
# measured 0.9 ms and 2.2 ms a minute apart) slows every side of a comparison alike.
CPU_ROUNDS = 6


def _time_cpu_interleaved(fns: list[Callable[[int], object]], n_sets: int,
                          min_time_s: float = 0.3) -> list[tuple[float, float]]:
    """_summary of each fn's repetitions, ~min_time_s of them each, taken in CPU_ROUNDS
    interleaved rounds."""
    reps = []
    for fn in fns:
        fn(0)
        t0 = time.perf_counter()
        fn(1 % n_sets)
        one = max(time.perf_counter() - t0, 1e-7)
        reps.append(max(1, int(min(max(5, min_time_s / one), 2000)) // CPU_ROUNDS))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(CPU_ROUNDS):
        for fn, n, out in zip(fns, reps, times):
            for _ in range(n):
                t0 = time.perf_counter()
                fn(len(out) % n_sets)
                out.append(time.perf_counter() - t0)
    return [_summary(t, 1e6) for t in times]


# A row's CUDA-graph timing: `GRAPH_CALLS` calls a graph and `GRAPH_REPS` replays (with
# the warm-up calls and the first replay, 339 calls: 12 s of device time for a 35 ms torch
# path, an estimate for the fused MoE's at 16 tokens at DeepSeek-V3's size), fewer for a
# slow call so that its replays take about `GRAPH_ROW_MS` of device time.
GRAPH_CALLS, GRAPH_REPS, GRAPH_ROW_MS = 16, 20, 1000.0
MIN_GRAPH_REPS = 5


def graph_shape(call_ms: float, n_sets: int) -> tuple[int, int]:
    """(calls per graph, replays) of a row whose call takes `call_ms`: GRAPH_CALLS x
    GRAPH_REPS while that fits GRAPH_ROW_MS, else fewer calls (each input set at least
    once) and then fewer replays (at least MIN_GRAPH_REPS)."""
    calls = max(n_sets, min(GRAPH_CALLS, int(GRAPH_ROW_MS / GRAPH_REPS / max(call_ms, 1e-6))))
    reps = max(MIN_GRAPH_REPS, min(GRAPH_REPS, int(GRAPH_ROW_MS / (call_ms * calls))
                                   if call_ms > 0 else GRAPH_REPS))
    return calls, reps


def _time_cuda_graph(fn: Callable[[int], object], n_sets: int) -> tuple[float, float]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):  # warm-up (compiles, autotunes) outside the capture
        fn(0)
        start.record()
        for i in range(1, 3):
            fn(i % n_sets)
        end.record()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    calls, reps = graph_shape(start.elapsed_time(end) / 2, n_sets)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % n_sets)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return _summary(times, 1.0)


EVENT_REPS = (20, 200)


def events_reps(call_ms: float) -> int:
    """Timed calls of a row timed by events (one that cannot be captured): EVENT_REPS[1],
    fewer for a slow call (about GRAPH_ROW_MS of device time), at least EVENT_REPS[0]."""
    lo, hi = EVENT_REPS
    return hi if call_ms <= 0 else max(lo, min(hi, int(GRAPH_ROW_MS / call_ms)))


def _time_cuda_events(fn: Callable[[int], object], n_sets: int) -> tuple[float, float]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn(0)
    start.record()
    for i in range(1, 3):
        fn(i % n_sets)
    end.record()
    torch.cuda.synchronize()
    reps = events_reps(start.elapsed_time(end) / 2)
    times = []
    for i in range(reps):
        start.record()
        fn(i % n_sets)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return _summary(times, 1.0)


def time_us(fn: Callable[[int], object], device: str, n_sets: int) -> tuple[float, str]:
    """Median time per call of fn(i) (i selects the input set), and how it was timed."""
    t, how, _ = timed_spread(fn, device, n_sets)
    return t, how


def timed_spread(fn: Callable[[int], object], device: str,
                 n_sets: int) -> tuple[float, str, float]:
    """time_us and the repetitions' spread ((p90 - p10) / median)."""
    if device != "cuda":
        (t, spread), how = _time_cpu(fn, n_sets), "wall"
    else:
        try:
            (t, spread), how = _time_cuda_graph(fn, n_sets), "graph"
        except Exception as exc:  # e.g. an op that cannot be captured: say so in the table
            torch.cuda.synchronize()
            (t, spread), how = _time_cuda_events(fn, n_sets), f"events ({type(exc).__name__})"
    return t, how, spread


# The ops this run measures (moe-bench --op); None: all.
_SELECTED: contextvars.ContextVar[frozenset | None] = contextvars.ContextVar("selected",
                                                                             default=None)


@contextlib.contextmanager
def _restricted(var: contextvars.ContextVar, values):
    token = var.set(frozenset(values))
    try:
        yield
    finally:
        var.reset(token)


def measuring(ops):
    """measure() inside times only the rows of `ops` (public names)."""
    return _restricted(_SELECTED, ops)


def is_selected(op: str) -> bool:
    """Whether this run times the rows of `op` (moe-bench --op)."""
    selected = _SELECTED.get()
    return selected is None or op in selected


# The rows (backend names) this run times; None: all (moe-bench --only-compile: the
# torch.compile rows alone, a second pass after one with --no-compile).
_ONLY_ROWS: contextvars.ContextVar[frozenset | None] = contextvars.ContextVar("rows",
                                                                              default=None)


def only_rows(names):
    """measure() inside times only the entries named in `names`."""
    return _restricted(_ONLY_ROWS, names)


# Called as measure() goes (moe-bench --stall-timeout's watchdog, bench/runs.py).
_PROGRESS: list[Callable[[], None]] = []


@contextlib.contextmanager
def on_progress(fn: Callable[[], None]):
    """Within: fn() after each row's first call and after each row's timing."""
    _PROGRESS.append(fn)
    try:
        yield
    finally:
        _PROGRESS.remove(fn)


def progress() -> None:
    for fn in _PROGRESS:
        fn()


# moe-bench --warm (bench/warm.py): while set, (calls, index, count): measure() and
# eager_call_rows() make one untimed, unchecked call of each of our rows in shard `index`
# of `count` (in_shard), recorded in `calls` as (op, case, backend), and return no rows.
_WARM: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("warm", default=None)


@contextlib.contextmanager
def warming(index: int = 0, count: int = 1):
    """Within: the first calls alone (_WARM) of the rows of shard `index` of `count`;
    yields the list of calls made."""
    calls: list[tuple[str, str, str]] = []
    token = _WARM.set((calls, index, count))
    try:
        yield calls
    finally:
        _WARM.reset(token)


def in_shard(op: str, case: str, name: str, index: int, count: int) -> bool:
    """Whether row (op, case, name) is in shard `index` of `count`: by a hash of its key,
    the same in every process."""
    return zlib.crc32(f"{op}|{case}|{name}".encode()) % count == index


def once(fn: Callable[[], object]) -> Callable[[], object]:
    """fn(), computed at the first call and kept: a check's expected value that is costly
    (DeepSeek-V3's experts through the torch path), which a warm pass never checks."""
    return functools.cache(fn)


def _warm_call(op: str, case: str, name: str, device: str, fn: Callable[[], object],
               warm: tuple) -> None:
    """One call of one of our rows, where in the warm pass's shard; an error is the timed
    run's to report."""
    calls, index, count = warm
    if not in_shard(op, case, name, index, count):
        return
    try:
        fn()
        sync(device)
    except Exception:
        sync_quietly(device)
    calls.append((op, case, name))
    progress()


def measure(op: str, case: str, device: str, timed, nbytes: int, n_sets: int,
            check: Callable[[object], bool], flops: int = 0, math: str = "fp8",
            tokens: int = 0) -> list[Result]:
    """Checks then times each (name, fn(i)) of `timed` (on the CPU all of them in
    interleaved rounds, _time_cpu_interleaved); one Result per entry. With flops,
    the roofline includes the device's tensor-core peak for `math` ("fp8" or "bf16").
    With tokens, the note gives the time per token."""
    if not is_selected(op):
        return []
    only = _ONLY_ROWS.get()
    timed = [t for t in timed if only is None or t[0] in only]
    if not timed:
        return []
    warm = _WARM.get()
    if warm is not None:
        for name, fn in timed:
            if not is_peer(name):
                _warm_call(op, case, name, device, lambda fn=fn: fn(0), warm)
        return []
    copy = copy_bandwidth_gbps(device)
    peak = peak_tflops(device, math) if flops else 0.0
    results = []
    timed, correct = _first_calls(op, case, device, list(timed), check, results)
    # on the CPU the entries are timed in interleaved rounds: their ratios are what counts
    on_cpu = (_time_cpu_interleaved([fn for _, fn in timed], n_sets) if device != "cuda"
              else None)
    for i, (name, fn) in enumerate(timed):
        if on_cpu is not None:
            (t, spread), how = on_cpu[i], "wall"
        else:
            t, how, spread = timed_spread(fn, device, n_sets)
        progress()
        note = f"{how}, {t * 1e3 / tokens:.1f} ns/token" if tokens else how
        results.append(Result(op, case, name, device, t, nbytes, flops=flops, copy_gbps=copy,
                              correct=correct[i], note=note, peak_tflops=peak, spread=spread))
    return results


def is_peer(backend: str) -> bool:
    """Rows of torch code timed beside ours: the reference (eager, compiled) and the
    strongest torch-native baselines (`torch-scaled_mm`, `torch-index_select`, ...)."""
    return backend.startswith("torch-")


def _first_calls(op, case, device, timed, check, results):
    """(the entries that ran, each one's check of its first call). An entry that raises
    becomes an untimed row saying why: a peer this torch or device cannot run (e.g.
    block-scaled `_scaled_mm` before CUDA 12.9) is `unavailable`; one of our own rows
    is a failed row (the run exits 1), and the case's other rows are still timed."""
    ran, correct = [], []
    for name, fn in timed:
        try:
            out = fn(0)
        except Exception as exc:
            progress()
            sync_quietly(device)
            why = f"{type(exc).__name__}: {str(exc)[:120]}"
            results.append(Result(op, case, name, device, 0.0, 0,
                                  correct=None if is_peer(name) else False,
                                  note=("unavailable: " if is_peer(name) else "raised ") + why))
            continue
        ran.append((name, fn))
        correct.append(check(out))
        progress()
    return ran, correct


def sync_quietly(device: str) -> None:
    """Synchronise after a failed call, whose error may surface only here."""
    try:
        sync(device)
    except Exception:
        pass


# Dense tensor-core peaks (TFLOPS) by math and device name (docs/benchmarks.md, goals).
# Unknown devices and CPUs: 0, and the roofline counts bytes only.
PEAK_TFLOPS = {
    "fp8": {"H100": 1979.0, "H200": 1979.0, "H800": 1979.0},
    "bf16": {"H100": 989.0, "H200": 989.0, "H800": 989.0},
}


def peak_tflops(device: str, math: str = "fp8") -> float:
    if device != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS[math].items() if k in name), 0.0)


def host_us_per_call(fn: Callable[[], object], device: str, n: int = 2000,
                     budget_s: float = 0.3) -> float:
    """Host time per call of fn in a tight loop (launch cost; tiny inputs): up to n calls,
    fewer when they would take longer than budget_s."""
    for _ in range(50):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        fn()
    sync(device)
    n = int(max(20, min(n, budget_s / max((time.perf_counter() - t0) / 10, 1e-9))))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    sync(device)
    return (t1 - t0) / n * 1e6


EAGER_CASE = "eager call, tiny input (host us)"


@contextlib.contextmanager
def recording_kernels(calls: list):
    """Within: each kernel an op runs through `Op.kernel` (the eager path of every op:
    the checked C++ entry point or the Triton launcher) appends (name, kernel, args,
    kwargs) to `calls`, name as "<op>_<backend>"; kernels run from inside another
    recorded kernel (a composite's) are not recorded apart."""
    original, depth = _library.Op.kernel, [0]

    def kernel(self, backend, needs_op=False):
        fn = original(self, backend, needs_op)

        def recorded(*args, **kwargs):
            if depth[0] == 0:
                calls.append((f"{self.name}_{backend}", fn, args, kwargs))
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return recorded

    _library.Op.kernel = kernel
    try:
        yield calls
    finally:
        _library.Op.kernel = original


def kernels_alone(call: Callable[[], object]):
    """(replay, n): a function making, with the same arguments, the kernel calls that one
    call() made, and how many; (None, 0) when it made none (the reference backend)."""
    with recording_kernels([]) as calls:
        call()
    if not calls:
        return None, 0

    def replay():
        for _, fn, args, kwargs in calls:
            fn(*args, **kwargs)
    return replay, len(calls)


def _eager_and_alone(call, device: str, note: str, rounds: int = 5):
    """(us, note, None): the host time of call() and, in the note, of its kernel calls
    alone, each the best of `rounds` alternating rounds (a difference of two noisy
    figures: alternating keeps a drift of the host from falling on one side)."""
    replay, n = kernels_alone(call)
    us, alone = [], []
    for _ in range(rounds):
        us.append(host_us_per_call(call, device, budget_s=0.06))
        if replay is not None:
            alone.append(host_us_per_call(replay, device, budget_s=0.06))
    if replay is not None:
        note += (f"; kernel calls alone ({n}) {min(alone):.1f} us: "
                 f"+{min(us) - min(alone):.1f} us")
    return min(us), note, None


def eager_call_rows(op_names, device: str, backends) -> list[Result]:
    """Host time of one eager call of each public op in `op_names` per kernel backend, on
    the op's smallest edge case of moe_kernels.testing (tiny tensors): what a decode step
    without CUDA graphs pays per op (goal: <= 10 us above the kernel), best of 5 rounds.
    Beside it, in the note, the same kernel calls made directly (`kernels_alone`): the
    difference is what the op's Python adds (checks, backend choice, allocations, torch
    calls between kernels). Backends an op does not implement give no row."""
    import moe_kernels
    from moe_kernels import testing
    rows = []
    for op in op_names:
        if op not in testing.ops() or not is_selected(op):
            continue
        case = smallest_case(op, device)
        args, kwargs = testing.run(op, lambda *a, **k: (a, k), case)
        public = getattr(moe_kernels, op)
        for b in kernel_backends(device, backends, _library.BACKENDS):
            call = lambda b=b: public(*args, backend=b, **kwargs)
            warm = _WARM.get()
            if warm is not None:
                _warm_call(op, EAGER_CASE, b, device, call, warm)
                continue
            try:
                call()
                us, note, ok = _eager_and_alone(call, device, f"case '{case.name}'")
                if b == "triton" and device == "cuda":
                    note += f"; through JITFunction.run {_uncached_us(call, device):.1f} us"
            except _library.BackendUnavailableError:
                continue
            except Exception as exc:   # a failed row, not the loss of the op's other rows
                sync_quietly(device)
                us, note, ok = 0.0, f"raised {type(exc).__name__}: {str(exc)[:100]}", False
            rows.append(Result(op, EAGER_CASE, b, device, us, 0, correct=ok, note=note))
            progress()
    return rows


def _uncached_us(call, device: str) -> float:
    """host_us_per_call of call() with triton/launch.py's cache off: Triton's own launcher
    path, the figure the cache is measured against."""
    from moe_kernels.triton import launch
    with launch.cache_enabled(False):
        return host_us_per_call(call, device)


def tensors_in(x) -> list:
    """The tensors in x: a tensor, or tuples / lists (NamedTuples too) of them, nested."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in tensors_in(y)]
    return []


def smallest_case(op: str, device: str):
    """The edge case of `op` with the fewest input elements, none of its tensors empty."""
    from moe_kernels import testing
    sizes = []
    for case in testing.cases(op, "edge", device=device):
        ts = tensors_in(list(case.inputs.values()))
        if ts and all(t.numel() for t in ts):
            sizes.append((sum(t.numel() for t in ts), case))
    return min(sizes, key=lambda s: s[0])[1]


_COPY_GBPS: dict[str, float] = {}


def copy_bandwidth_gbps(device: str) -> float:
    """Measured device copy bandwidth (read + write bytes), the memory roofline used."""
    if device not in _COPY_GBPS:
        n = (1 << 28) if device == "cuda" else (1 << 25)
        src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        sets = 1
        t, _ = time_us(lambda i: dst.copy_(src), device, sets)
        _COPY_GBPS[device] = 2 * n / t / 1e3
        del src, dst
    return _COPY_GBPS[device]


def rotating_sets(bytes_per_set: int, device: str) -> int:
    """Input sets needed so the working set exceeds twice the L2 (GPU) / 64 MB (CPU)."""
    cache = 2 * (torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda"
                 else (32 << 20))
    return int(min(64, max(2, -(-cache // max(bytes_per_set, 1)))))


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    import platform
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def format_table(results: list[Result]) -> str:
    head = ("op", "case", "backend", "time us", "spread", "GB/s", "TFLOPS", "% roofline",
            "vs eager", "vs compile", "ok", "note")
    rows = []
    by_case: dict[tuple[str, str], dict[str, float]] = {}
    for r in results:
        by_case.setdefault((r.op, r.case), {})[r.backend] = r.time_us
    for r in results:
        base = by_case[(r.op, r.case)]
        eager, comp = base.get("torch-eager"), base.get("torch-compile")
        noisy = "!" if r.spread > NOISY_SPREAD else ""
        timed = r.time_us > 0  # an unavailable peer's row is not timed
        rows.append((r.op, r.case, r.backend, f"{r.time_us:.2f}" if timed else "-",
                     f"{r.spread:.0%}{noisy}", f"{r.gbps:.1f}",
                     f"{r.tflops:.1f}" if r.flops else "-", f"{r.roofline_pct:.1f}",
                     f"{eager / r.time_us:.2f}x" if eager and timed else "-",
                     f"{comp / r.time_us:.2f}x" if comp and timed else "-",
                     {None: "-", True: "yes", False: "NO"}[r.correct], r.note))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def behind_compile(rows) -> list[tuple[str, str, str, float]]:
    """(op, case, backend, ours / compile speedup) of every kernel row slower than the
    torch.compile row of its case; rows are Results or their JSON dicts."""
    get = lambda r, k: r[k] if isinstance(r, dict) else getattr(r, k)
    compiled = {(get(r, "op"), get(r, "case")): get(r, "time_us") for r in rows
                if get(r, "backend") == "torch-compile"}
    behind = []
    for r in rows:
        comp = compiled.get((get(r, "op"), get(r, "case")))
        if comp is None or is_peer(get(r, "backend")) or get(r, "time_us") <= comp:
            continue
        behind.append((get(r, "op"), get(r, "case"), get(r, "backend"), comp / get(r, "time_us")))
    return behind


def noise_warning(results: list[Result]) -> str | None:
    """A warning naming the rows whose repetitions spread past NOISY_SPREAD, or None."""
    noisy = [r for r in results if r.spread > NOISY_SPREAD]
    if not noisy:
        return None
    worst = max(noisy, key=lambda r: r.spread)
    return (f"moe-bench: WARNING: {len(noisy)} of {len(results)} rows spread more than "
            f"{NOISY_SPREAD:.0%} between repetitions (worst {worst.spread:.0%}: {worst.op} "
            f"{worst.backend} '{worst.case}'), marked '!': the machine is busy or the figures "
            f"are noisy; do not publish them. Rerun on a quiet machine (on CPU, "
            f"OMP_NUM_THREADS=1 avoids OpenMP spin-waits competing with other processes).")


def meta(*shape, dtype=torch.float32) -> torch.Tensor:
    """An empty tensor on the meta device: compile cases launch kernels on these."""
    return torch.empty(shape, dtype=dtype, device="meta")


def device_generator(gen: torch.Generator, device: str) -> torch.Generator:
    """A generator on `device` seeded from the host generator `gen`: inputs are drawn
    where they are used. A seeded CPU generator drew 0.19 G normals a second here (2-core
    VM), so DeepSeek-V3's routed weights drawn on the host (256 x 6144 x 7168 = 11.3 G
    floats, 45 GB) would cost about a minute before the first GPU row."""
    return torch.Generator(device=device).manual_seed(
        int(torch.randint(1 << 30, (1,), generator=gen)))


def random_fp8_weights(shape: tuple[int, int, int], std: float, device: str,
                       gen: torch.Generator, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (E, N, K) float8_e4m3fn, s (E, ceil(N/128), ceil(K/128)) float32) of normal
    weights of `std`, drawn on `device` (device_generator) and quantized in 128x128 blocks
    by the reference one expert at a time (256 experts' float copy would be 30 GB);
    written into out = (q, s) where given. Not moe_kernels.testing.inputs.fp8_weights: the
    checker's cases draw on the host, so that a seed gives the same values on every device,
    which at the bench's GPU sizes costs the host-side minute above."""
    E, N, K = shape
    if out is None:
        out = (torch.empty(shape, dtype=FP8, device=device),
               torch.empty((E, cdiv(N, SCALE_BLOCK), cdiv(K, SCALE_BLOCK)),
                           dtype=torch.float32, device=device))
    dev_gen = device_generator(gen, device)
    for e in range(E):
        q, s = ref_fp8.quantize_fp8_block(
            torch.randn((N, K), generator=dev_gen, device=device) * std)
        out[0][e].copy_(q)
        out[1][e].copy_(s)
    return out
