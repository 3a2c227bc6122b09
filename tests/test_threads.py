"""Ops called from several Python threads (docs/api.md, Threads): the C++ entry points run
without the GIL, as torch's own ops do, so a CPU kernel does not stop the process's other
Python threads for its whole run; and concurrent calls give the bits of serial ones (no
state shared between calls: memoised backend choices, launch configurations, scratch)."""

from __future__ import annotations

import concurrent.futures
import gc
import sys
import threading
import time

import pytest
import torch

import moe_kernels
from moe_kernels import _library, testing

from direct_calls_worker import samples
from helpers import HAS_CUDA, device_backend_params, outcome
from test_cuda_graphs import assert_same_bits
from test_layer import LAYER_PARAMS, make_fp8_layer, make_hidden

RUN_S = 0.5   # how long a call is repeated in a thread, at most: CI's 2 cores are shared


def main_thread_steps_during(call) -> int:
    """How many steps a loop of the main thread made while another thread repeated
    `call` (until the main thread has stepped, or for RUN_S). The switch interval is set
    past any run, so a thread that holds the GIL keeps it until it blocks or releases it:
    `call` holding it throughout leaves exactly 0 steps inside the repeats' window,
    whatever the machine's speed; a `call` that releases it lets the main thread, which
    asks for the GIL at every step (time.sleep(0)), step in between. A call of a few
    microseconds gives the main thread few chances, so the calls go on until it has
    taken one: a busy machine can leave it unscheduled for milliseconds. The results are
    kept until the window closes, and the garbage collector is off: freeing a tensor
    releases the GIL (torch's dealloc), which would let the main thread step beside an
    entry point that keeps it (a collection in the loop can free the tensors an earlier
    failed test's traceback holds)."""
    window, stamps, results, finished = [], [], [], threading.Event()

    def worker():
        start = time.perf_counter()
        while not (stamps and stamps[-1] > start) and time.perf_counter() - start < RUN_S:
            results.append(call())
        window.extend((start, time.perf_counter()))
        finished.set()

    saved = sys.getswitchinterval()
    gc.collect()
    gc.disable()
    sys.setswitchinterval(1000.0)
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        while not finished.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0)
        thread.join()
    finally:
        sys.setswitchinterval(saved)
        gc.enable()
    start, end = window
    return sum(start < s < end for s in stamps)


def test_the_measure_tells_a_held_gil_from_a_released_one():
    """The measure itself: a C call that keeps the GIL (sum over a range) gives 0 steps;
    one that releases it (time.sleep) gives some."""
    held = main_thread_steps_during(lambda: sum(range(20_000)))
    released = main_thread_steps_during(lambda: time.sleep(1e-5))
    assert held == 0, f"{held} steps of the main thread while the GIL was held"
    assert released > 0, "no step of the main thread while the GIL was released"


ENTRY_PARAMS = [pytest.param("cpu", name, id=f"cpu-{name}") for name, op in
                sorted(_library.OPS.items()) if "cpu" in op.entries]
ENTRY_PARAMS += [pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.skipif(
                     not HAS_CUDA or not _library.extension_has_cuda(),
                     reason="needs a GPU and the extension's CUDA kernels"))
                 for name in ("grouped_topk", "permute_index", "moe_align_block_size")]


@pytest.mark.parametrize("device,name", ENTRY_PARAMS)
def test_entry_points_release_the_gil(device, name):
    """Every C++ entry point `_C.<op>_<backend>` (the eager path's kernel call), on valid
    arguments of its own (tests/direct_calls_worker.py): the main thread runs while it
    does. A C++ kernel takes 0.02-3 ms a call on DeepSeek-V3's CPU shapes (2 cores): the
    GIL held for all of it would stop every other thread."""
    entry = _library.OPS[name].entries[device]
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a
                 for a in samples()[name][0])
    entry(*args)      # valid arguments: a call that raises would release nothing
    steps = main_thread_steps_during(lambda: entry(*args))
    assert steps > 0, f"_C.{name}_{device} kept the GIL through {RUN_S} s of calls"


def test_every_entry_point_is_measured():
    """The list above covers every C++ entry point the extension registers on the CPU."""
    measured = {p.values[1] for p in ENTRY_PARAMS if p.values[0] == "cpu"}
    assert measured == {n for n, op in _library.OPS.items() if "cpu" in op.entries}
    assert measured <= set(samples()), "an entry point without valid arguments to call it"


# Triton's interpreter keeps the launch grid in module state, so its launches from several
# threads mix grids (InterpreterError 'z >= grid_dim[2]'): not run here; on the GPU the
# compiled launches are.
CONCURRENT_PARAMS = (device_backend_params(("cpu", "reference"), devices=("cpu",))
                     + device_backend_params(("cuda", "triton", "reference"), devices=("cuda",)))


@pytest.mark.parametrize("device,backend", CONCURRENT_PARAMS)
def test_concurrent_calls_give_the_serial_bits(device, backend):
    """Every op's edge cases, three times each, from four threads at once (the first calls
    of a fresh process race too: backend choice and launch configurations are memoised on
    first use), against the same calls made one after another. The errors match too."""
    calls = []
    for op in testing.ops():
        if backend not in _library.OPS[op].backends:
            continue
        public = getattr(moe_kernels, op)
        for case in testing.cases(op, "edge", device=device):
            args, kwargs = testing.run(op, lambda *a, **k: (a, k), case)
            calls.append((f"{op} {case.name}", public, args, kwargs))
    assert calls, f"no op runs on {backend}"

    def run(call):
        _, public, args, kwargs = call
        return outcome(lambda: public(*args, backend=backend, **kwargs))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, calls * 3))
    if device == "cuda":
        torch.cuda.synchronize()
    alone = [run(call) for call in calls]
    for i, (got, got_error) in enumerate(together):
        what = calls[i % len(calls)][0]
        want, want_error = alone[i % len(calls)]
        assert got_error == want_error, f"{what}: {got_error} from a thread, {want_error} alone"
        if want_error is None:
            assert_same_bits(got, want, f"{what} from a thread")


@pytest.mark.parametrize("device,backend", LAYER_PARAMS)
def test_layer_from_several_threads(device, backend):
    """One layer, its forward called from four threads at once on inputs of different
    sizes (decode and prefill shapes), gives each input the bits of a call alone."""
    layer, cfg = make_fp8_layer(device, backend)
    inputs = [make_hidden(T, cfg, seed=T, device=device) for T in (1, 3, 9, 33) * 3]
    with torch.no_grad():
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            together = list(pool.map(layer, inputs))
        alone = [layer(hidden) for hidden in inputs]
    for hidden, got, want in zip(inputs, together, alone):
        assert_same_bits(got, want, f"layer forward of {hidden.shape[0]} tokens from a thread")
