"""fused_moe_fp8 against reference.moe_forward: relative error < 2e-2
on DeepSeek-V3's layer shape scaled down for the CPU (H=7168 -> 256, I=2048 -> 128,
256 experts -> 12, top-8 -> 4)."""

from __future__ import annotations

import pytest
import torch

import moe_kernels
from moe_kernels.reference import fp8 as ref_fp8
from moe_kernels.reference import fused_moe as ref

from helpers import (FP8_INPUT_OPCHECKS, GemmLifetimes, call_backend, device_backend_params,
                     expect_inductor_bf16_round_trip, poison_allocator, with_tma, with_ws)

BACKENDS = ("triton", "cpu", "reference")
H, INTER, E, TOPK = 256, 128, 12, 4


def make_layer(seed, device, E=E, H=H, inter=INTER):
    g = torch.Generator().manual_seed(seed)
    w13, s13 = ref_fp8.quantize_fp8_block(torch.randn(E, 2 * inter, H, generator=g) / H ** 0.5)
    w2, s2 = ref_fp8.quantize_fp8_block(torch.randn(E, H, inter, generator=g) / inter ** 0.5)
    return [t.to(device) for t in (w13, s13, w2, s2)]


def make_routing(T, seed, device, *, skip=0.0, one_expert=None, E=E, K=TOPK):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T \
        else torch.zeros(0, K, dtype=torch.int64)
    if one_expert is not None:
        ids = torch.full((T, K), one_expert)
    ids = torch.where(torch.rand(T, K, generator=g) < skip, -1, ids)
    w = torch.rand(T, K, generator=g)
    return w.to(device), ids.int().to(device)


def rel_err(out, want):
    diff = (out.double().cpu() - want.double().cpu()).norm()
    den = want.double().norm()
    return float(diff / den) if den > 0 else float(diff)


CASES = [  # (T, skip, one_expert): why
    (1, 0.0, None),      # decode, one token
    (7, 0.0, None),      # fewer tokens than experts: most experts empty
    (45, 0.2, None),     # prefill-ish with -1 (not routed) pairs
    (33, 0.0, 5),        # every pair on one expert (duplicate ids in a row add up)
    (0, 0.0, None),      # empty batch
]


@pytest.mark.parametrize("device,backend", with_ws(with_tma(device_backend_params(BACKENDS))))
@pytest.mark.parametrize("T,skip,one", CASES)
def test_matches_moe_forward(device, backend, T, skip, one):
    w13, s13, w2, s2 = make_layer(seed=T, device=device)
    g = torch.Generator().manual_seed(T + 1)
    hidden = torch.randn(T, H, generator=g).bfloat16().to(device)
    weights, ids = make_routing(T, seed=T + 2, device=device, skip=skip, one_expert=one)
    poison_allocator(device)
    out = call_backend(moe_kernels.fused_moe_fp8, hidden, w13, s13, w2, s2, weights, ids,
                       backend=backend)
    assert out.shape == (T, H) and out.dtype == torch.bfloat16
    want = ref.moe_forward(hidden.cpu(), w13.cpu(), s13.cpu(), w2.cpu(), s2.cpu(),
                           weights.cpu(), ids.cpu(), out_dtype=torch.float32)
    assert not out.float().isnan().any()
    assert rel_err(out, want) < 2e-2
    if skip == 1.0 or T == 0:
        return
    # the unquantized-activation oracle is a different function: e4m3 rounding of the
    # activations alone puts the pipeline a few percent away (docs/fp8.md)
    exact = ref.moe_forward(hidden.cpu(), w13.cpu(), s13.cpu(), w2.cpu(), s2.cpu(),
                            weights.cpu(), ids.cpu(), out_dtype=torch.float32,
                            quantize_activations=False)
    assert rel_err(out, exact) < 8e-2


