"""CUDA-graph capture and replay equal to eager, bit for bit, for every op on every CUDA
backend and for the layer (docs/api.md: no host synchronisation, so every op is
capturable; determinism, so replay and eager agree exactly).

Each op runs over its edge cases of moe_kernels.testing (empty, one token, partial tiles,
E not a power of two, ties, NaN/inf, -1 ids, all on one expert). Per case:
1. eager result;
2. capture the same call (after a warm-up on a side stream, which compiles the kernels);
3. poison the graph's outputs (NaN / all-ones bits), replay: every element must be
   rewritten and equal eager;
4. halve the float inputs in place, replay: equal to eager on the halved inputs, so the
   graph reads its input buffers and bakes in no value computed on the host at capture.
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels
from moe_kernels import _library, testing

from helpers import HAS_CUDA, HAS_SM90, TMA, WS, call_backend
from moe_kernels.bench.launches import TMA_OPS
from properties import flat

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")

CUDA_BACKENDS = ("triton", "cuda")


def tensors_of(x) -> list[torch.Tensor]:
    """The tensors of a result or of an inputs dict (tuples and layouts unrolled)."""
    return flat(list(x.values()) if isinstance(x, dict) else x)


def bits(t: torch.Tensor) -> torch.Tensor:
    """t as integers of its width, so that equality is bitwise (NaN == NaN, -0 != +0)."""
    if t.is_floating_point():
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                       8: torch.int64}[t.element_size()])
    return t


def assert_same_bits(got, want, what: str) -> None:
    got, want = tensors_of(got), tensors_of(want)
    assert len(got) == len(want), f"{what}: {len(got)} outputs, eager gave {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what}: output {i} shape/dtype"
        bad = bits(g) != bits(w)
        assert not bad.any(), (f"{what}: output {i}: {int(bad.sum())} of {bad.numel()} "
                               f"elements differ from eager, first at "
                               f"{bad.nonzero()[0].tolist()}")


def poison(outputs) -> None:
    for t in tensors_of(outputs):
        if t.is_floating_point() and t.element_size() > 1:
            t.fill_(float("nan"))
        else:
            bits(t).fill_(-1)  # int -1 / fp8 0xFF (NaN)


def halve_float_inputs(inputs) -> None:
    """x *= 0.5 in place for every float input (exact, and changes every result that
    depends on it); fp8, integer and expanded (stride-0) inputs are kept."""
    for t in tensors_of(inputs):
        if t.is_floating_point() and t.element_size() > 1 and 0 not in t.stride():
            t.mul_(0.5)


def capture(fn):
    """(graph, outputs) of fn captured after one warm-up call on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def check_graph_equals_eager(call, inputs, what: str) -> None:
    want = call()
    graph, out = capture(call)
    poison(out)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(out, want, f"{what}: replay")
    halve_float_inputs(inputs)
    want = call()
    poison(out)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(out, want, f"{what}: replay on halved inputs")


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("op", testing.ops())
def test_op_graph_replay_equals_eager(op, backend):
    public = getattr(moe_kernels, op)
    ran = 0
    for case in testing.cases(op, "edge", device="cuda"):
        args, kwargs = testing.run(op, lambda *a, **k: (a, k), case)
        call = lambda: public(*args, backend=backend, **kwargs)
        try:
            call()
        except _library.BackendUnavailableError as exc:
            pytest.skip(f"{op} on {backend}: {exc}")
        check_graph_equals_eager(call, case.inputs, f"{op} [{backend}] case '{case.name}'")
        ran += 1
    assert ran, f"{op}: no edge case ran"


@pytest.mark.parametrize("op", TMA_OPS)
def test_tma_tiles_graph_replay_equals_eager(op):
    """The grouped GEMMs with every tile loading through TMA descriptors: a descriptor is
    built on the host per call and passed by value, so replay must still read the
    captured buffers (halved inputs) and rewrite every output."""
    public = getattr(moe_kernels, op)
    for case in testing.cases(op, "edge", device="cuda"):
        args, kwargs = testing.run(op, lambda *a, **k: (a, k), case)
        call = lambda: call_backend(public, *args, backend=TMA, **kwargs)
        check_graph_equals_eager(call, case.inputs, f"{op} [{TMA}] case '{case.name}'")


@pytest.mark.skipif(not HAS_SM90, reason="the ws kernel is Gluon for sm_90")
def test_ws_kernel_graph_replay_equals_eager():
    """The contiguous GEMM on its warp-specialised kernel (Gluon descriptors built per
    call, passed by value), as the TMA tiles above."""
    op = "grouped_gemm_fp8"
    public = getattr(moe_kernels, op)
    for case in testing.cases(op, "edge", device="cuda"):
        args, kwargs = testing.run(op, lambda *a, **k: (a, k), case)
        call = lambda: call_backend(public, *args, backend=WS, **kwargs)
        check_graph_equals_eager(call, case.inputs, f"{op} [{WS}] case '{case.name}'")


def test_fused_moe_in_place_graph_replay_equals_eager():
    """fused_moe_fp8(h, ..., out=h), captured: each replay overwrites h, so h is restored
    before it; the replay must equal the eager out-of-place result bit for bit."""
    ran = 0
    for case in testing.cases("fused_moe_fp8", "edge", device="cuda"):
        args, kwargs = testing.run("fused_moe_fp8", lambda *a, **k: (a, k), case)
        hidden, rest = args[0].contiguous(), args[1:]
        want = moe_kernels.fused_moe_fp8(hidden, *rest, backend="triton", **kwargs)
        buf = hidden.clone()
        graph, _ = capture(lambda: moe_kernels.fused_moe_fp8(buf, *rest, out=buf,
                                                             backend="triton", **kwargs))
        for _ in range(2):
            buf.copy_(hidden)
            graph.replay()
            torch.cuda.synchronize()
            assert_same_bits(buf, want, f"fused_moe_fp8 out=hidden case '{case.name}'")
        ran += 1
    assert ran


def test_layer_graph_replay_equals_eager():
    from test_layer import make_config, make_hidden, make_weights
    cfg = make_config()
    layer = moe_kernels.DeepseekV3MoE.from_hf(cfg, make_weights(cfg), device="cuda",
                                              backend="triton")
    for T in (1, 6, 64):
        hidden = make_hidden(T, cfg, device="cuda")
        check_graph_equals_eager(lambda: layer(hidden), [hidden], f"DeepseekV3MoE T={T}")
