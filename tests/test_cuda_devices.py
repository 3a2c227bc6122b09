"""Where an op runs: on its tensors' CUDA device, whichever is current, and on the
current stream, as torch ops do.

Device: a Triton launch takes the current device's context and stream, so without a
guard a model spread over two GPUs in one process (HF `device_map="auto"`) fails on the
second ("Pointer argument cannot be accessed from Triton", triton-lang/triton#2441) or
runs on the wrong stream. `_library.on_tensors_device` is the guard of every Triton
launcher; the C++ CUDA kernels take a `CUDAGuard`.

Stream: an op launched on another stream than the caller's would read its inputs before
the caller's stream has written them. The CUDA-graph tests see a launch outside the
capture stream only as a replay mismatch; here the inputs are written on a side stream
behind a sleep, so any kernel not ordered on that stream reads the poison.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import moe_kernels
from moe_kernels import _library, testing

from helpers import HAS_CUDA
from test_cuda_graphs import poison

from test_layer import make_fp8_layer, make_hidden

TWO_DEVICES = HAS_CUDA and torch.cuda.device_count() >= 2
needs_two_devices = pytest.mark.skipif(
    not TWO_DEVICES, reason="needs two CUDA devices (the tensors on cuda:1, cuda:0 current)")


class _StubCudaTensor:
    """What on_tensors_device reads of a tensor: is_cuda and get_device()."""

    def __init__(self, index):
        self.is_cuda, self._index = index is not None, index

    def get_device(self):
        return self._index if self.is_cuda else -1


@pytest.mark.parametrize("current,index,switched", [(0, 1, True), (1, 0, True), (1, 1, False),
                                                    (0, None, False)])
def test_launch_runs_with_its_tensors_device_current(monkeypatch, current, index, switched):
    """The guard's logic on any machine: the launcher runs with the tensor's device
    current (entered only when it differs; a CPU tensor never), with every argument passed
    through, and its result returned."""
    entered = []
    state = {"current": current}

    @contextlib.contextmanager
    def device(i):
        entered.append(i)
        saved, state["current"] = state["current"], i
        try:
            yield
        finally:
            state["current"] = saved

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []

    def launcher(x, *rest):
        seen.append((state["current"], x, rest))
        return "result"

    x = _StubCudaTensor(index)
    assert _library.on_tensors_device(launcher)(x, 7, None) == "result"
    assert entered == ([index] if switched else [])
    assert seen == [(index if index is not None else current, x, (7, None))]
    assert state["current"] == current


def test_every_triton_launcher_is_guarded():
    """Every op with a Triton kernel hands out the guarded launcher (Op._bare, where the
    eager path and the registered variant both take it; conftest wraps the eager one in
    checks for the session)."""
    ops = [op for op in _library.OPS.values() if op.triton_module is not None]
    assert len(ops) >= 14
    for op in ops:
        chain = [op._bare("triton")]
        while hasattr(chain[-1], "__wrapped__"):
            chain.append(chain[-1].__wrapped__)
        assert any(f.__qualname__ == "on_tensors_device.<locals>.run" for f in chain), op.name
        assert chain[-1].__module__ == f"moe_kernels.triton.{op.triton_module}", op.name


@needs_two_devices
@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
@pytest.mark.parametrize("op", testing.ops())
def test_op_on_the_second_device(op, backend):
    """Every public op, its edge cases on cuda:1 while cuda:0 is current: the reference's
    results (itself run the same way), and cuda:0 still current after."""
    if backend not in _library.OPS[op].backends:
        pytest.skip(f"{op} has no {backend} backend")
    torch.cuda.set_device(0)
    testing.check(op, functools.partial(getattr(moe_kernels, op), backend=backend),
                  device="cuda:1")
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0


@needs_two_devices
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_layer_on_the_second_device(backend):
    """The DeepseekV3MoE layer on cuda:1 while cuda:0 is current gives what it gives with
    cuda:1 current, bit for bit."""
    layer, cfg = make_fp8_layer("cuda:1", backend)
    hidden = make_hidden(5, cfg, device="cuda:1")
    torch.cuda.set_device(1)
    want = layer(hidden)
    torch.cuda.set_device(0)
    got = layer(hidden)
    assert torch.cuda.current_device() == 0
    assert got.device == hidden.device and torch.equal(got, want)


def _poisoned_copy(t: torch.Tensor) -> torch.Tensor:
    """A tensor like t (same strides) poisoned as the CUDA-graph tests poison outputs:
    NaN, or all bits set (an fp8 NaN code, a -1 id or length)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    poison([out])
    return out


def _on_side_stream_late(public, backend):
    """public(..., backend=backend) called on a new side stream with copies of its tensor
    arguments that are poisoned, then written there with the arguments' values only after
    a sleep of ~20 ms; synchronised before returning."""
    def call(*args, **kwargs):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        pairs = {}

        def late(x):
            if not isinstance(x, torch.Tensor) or 0 in x.stride():   # expanded: as is
                return x
            if id(x) not in pairs:
                pairs[id(x)] = (x, _poisoned_copy(x))
            return pairs[id(x)][1]

        with torch.cuda.stream(side):
            args = [late(a) for a in args]
            kwargs = {k: late(v) for k, v in kwargs.items()}
            torch.cuda._sleep(20_000_000)
            for original, copy in pairs.values():
                copy.copy_(original)
            result = public(*args, backend=backend, **kwargs)
        side.synchronize()
        return result

    return call


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", testing.ops())
def test_op_runs_on_the_current_stream(op, backend):
    """Every op's edge cases on a side stream whose inputs are written there only after a
    sleep: a kernel not ordered on that stream reads poison (NaN, -1 ids and lengths) and
    its result differs from the reference's."""
    if backend not in _library.OPS[op].backends:
        pytest.skip(f"{op} has no {backend} backend")
    call = _on_side_stream_late(getattr(moe_kernels, op), backend)
    report = testing.check(op, call, device="cuda", raise_on_failure=False)
    assert report.passed, report.message()
    assert len(report.skipped) < len(report.results), f"{op}: no edge case ran"