@pytest.mark.parametrize("device,backend", device_backend_params(("triton",)))
@pytest.mark.parametrize("T,skip,one", CASES)
def test_gathered_quantization_equals_quantize_then_permute(device, backend, T, skip, one,
                                                            monkeypatch):
    """At small T the Triton path quantizes rows as it permutes them (one kernel,
    GATHERED_QUANT_MAX_BYTES); the output is bit for bit that of quantize, then permute."""
    from moe_kernels.ops import fp8 as fp8_ops
    from moe_kernels.ops import fused_moe as ops
    w13, s13, w2, s2 = make_layer(seed=T, device=device)
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).bfloat16().to(device)
    weights, ids = make_routing(T, seed=T + 2, device=device, skip=skip, one_expert=one)
    gathered = []
    fused = fp8_ops.gather_rows_quant_fp8_unchecked
    monkeypatch.setattr(fp8_ops, "gather_rows_quant_fp8_unchecked",
                        lambda *args: gathered.append(args) or fused(*args))
    out = moe_kernels.fused_moe_fp8(hidden, w13, s13, w2, s2, weights, ids, backend=backend)
    assert len(gathered) == 1, "the small batch took the separate kernels"
    monkeypatch.setattr(ops, "GATHERED_QUANT_MAX_BYTES", -1)
    separate = moe_kernels.fused_moe_fp8(hidden, w13, s13, w2, s2, weights, ids,
                                         backend=backend)
    assert len(gathered) == 1, "the threshold did not turn the fused kernel off"
    assert torch.equal(out.view(torch.int16), separate.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,skip,one", CASES)
def test_cpu_kernel_equals_the_composed_stages(T, skip, one, dtype):
    """The cpu backend runs every stage in one C++ call (csrc/cpu/fused_moe.cpp): bit for
    bit the stages called one by one through the ops' internal layer."""
    from moe_kernels.ops import fused_moe as ops
    if not moe_kernels.extension_loaded():
        pytest.skip("moe_kernels._C is not built")
    w13, s13, w2, s2 = make_layer(seed=T, device="cpu")
    g = torch.Generator().manual_seed(T + 7)
    # every other row of a wider tensor: rows strided, last dimension contiguous
    hidden = torch.randn(T, 2, H, generator=g).to(dtype)[:, 0]
    weights, ids = make_routing(T, seed=T + 2, device="cpu", skip=skip, one_expert=one)
    for routing_ids in (ids, ids.long()):
        out = moe_kernels.fused_moe_fp8(hidden, w13, s13, w2, s2, weights, routing_ids,
                                        backend="cpu")
        composed = ops.fused_moe_fp8_composed("cpu", hidden, w13, s13, w2, s2, weights,
                                              routing_ids)
        assert out.dtype == dtype and out.shape == (T, H)
        assert torch.equal(out.view(torch.uint8), composed.view(torch.uint8))


def test_cpu_kernel_equals_the_composed_stages_on_partial_blocks():
    """H and I not multiples of 128, E = 5, float32 activations."""
    from moe_kernels.ops import fused_moe as ops
    if not moe_kernels.extension_loaded():
        pytest.skip("moe_kernels._C is not built")
    h, inter, e = 200, 72, 5
    w13, s13, w2, s2 = make_layer(seed=9, device="cpu", E=e, H=h, inter=inter)
    hidden = torch.randn(9, h)
    weights, ids = make_routing(9, seed=4, device="cpu", E=e, K=2)
    out = moe_kernels.fused_moe_fp8(hidden, w13, s13, w2, s2, weights, ids, backend="cpu")
    composed = ops.fused_moe_fp8_composed("cpu", hidden, w13, s13, w2, s2, weights, ids)
    assert torch.equal(out.view(torch.int32), composed.view(torch.int32))


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_no_experts_gives_zeros(device, backend):
    """E = 0 (weights of no expert, e.g. a rank that holds none): every pair is skipped,
    as ids outside [0, E) are, on every backend and through the registered op."""
    w13, s13, w2, s2 = [t[:0] for t in make_layer(seed=1, device=device)]
    hidden = torch.randn(4, H).bfloat16().to(device)
    weights, ids = make_routing(4, seed=3, device=device)
    out = moe_kernels.fused_moe_fp8(hidden, w13, s13, w2, s2, weights, ids, backend=backend)
    assert out.dtype == torch.bfloat16 and torch.equal(out.cpu(), torch.zeros(4, H).bfloat16())
    if backend == "cpu":
        direct = torch.ops.moe_kernels.fused_moe_fp8(hidden, w13, s13, w2, s2, weights, ids)
        assert torch.equal(direct, torch.zeros(4, H).bfloat16())


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
@pytest.mark.parametrize("h,inter", [(256, 0), (0, 64)])
def test_zero_widths(device, backend, h, inter):
    """No intermediate column (I = 0: every GEMM2 output an empty sum) gives zeros; no
    hidden column (H = 0) gives (T, 0). Every backend, no kernel reading past its inputs."""
    w13, s13, w2, s2 = make_layer(seed=3, device=device, E=4, H=h, inter=inter)
    hidden = torch.randn(5, h).bfloat16().to(device)
    weights, ids = make_routing(5, seed=4, device=device, E=4, K=2)
    out = moe_kernels.fused_moe_fp8(hidden, w13, s13, w2, s2, weights, ids, backend=backend)
    assert out.shape == (5, h) and out.dtype == torch.bfloat16 and not out.float().any()


@pytest.mark.parametrize("device,backend", with_ws(with_tma(device_backend_params(BACKENDS))))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_hidden_stays_in_its_token(device, backend, value):
    """One NaN in a token's hidden row makes that token's whole output row NaN (its
    quantized row holds a NaN code, which every product takes), on every backend; +-inf
    saturates to +-448 (docs/fp8.md), so its row stays finite. Other tokens' outputs are
    bit for bit those of the call without it. (Catches an interpreted GEMM that reads the
    NaN code as the interpreter's fp8 cast does, 480, and loses it.)"""
    w13, s13, w2, s2 = make_layer(seed=2, device=device)
    hidden = torch.randn(6, H, generator=torch.Generator().manual_seed(5)).bfloat16()
    weights, ids = make_routing(6, seed=6, device=device)
    spoiled = hidden.clone()
    spoiled[3, 77] = float(value)
    clean, out = (call_backend(moe_kernels.fused_moe_fp8, h.to(device), w13, s13, w2, s2,
                               weights, ids, backend=backend).cpu() for h in (hidden, spoiled))
    if value == "nan":
        assert out[3].isnan().all(), "the token's whole row"
    else:
        assert out[3].isfinite().all()
    others = torch.arange(6) != 3
    assert torch.equal(out[others].view(torch.int16), clean[others].view(torch.int16))


@pytest.mark.parametrize("device,backend", device_backend_params(("triton", "cpu")))
def test_all_pairs_skipped_gives_zeros(device, backend):
    w13, s13, w2, s2 = make_layer(seed=1, device=device)
    hidden = torch.randn(5, H).bfloat16().to(device)
    weights, ids = make_routing(5, seed=3, device=device, skip=1.0)
    out = moe_kernels.fused_moe_fp8(hidden, w13, s13, w2, s2, weights, ids, backend=backend)
    assert torch.equal(out.cpu(), torch.zeros(5, H, dtype=torch.bfloat16))


@pytest.mark.parametrize("device,backend", device_backend_params(("triton", "cpu")))
def test_partial_blocks_and_odd_experts(device, backend):
    """H and I not multiples of 128 (partial scale blocks), E = 5."""
    h, inter, e = 200, 72, 5
    w13, s13, w2, s2 = make_layer(seed=9, device=device, E=e, H=h, inter=inter)
    hidden = torch.randn(9, h).to(device)
    weights, ids = make_routing(9, seed=4, device=device, E=e, K=2)
    out = moe_kernels.fused_moe_fp8(hidden, w13, s13, w2, s2, weights, ids, backend=backend)
    assert out.dtype == torch.float32
    want = ref.moe_forward(hidden.cpu(), w13.cpu(), s13.cpu(), w2.cpu(), s2.cpu(),
                           weights.cpu(), ids.cpu())
    assert rel_err(out, want) < 2e-2


# The composed backends (on cpu, one C++ call runs every stage)
@pytest.mark.parametrize("device,backend", device_backend_params(("triton", "reference")))
def test_each_intermediate_is_freed_after_its_last_reader(device, backend, monkeypatch):
    """GEMM2 starts with GEMM1's FP8 rows, their scales and GEMM1's output freed (the
    activation read it last): its live buffers are its own input and output, not also
    those (docs/fp8.md, peak memory: 16 KB a routed row at DeepSeek-V3's shape, not 31)."""
    w13, s13, w2, s2 = make_layer(seed=4, device=device)
    hidden = torch.randn(9, H).bfloat16().to(device)
    weights, ids = make_routing(9, seed=6, device=device)
    gemms = GemmLifetimes(monkeypatch)
    out = moe_kernels.fused_moe_fp8(hidden, w13, s13, w2, s2, weights, ids, backend=backend)
    assert len(gemms.calls) == 2
    assert gemms.alive_when(1) == [], "held through GEMM2"
    # the spy's references are weak: the GEMM2 output (the unpermute's input) is gone too
    assert [ref() for ref in gemms.calls[1].values()] == [None] * 3
    want = ref.moe_forward(hidden.cpu(), w13.cpu(), s13.cpu(), w2.cpu(), s2.cpu(),
                           weights.cpu(), ids.cpu())
    assert rel_err(out, want) < 2e-2


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_long_batches_run_in_chunks_of_tokens(device, backend, monkeypatch):
    """More than CHUNK_TOKENS tokens: one pass per chunk, each exactly the call on its rows
    alone (bit for bit), in place too; counted by the stages' own calls."""
    from moe_kernels.ops import fused_moe as ops
    monkeypatch.setattr(ops, "CHUNK_TOKENS", 4)
    h = 128                               # two chunks, small tiles: ~3 s interpreted
    w13, s13, w2, s2 = make_layer(seed=11, device=device, H=h, inter=h)
    hidden = torch.randn(6, h).bfloat16().to(device)
    weights, ids = make_routing(6, seed=12, device=device, skip=0.1)
    fused = lambda x, rows, **kw: moe_kernels.fused_moe_fp8(
        x, w13, s13, w2, s2, weights[rows], ids[rows], backend=backend, **kw)
    passes, one_pass = [], ops._one_pass
    monkeypatch.setattr(ops, "_one_pass", lambda *a: passes.append(a[1].shape[0]) or
                        one_pass(*a))
    out = fused(hidden, slice(None))
    assert passes == [4, 2]
    for t0 in range(0, 6, 4):
        rows = slice(t0, t0 + 4)
        assert torch.equal(out[rows], fused(hidden[rows], rows)), t0
    in_place = hidden.clone()
    assert fused(in_place, slice(None), out=in_place) is in_place
    assert torch.equal(in_place, out)
    want = ref.moe_forward(hidden.cpu(), w13.cpu(), s13.cpu(), w2.cpu(), s2.cpu(),
                           weights.cpu(), ids.cpu())
    assert rel_err(out, want) < 2e-2


def _allocations(call):
    """call() under torch.profiler: its allocations and frees in order, as signed byte
    counts (the profiler's raw memory events; the aggregated ones merge a C++ op's)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:
        pytest.skip("this torch's profiler does not expose its raw memory events")
    return [n for _, n in sorted((e.start_ns(), e.nbytes()) for e in events
                                 if e.name() == "[memory]")]


def test_cpu_kernel_frees_each_intermediate_after_its_last_reader():
    """The one C++ call: the FP8 rows and GEMM1's output are freed before GEMM2's output
    is allocated, told apart by their sizes: rows R*H (fp8), GEMM1 R*2I (bf16), GEMM2 R*H
    (float32 here). A GEMM's own scratch may share a size (a widened copy of its input,
    by ISA): it is freed by the GEMM, so what is asked is that no buffer of the rows' or
    GEMM1's size is alive when the last buffer of GEMM2's size is allocated."""
    if not moe_kernels.extension_loaded():
        pytest.skip("moe_kernels._C is not built")
    T, K, h, inter = 512, 3, 384, 256
    w13, s13, w2, s2 = make_layer(seed=7, device="cpu", H=h, inter=inter)
    hidden = torch.randn(T, h)
    weights, ids = make_routing(T, seed=8, device="cpu", K=K)
    fused = lambda: moe_kernels.fused_moe_fp8(hidden, w13, s13, w2, s2, weights, ids,
                                              backend="cpu")
    fused()
    events = _allocations(fused)
    R = T * K
    rows, y, z = R * h, R * 2 * inter * 2, R * h * 4
    assert z in events and rows in events and y in events, events
    at = len(events) - 1 - events[::-1].index(z)
    alive = lambda n: events[:at].count(n) - events[:at].count(-n)
    assert (alive(rows), alive(y)) == (0, 0), events


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_peak_memory_is_one_stage_at_a_time():
    """torch.cuda.max_memory_allocated over a call: at most the largest stage's buffers
    (its input and output: at this shape GEMM1's FP8 rows and bf16 output) plus the small
    index and scale tensors, below the sum of the rows, GEMM1's output and GEMM2's buffers
    that a composition holding every intermediate reaches."""
    T, K, h, inter = 2048, 4, 512, 256
    w13, s13, w2, s2 = make_layer(seed=7, device="cuda", H=h, inter=inter)
    hidden = torch.randn(T, h, device="cuda").bfloat16()
    weights, ids = make_routing(T, seed=8, device="cuda", K=K)
    fused = lambda: moe_kernels.fused_moe_fp8(hidden, w13, s13, w2, s2, weights, ids,
                                              backend="triton")
    fused()                               # compiled, caches warm
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fused()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    R = T * K
    rows, y, act, z, res = R * h, R * 4 * inter, R * inter, R * 2 * h, out.numel() * 2
    stages = [rows + y, y + act, act + z, z + res]
    small = R * 64 + (1 << 20)            # indices, scales, scratch, allocator rounding
    assert peak <= max(stages) + small, (peak, stages)
    assert max(stages) + small < rows + y + act + z    # the bound tells the two apart


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_torch_compile_fullgraph(device, backend, request):
    expect_inductor_bf16_round_trip(request, device, backend)
    torch._dynamo.reset()
    w13, s13, w2, s2 = make_layer(seed=2, device=device)
    hidden = torch.randn(6, H).bfloat16().to(device)
    weights, ids = make_routing(6, seed=5, device=device)

    def f(x, w, i):
        return moe_kernels.fused_moe_fp8(x, w13, s13, w2, s2, w, i, backend=backend)

    # The reference's bf16 rounding of GEMM1's output decides the FP8 scales of the next
    # step; Inductor drops such intermediate roundings unless told to emulate them
    # (docs/fp8.md), after which every backend compiles to the same bits as eager.
    with torch._inductor.config.patch(emulate_precision_casts=True):
        got = torch.compile(f, fullgraph=True)(hidden, weights, ids)
    assert torch.equal(got, f(hidden, weights, ids))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_registered_op(device):
    """torch.ops.moe_kernels.fused_moe_fp8 (composite, the device's default backend):
    within the oracle's tolerance, its fake gives the shape, opcheck passes, and it runs
    inside torch.compile(fullgraph=True)."""
    w13, s13, w2, s2 = make_layer(5, device)
    w, ids = make_routing(6, 5, device, skip=0.2)
    hidden = torch.randn(6, H, device=device, dtype=torch.bfloat16)
    args = (hidden, w13, s13, w2, s2, w, ids)
    want = ref.moe_forward(hidden, w13, s13, w2, s2, w, ids)
    op = torch.ops.moe_kernels.fused_moe_fp8
    assert rel_err(op(*args), want) < 2e-2
    torch.library.opcheck(op.default, args, test_utils=FP8_INPUT_OPCHECKS)
    torch._dynamo.reset()
    got = torch.compile(lambda *a: op(*a) + 1.0, fullgraph=True)(*args)
    assert rel_err(got - 1.0, want) < 2e-2


def test_bad_input():
    w13, s13, w2, s2 = make_layer(seed=0, device="cpu")
    hidden = torch.randn(3, H).bfloat16()
    weights, ids = make_routing(3, seed=0, device="cpu")
    call = lambda **kw: moe_kernels.fused_moe_fp8(
        kw.get("hidden", hidden), kw.get("w13", w13), kw.get("s13", s13), kw.get("w2", w2),
        kw.get("s2", s2), kw.get("weights", weights), kw.get("ids", ids))
    with pytest.raises(TypeError, match="w13 must be float8"):
        call(w13=w13.float())
    with pytest.raises(ValueError, match="w13 must have shape"):
        call(hidden=torch.randn(3, H + 1).bfloat16())
    with pytest.raises(ValueError, match="w2 must have shape"):
        call(w2=w2[:, :, :64])
    with pytest.raises(ValueError, match="w13_scales"):
        call(s13=s13[:, :1])
    with pytest.raises(ValueError, match="topk_weights"):
        call(weights=weights[:, :2])
    with pytest.raises(TypeError, match="topk_ids"):
        call(ids=ids.float())
    # float32, bfloat16, float16 activations (every backend: the cpu GEMMs and the
    # unpermute write no float64)
    for backend in ("reference", "cpu"):
        with pytest.raises(TypeError, match="hidden must have dtype"):
            moe_kernels.fused_moe_fp8(hidden.double(), w13, s13, w2, s2, weights, ids,
                                      backend=backend)


def _valid_args():
    w13, s13, w2, s2 = make_layer(seed=0, device="cpu")
    weights, ids = make_routing(3, seed=0, device="cpu")
    return dict(hidden=torch.randn(3, H).bfloat16(), w13=w13, w13_scales=s13, w2=w2,
                w2_scales=s2, topk_weights=weights, topk_ids=ids)


def _column_major(t):
    """t's values with the last two dims' strides swapped (last dim not contiguous)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


# Invalid calls, each with one fault, for the common-case predicate: every one must fail
# check_args and the predicate alike (a fault the predicate missed would skip the checks).
_NEAR_MISSES = [
    ("hidden int", lambda kw: dict(hidden=kw["hidden"].int())),
    ("hidden 3-D", lambda kw: dict(hidden=kw["hidden"][None])),
    ("hidden column stride", lambda kw: dict(hidden=_column_major(kw["hidden"]))),
    ("hidden a list", lambda kw: dict(hidden=[[0.0] * H] * 3)),
    ("hidden width", lambda kw: dict(hidden=torch.randn(3, H + 1).bfloat16())),
    ("w13 float", lambda kw: dict(w13=kw["w13"].float())),
    ("w13 2-D", lambda kw: dict(w13=kw["w13"][0])),
    ("w13 odd rows", lambda kw: dict(w13=kw["w13"][:, 1:])),
    ("w13 column stride", lambda kw: dict(w13=_column_major(kw["w13"]))),
    # torch calls an empty tensor contiguous whatever its strides
    ("no experts, w13 last stride 2", lambda kw: dict(
        w13=kw["w13"][:0].as_strided((0,) + kw["w13"].shape[1:], (1, 1, 2)),
        w2=kw["w2"][:0], w13_scales=kw["w13_scales"][:0], w2_scales=kw["w2_scales"][:0])),
    ("w2 float", lambda kw: dict(w2=kw["w2"].float())),
    ("w2 width", lambda kw: dict(w2=kw["w2"][:, :, :64])),
    ("w2 experts", lambda kw: dict(w2=kw["w2"][:1])),
    ("w2 column stride", lambda kw: dict(w2=_column_major(kw["w2"]))),
    ("w13_scales shape", lambda kw: dict(w13_scales=kw["w13_scales"][:, :1])),
    ("w13_scales float64", lambda kw: dict(w13_scales=kw["w13_scales"].double())),
    ("w2_scales shape", lambda kw: dict(w2_scales=kw["w2_scales"][:, :, :0])),
    ("w2_scales a list", lambda kw: dict(w2_scales=[1.0])),
    ("w2_scales on meta", lambda kw: dict(w2_scales=kw["w2_scales"].to("meta"))),
    ("w13 on meta", lambda kw: dict(w13=kw["w13"].to("meta"))),
    ("topk_ids float", lambda kw: dict(topk_ids=kw["topk_ids"].float())),
    ("topk_ids rows", lambda kw: dict(topk_ids=kw["topk_ids"][:2])),
    ("topk_weights int", lambda kw: dict(topk_weights=kw["topk_weights"].int())),
    ("topk_weights columns", lambda kw: dict(topk_weights=kw["topk_weights"][:, :2])),
    ("topk_weights on meta", lambda kw: dict(topk_weights=kw["topk_weights"].to("meta"))),
]


@pytest.mark.parametrize("desc,over", _NEAR_MISSES, ids=[b[0] for b in _NEAR_MISSES])
def test_common_case_predicate_refuses_every_invalid_call(desc, over):
    """fused_moe_fp8 skips check_args when _plain_call holds: each invalid call must fail both."""
    from moe_kernels.ops import fused_moe as ops
    kw = _valid_args()
    kw.update(over(kw))
    with pytest.raises((TypeError, ValueError)):
        ops.check_args(ops.OP, *kw.values())
    assert not ops._plain_call(*kw.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_common_case_predicate_takes_the_common_call(dtype):
    """Each activation dtype (int64 ids with float32) takes the short path, and check_args
    agrees the call is valid."""
    from moe_kernels.ops import fused_moe as ops
    kw = _valid_args()
    kw["hidden"] = kw["hidden"].to(dtype)
    if dtype == torch.float32:
        kw["topk_ids"] = kw["topk_ids"].long()
    assert ops._plain_call(*kw.values())
    ops.check_args(ops.OP, *kw.values())
