"""FP8 grouped GEMMs: every backend against dequantize-then-float64-matmul, written out
here (docs/api.md: calc_diff < 1e-5), and padding / masked rows exactly zero."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_kernels
from moe_kernels.reference import fp8 as ref_fp8

from helpers import (FP8_INPUT_OPCHECKS, HAS_CUDA, HAS_SM90, big_memory_devices, calc_diff,
                     call_backend, device_backend_params, poison_allocator, require_ws_probe,
                     with_tma, with_ws, TMA, WS)

BACKENDS = ("triton", "cpu", "reference")

def make_weights(E, N, K, seed, device):
    g = torch.Generator().manual_seed(seed)
    q, s = ref_fp8.quantize_fp8_block(torch.randn(E, N, K, generator=g) / K ** 0.5)
    return q.to(device), s.to(device)


def make_rows(R, K, seed, device, column_major=False):
    g = torch.Generator().manual_seed(seed)
    q, s = ref_fp8.quantize_fp8_per_token_group(torch.randn(R, K, generator=g) * 2,
                                                column_major_scales=column_major)
    return q.to(device), s.to(device)


def oracle(a, a_s, b, b_s, expert_of_row):
    """float64: dequantize both operands (scales repeated over their 128 blocks), matmul
    per row with its expert's weight; rows without an expert are 0."""
    K = a.shape[-1]
    N = b.shape[1]
    a64 = a.cpu().double() * a_s.cpu().double().repeat_interleave(128, -1)[..., :K]
    b64 = b.cpu().double() * b_s.cpu().double().repeat_interleave(128, -2)[..., :N, :] \
        .repeat_interleave(128, -1)[..., :K]
    out = torch.zeros(a64.shape[0], N, dtype=torch.float64)
    for r, e in enumerate(expert_of_row.tolist()):
        if 0 <= e < b.shape[0]:
            out[r] = b64[e] @ a64[r]
    return out


def contiguous_m_indices(counts, align, pad_extra=0):
    """The layout permute(align=...) gives: segments of counts[e] rows padded to align."""
    parts = []
    for e, c in enumerate(counts):
        parts += [e] * c + [-1] * (-c % align)
    return torch.tensor(parts + [-1] * pad_extra, dtype=torch.int32)


CONTIGUOUS = [  # (counts per expert, align, N, K): why
    ([0, 1, 130, 5], 1, 200, 300),         # empty / single-row / > one tile experts, unaligned
    ([3, 0, 64, 2, 70], 64, 256, 256),     # aligned to the tile (the fast path), E odd
    ([17], 1, 130, 129),                   # one expert; partial N and K blocks
    ([0, 0, 0], 1, 64, 128),               # no rows at all
    ([1, 1, 1, 1, 1, 1, 1], 1, 96, 520),   # decode-like: one row each, many experts in a tile
    ([4, 9], 1, 136, 336),                 # partial N and K blocks that TMA can read (K % 16 == 0)
]


@pytest.mark.parametrize("device,backend", with_ws(with_tma(device_backend_params(BACKENDS))))
@pytest.mark.parametrize("counts,align,N,K", CONTIGUOUS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_contiguous(device, backend, counts, align, N, K, out_dtype):
    m = contiguous_m_indices(counts, align, pad_extra=3).to(device)
    a, a_s = make_rows(m.shape[0], K, seed=len(counts) + K, device=device,
                       column_major=len(counts) % 2 == 1)
    b, b_s = make_weights(len(counts), N, K, seed=N, device=device)
    poison_allocator(device)
    out = call_backend(moe_kernels.grouped_gemm_fp8, a, a_s, b, b_s, m, out_dtype=out_dtype,
                       backend=backend)
    assert out.shape == (m.shape[0], N) and out.dtype == out_dtype
    want = oracle(a, a_s, b, b_s, m.cpu())
    assert calc_diff(out, want) < 1e-5
    pad = (m < 0).cpu()
    assert not out.cpu()[pad].float().any(), "-1 rows must be exactly zero"
    assert not out.float().isnan().any()


@pytest.mark.parametrize("device,backend", with_ws(with_tma(device_backend_params(BACKENDS))))
def test_contiguous_any_row_order(device, backend):
    """m_indices need not be sorted: rows of several experts interleave inside a tile."""
    g = torch.Generator().manual_seed(11)
    m = torch.randint(-1, 6, (90,), generator=g).int().to(device)
    a, a_s = make_rows(90, 256, seed=2, device=device)
    b, b_s = make_weights(6, 160, 256, seed=3, device=device)
    out = call_backend(moe_kernels.grouped_gemm_fp8, a, a_s, b, b_s, m, backend=backend)
    assert calc_diff(out, oracle(a, a_s, b, b_s, m.cpu())) < 1e-5


@pytest.mark.parametrize("device,backend", with_tma(device_backend_params(BACKENDS)))
@pytest.mark.parametrize("M,N,K", [(5, 200, 300), (40, 128, 128), (1, 64, 7), (7, 96, 272)])
def test_masked(device, backend, M, N, K):
    E = 5
    masked = torch.tensor([0, 1, M, M // 2, 3 if M > 3 else M], dtype=torch.int32).to(device)
    a, a_s = make_rows(E * M, K, seed=M, device=device)
    a, a_s = a.view(E, M, K), a_s.view(E, M, -1)
    b, b_s = make_weights(E, N, K, seed=K, device=device)
    poison_allocator(device)
    out = call_backend(moe_kernels.grouped_gemm_fp8_masked, a, a_s, b, b_s, masked,
                       backend=backend)
    assert out.shape == (E, M, N)
    rows = torch.arange(E * M) % M
    group = torch.arange(E * M) // M
    expert_of_row = torch.where(rows < masked.cpu().long()[group], group, -1)
    want = oracle(a.reshape(E * M, K), a_s.reshape(E * M, -1), b, b_s, expert_of_row)
    got = out.reshape(E * M, N)
    assert calc_diff(got, want) < 1e-5
    assert not got.cpu()[expert_of_row < 0].float().any(), "rows >= masked_m must be zero"


@pytest.mark.parametrize("device,backend", with_tma(device_backend_params(BACKENDS)))
@pytest.mark.parametrize("M,K", [(5, 300), (40, 128), (7, 0)])
def test_masked_without_zero_fill(device, backend, M, K):
    """zero_fill=False: the rows below masked_m are the zero-filled call's, bit for bit;
    every other row of out keeps its bits (a NaN poison and a pattern of finite values),
    for counts of 0, partial, M, past M and negative; K = 0 (no launch) too."""
    E, N = 5, 200
    masked = torch.tensor([0, 2, M, M + 3, -1], dtype=torch.int32).to(device)
    a, a_s = make_rows(E * M, max(K, 1), seed=M, device=device)
    a, a_s = a[:, :K].reshape(E, M, K), a_s[:, :(K + 127) // 128].reshape(E, M, -1)
    b, b_s = make_weights(E, N, max(K, 1), seed=1, device=device)
    b, b_s = b[..., :K], b_s[..., :(K + 127) // 128]
    want = call_backend(moe_kernels.grouped_gemm_fp8_masked, a, a_s, b, b_s, masked,
                        backend=backend)
    valid = (torch.arange(M) < masked.cpu().long()[:, None])[..., None]
    for before in (torch.full((E, M, N), float("nan")),
                   torch.arange(E * M * N, dtype=torch.float32).view(E, M, N) % 7 - 3):
        out = before.bfloat16().to(device)
        got = call_backend(moe_kernels.grouped_gemm_fp8_masked, a, a_s, b, b_s, masked,
                           out=out, zero_fill=False, backend=backend)
        assert got is out
        expect = torch.where(valid, want.cpu(), before.bfloat16())
        assert torch.equal(out.cpu().view(torch.int16), expect.view(torch.int16))


def test_zero_fill_false_needs_out():
    a, a_s = make_rows(6, 256, seed=0, device="cpu")
    b, b_s = make_weights(2, 128, 256, seed=0, device="cpu")
    args = (a.view(2, 3, 256), a_s.view(2, 3, 2), b, b_s, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="zero_fill=False .* needs out="):
        moe_kernels.grouped_gemm_fp8_masked(*args, zero_fill=False)
    with pytest.raises(TypeError, match="zero_fill must be a bool"):
        moe_kernels.grouped_gemm_fp8_masked(*args, out=torch.empty(2, 3, 128), zero_fill=0)


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_shapes_with_nothing_to_sum(device, backend):
    """K = 0: every output is an empty sum, zero, on every backend and through out= (a
    NaN-filled buffer, so unwritten elements show); the Triton kernels read a first K
    block's scales ahead of their loop, which such an input does not have, so nothing is
    launched. The masked layout with no group (E = 0) or no row (M = 0): empty outputs."""
    m = torch.tensor([0, 1, -1, 0, 1], dtype=torch.int32, device=device)
    a, a_s = make_rows(5, 128, seed=1, device=device)
    b, b_s = make_weights(2, 72, 128, seed=2, device=device)
    a, a_s, b, b_s = a[:, :0], a_s[:, :0], b[..., :0], b_s[..., :0]
    out = moe_kernels.grouped_gemm_fp8(a, a_s, b, b_s, m, backend=backend)
    assert out.shape == (5, 72) and not out.float().any()
    buf = torch.full((5, 72), float("nan"), device=device).bfloat16()
    moe_kernels.grouped_gemm_fp8(a, a_s, b, b_s, m, out=buf, backend=backend)
    assert not buf.float().any()
    am, ams = a.new_empty((2, 3, 0)), a_s.new_empty((2, 3, 0))
    masked = torch.tensor([3, 1], dtype=torch.int32, device=device)
    buf = torch.full((2, 3, 72), float("nan"), device=device).bfloat16()
    moe_kernels.grouped_gemm_fp8_masked(am, ams, b, b_s, masked, out=buf, backend=backend)
    assert not buf.float().any()
    # no group, no row
    a2, a2_s = make_rows(6, 128, seed=3, device=device)
    b2, b2_s = make_weights(2, 72, 128, seed=4, device=device)
    for E, M in ((0, 3), (2, 0)):
        got = moe_kernels.grouped_gemm_fp8_masked(
            a2[:E * M].view(E, M, 128), a2_s[:E * M].view(E, M, 1), b2[:E], b2_s[:E],
            torch.full((E,), M, dtype=torch.int32, device=device), backend=backend)
        assert got.shape == (E, M, 72)


@settings(max_examples=25)
@given(data=st.data())
@pytest.mark.parametrize("device,backend",
                         with_ws(with_tma(device_backend_params(("triton", "cpu")))))
def test_property_random(device, backend, data):
    E = data.draw(st.integers(1, 6))
    counts = [data.draw(st.integers(0, 40)) for _ in range(E)]
    align = data.draw(st.sampled_from([1, 16, 32]))
    N = data.draw(st.integers(1, 260))
    # TMA reads rows of a multiple of 16 bytes only (other K load through pointers)
    K = data.draw(st.integers(1, 300) if backend not in (TMA, WS)
                  else st.integers(1, 19).map(lambda k: 16 * k))
    m = contiguous_m_indices(counts, align).to(device)
    a, a_s = make_rows(m.shape[0], K, seed=data.draw(st.integers(0, 99)), device=device)
    b, b_s = make_weights(E, N, K, seed=data.draw(st.integers(0, 99)), device=device)
    out = call_backend(moe_kernels.grouped_gemm_fp8, a, a_s, b, b_s, m, out_dtype=torch.float32,
                       backend=backend)
    want = oracle(a, a_s, b, b_s, m.cpu())
    assert calc_diff(out, want) < 1e-5
    assert not out.cpu()[(m < 0).cpu()].any()


@pytest.mark.parametrize("device,backend", device_backend_params(("triton", "cpu")))
def test_deterministic(device, backend):
    m = contiguous_m_indices([30, 0, 45], 1).to(device)
    a, a_s = make_rows(m.shape[0], 384, seed=1, device=device)
    b, b_s = make_weights(3, 128, 384, seed=1, device=device)
    runs = [moe_kernels.grouped_gemm_fp8(a, a_s, b, b_s, m, backend=backend) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("device,backend", device_backend_params(("triton", "cpu")))
def test_opcheck(device, backend):
    sfx = "_triton" if backend == "triton" else ""
    ops = torch.ops.moe_kernels
    m = contiguous_m_indices([5, 0, 9], 4).to(device)
    a, a_s = make_rows(m.shape[0], 200, seed=1, device=device)
    b, b_s = make_weights(3, 130, 200, seed=2, device=device)
    torch.library.opcheck(getattr(ops, "grouped_gemm_fp8" + sfx).default,
                          (a, a_s, b, b_s, m, torch.bfloat16), test_utils=FP8_INPUT_OPCHECKS)
    a3, s3 = make_rows(3 * 4, 200, seed=3, device=device)
    masked = torch.tensor([4, 0, 2], dtype=torch.int32, device=device)
    torch.library.opcheck(getattr(ops, "grouped_gemm_fp8_masked" + sfx).default,
                          (a3.view(3, 4, 200), s3.view(3, 4, -1), b, b_s, masked, torch.float32),
                          test_utils=FP8_INPUT_OPCHECKS)


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    m = contiguous_m_indices([7, 3, 0, 12], 8).to(device)
    a, a_s = make_rows(m.shape[0], 256, seed=4, device=device)
    b, b_s = make_weights(4, 192, 256, seed=5, device=device)
    masked = torch.tensor([2, 0, 1, 3], dtype=torch.int32, device=device)

    def f(a, a_s, m, masked):
        y = moe_kernels.grouped_gemm_fp8(a, a_s, b, b_s, m, backend=backend)
        z = moe_kernels.grouped_gemm_fp8_masked(a[:12].view(4, 3, 256), a_s[:12].view(4, 3, 2),
                                                b, b_s, masked, backend=backend)
        return y * 2, z

    got = torch.compile(f, fullgraph=True)(a, a_s, m, masked)
    want = f(a, a_s, m, masked)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _args(**over):
    m = contiguous_m_indices([2, 2], 1)
    a, a_s = make_rows(4, 256, seed=0, device="cpu")
    b, b_s = make_weights(2, 128, 256, seed=0, device="cpu")
    kw = dict(a=a, a_scales=a_s, b=b, b_scales=b_s, m_indices=m)
    kw.update(over)
    return kw


BAD = [
    ("a bf16", dict(a=torch.zeros(4, 256, dtype=torch.bfloat16)), TypeError, "a must be float8"),
    ("b float", dict(b=torch.zeros(2, 128, 256)), TypeError, "b must be float8"),
    ("K mismatch", dict(b=make_weights(2, 128, 384, 0, "cpu")[0]), ValueError, "K mismatch"),
    ("a_scales shape", dict(a_scales=torch.ones(4, 3)), ValueError, "a_scales must have shape"),
    ("b_scales shape", dict(b_scales=torch.ones(2, 2, 2)), ValueError, "b_scales must have shape"),
    ("a_scales bf16", dict(a_scales=torch.ones(4, 2, dtype=torch.bfloat16)), TypeError, "a_scales"),
    ("m_indices float", dict(m_indices=torch.zeros(4)), TypeError, "m_indices"),
    ("m_indices length", dict(m_indices=torch.zeros(5, dtype=torch.int32)), ValueError, "m_indices"),
]


@pytest.mark.parametrize("desc,over,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input(desc, over, exc, words):
    kw = _args(**over)
    with pytest.raises(exc, match=words):
        moe_kernels.grouped_gemm_fp8(kw["a"], kw["a_scales"], kw["b"], kw["b_scales"],
                                     kw["m_indices"])


def test_bad_input_masked():
    a, a_s = make_rows(6, 256, seed=0, device="cpu")
    b, b_s = make_weights(2, 128, 256, seed=0, device="cpu")
    ok = dict(a=a.view(2, 3, 256), a_scales=a_s.view(2, 3, 2), b=b, b_scales=b_s,
              masked_m=torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="groups"):
        moe_kernels.grouped_gemm_fp8_masked(**{**ok, "a": a.view(3, 2, 256),
                                               "a_scales": a_s.view(3, 2, 2)})
    with pytest.raises(ValueError, match="masked_m"):
        moe_kernels.grouped_gemm_fp8_masked(**{**ok, "masked_m": torch.ones(3, dtype=torch.int32)})
    with pytest.raises(TypeError, match="out_dtype"):
        moe_kernels.grouped_gemm_fp8_masked(**ok, out_dtype=torch.int32)


def _masked_args(**over):
    a, a_s = make_rows(6, 256, seed=0, device="cpu")
    b, b_s = make_weights(2, 128, 256, seed=0, device="cpu")
    kw = dict(a=a.view(2, 3, 256), a_scales=a_s.view(2, 3, 2), b=b, b_scales=b_s,
              masked_m=torch.tensor([1, 2], dtype=torch.int32))
    kw.update(over)
    return kw


_META = torch.device("meta")
# Invalid calls, each wrong in one way the common-case predicate must see: the public
# functions skip their checks when it holds.
_NEAR_MISSES = [(False, desc, over) for desc, over, _, _ in BAD] + [
    (False, "a on meta", dict(a=_args()["a"].to(_META))),
    (False, "b_scales on meta", dict(b_scales=_args()["b_scales"].to(_META))),
    (False, "m_indices on meta", dict(m_indices=_args()["m_indices"].to(_META))),
    (False, "a column-major", dict(a=_args()["a"].t().contiguous().t())),
    (False, "m_indices 2-D", dict(m_indices=_args()["m_indices"].view(2, 2))),
    (False, "m_indices a list", dict(m_indices=[0, 0, 1, 1])),
    (False, "out_dtype int32", dict(out_dtype=torch.int32)),
    (True, "E of a and b differ", dict(a=_masked_args()["a"].view(3, 2, 256),
                                       a_scales=_masked_args()["a_scales"].view(3, 2, 2),
                                       masked_m=torch.ones(3, dtype=torch.int32))),
    (True, "masked_m length", dict(masked_m=torch.ones(3, dtype=torch.int32))),
    (True, "a 2-D", dict(a=_args()["a"], a_scales=_args()["a_scales"])),
    (True, "a_scales float64", dict(a_scales=_masked_args()["a_scales"].double())),
    (True, "masked_m int16", dict(masked_m=torch.ones(2, dtype=torch.int16))),
]


@pytest.mark.parametrize("masked,desc,over", _NEAR_MISSES, ids=[c[1] for c in _NEAR_MISSES])
def test_common_case_predicate_refuses_every_invalid_call(masked, desc, over):
    """Each invalid call fails the public checks, and the short path's predicate."""
    from moe_kernels.ops import grouped_gemm as ops
    kw = _masked_args(**over) if masked else _args(**over)
    index = kw.pop("masked_m" if masked else "m_indices")
    fn = moe_kernels.grouped_gemm_fp8_masked if masked else moe_kernels.grouped_gemm_fp8
    with pytest.raises((TypeError, ValueError)):
        fn(kw["a"], kw["a_scales"], kw["b"], kw["b_scales"], index,
           out_dtype=kw.get("out_dtype"))
    assert not ops._plain_call(kw["a"], kw["a_scales"], kw["b"], kw["b_scales"], index,
                               3 if masked else 2, kw.get("out_dtype"))


@pytest.mark.parametrize("masked", [False, True])
def test_common_case_predicate_takes_the_common_call(masked):
    from moe_kernels.ops import grouped_gemm as ops
    kw = _masked_args() if masked else _args()
    index = kw["masked_m"] if masked else kw["m_indices"]
    for out_dtype in (None, torch.float32):
        assert ops._plain_call(kw["a"], kw["a_scales"], kw["b"], kw["b_scales"], index,
                               3 if masked else 2, out_dtype)


@pytest.mark.slow
@pytest.mark.parametrize("device", big_memory_devices(2.5))
def test_int64_addressing(device):
    """R * K beyond 2**31 elements: the last rows must be right. On the GPU every row is
    computed (every tile's addresses); on the CPU (C++ kernels) only the last four have an
    expert, the others are zero rows."""
    R, K, N = 300_000, 7168, 128          # R * K = 2.15e9 > 2**31
    a = torch.zeros(R, K, dtype=torch.float8_e4m3fn, device=device)
    a[-4:] = torch.randn(4, K, device=device).to(torch.float8_e4m3fn)
    a_s = torch.ones(R, K // 128, device=device)
    b, b_s = make_weights(2, N, K, seed=0, device=device)
    m = torch.full((R,), 0 if device == "cuda" else -1, dtype=torch.int32, device=device)
    m[-4:-2] = 0
    m[-2:] = 1
    out = moe_kernels.grouped_gemm_fp8(a, a_s, b, b_s, m, out_dtype=torch.float32)
    want = oracle(a[-4:], a_s[-4:], b, b_s, m[-4:].cpu())
    assert calc_diff(out[-4:], want) < 1e-5
    if device == "cpu":
        assert not out[:-4].any()


@pytest.mark.parametrize("device,backend", with_tma(device_backend_params(BACKENDS)))
@pytest.mark.parametrize("counts,align", [([3, 0, 20, 2], 16), ([1, 1, 1], 1)])
def test_contiguous_nan_in_rows_without_expert(device, backend, counts, align):
    """The Triton kernel reads every row of a tile (rows of other experts and -1 rows too)
    and stores only its expert's: NaN / inf in rows without an expert must not leak into
    any output, and those rows stay exactly zero."""
    m = contiguous_m_indices(counts, align, pad_extra=5).to(device)
    a, a_s = make_rows(m.shape[0], 256, seed=5, device=device)
    pad = (m < 0)
    bits = a.view(torch.uint8).clone()
    bits[pad] = 0x7F                                   # e4m3 NaN
    a = bits.view(torch.float8_e4m3fn)
    a_s = torch.where(pad[:, None], torch.full_like(a_s, float("inf")), a_s)
    b, b_s = make_weights(len(counts), 192, 256, seed=6, device=device)
    out = call_backend(moe_kernels.grouped_gemm_fp8, a, a_s, b, b_s, m, backend=backend)
    assert not out.cpu()[pad.cpu()].float().any(), "-1 rows must be exactly zero"
    keep = ~pad.cpu()
    want = oracle(a, a_s, b, b_s, m.cpu())
    assert calc_diff(out.cpu()[keep], want[keep]) < 1e-5


@pytest.mark.parametrize("device,backend", with_tma(device_backend_params(BACKENDS)))
def test_masked_nan_in_rows_past_masked_m(device, backend):
    """A TMA tile reads whole rows, past masked_m and into the next group: NaN there
    must not reach any output, and those rows are exactly zero (with pointer loads, those
    rows load as 0 with scale 0, so the NaN part bites with TMA tiles)."""
    E, M, N, K = 3, 40, 128, 256
    masked = torch.tensor([5, 0, 40], dtype=torch.int32).to(device)
    a, a_s = make_rows(E * M, K, seed=8, device=device)
    past = (torch.arange(E * M) % M >= masked.cpu().long().repeat_interleave(M)).to(device)
    bits = a.view(torch.uint8).clone()
    bits[past] = 0x7F                                  # e4m3 NaN
    a = bits.view(torch.float8_e4m3fn).view(E, M, K)
    a_s = torch.where(past[:, None], torch.full_like(a_s, float("inf")), a_s).view(E, M, -1)
    b, b_s = make_weights(E, N, K, seed=9, device=device)
    out = call_backend(moe_kernels.grouped_gemm_fp8_masked, a, a_s, b, b_s, masked,
                       backend=backend).reshape(E * M, N).cpu()
    assert not out[past.cpu()].float().any(), "rows >= masked_m must be exactly zero"
    expert_of_row = torch.where(past.cpu(), -1, torch.arange(E * M) // M)
    want = oracle(a.reshape(E * M, K), a_s.reshape(E * M, -1), b, b_s, expert_of_row)
    keep = ~past.cpu()
    assert calc_diff(out[keep], want[keep]) < 1e-5


# One non-finite input each (docs/api.md, "Non-finite inputs"): (what, where). An `a` code
# or scale reaches one row; a weight scale the rows of its expert times its 128-column
# block; a weight code the rows of its expert times its column. inf scales are where the
# backends' forms differ (0 x inf is NaN after dequantizing first, not in the per-block
# promotion), hence "non-finite" rather than NaN or inf.
NON_FINITE = [
    ("a_code", "nan"), ("a_scale", "nan"), ("a_scale", "inf"), ("a_scale", "-inf"),
    ("b_scale", "nan"), ("b_scale", "inf"), ("b_code", "nan"),
]
_E4M3_NAN = 0x7F


def _spoil(a, a_s, b, b_s, what, value, row, expert):
    """Copies of the operands with one value of `what` made non-finite, in `row` of a or
    in `expert`'s weight (block / column 1 of N, K block 0); the (R, N) mask of the
    outputs it reaches, given each row's expert."""
    a, a_s, b, b_s = a.clone(), a_s.clone(), b.clone(), b_s.clone()
    if what == "a_code":
        a.view(torch.uint8).view(-1, a.shape[-1])[row, 3] = _E4M3_NAN
    elif what == "a_scale":
        a_s.view(-1, a_s.shape[-1])[row, 0] = float(value)
    elif what == "b_scale":
        b_s[expert, 1, 0] = float(value)
    else:
        b.view(torch.uint8)[expert, 130, 5] = _E4M3_NAN
    return a, a_s, b, b_s


def _reached(what, R, N, row, expert, expert_of_row):
    mask = torch.zeros(R, N, dtype=torch.bool)
    if what.startswith("a_"):
        mask[row] = True
    else:
        cols = slice(128, 256) if what == "b_scale" else slice(130, 131)
        mask[expert_of_row == expert, cols] = True
    return mask


@pytest.mark.parametrize("device,backend", with_ws(with_tma(device_backend_params(BACKENDS))))
@pytest.mark.parametrize("masked", [False, True], ids=["contiguous", "masked"])
@pytest.mark.parametrize("what,value", NON_FINITE, ids=[f"{w}-{v}" for w, v in NON_FINITE])
def test_non_finite_input_reaches_exactly_its_outputs(device, backend, masked, what, value):
    """A NaN code or a non-finite scale makes non-finite exactly the outputs whose sum
    takes it, on every backend; every other output is the finite one, and rows without an
    expert or past masked_m stay exactly zero. Catches a masked kernel that relies on its
    masked loads to zero the rows past masked_m (their scale of 0 times a NaN / inf weight
    scale is NaN), and an interpreted GEMM that reads NaN codes as 480."""
    E, M, N, K = 3, 6, 200, 256
    if masked:
        counts = torch.tensor([4, 0, 2], dtype=torch.int32)
        slot = torch.arange(E * M) % M
        expert_of_row = torch.where(slot < counts.long().repeat_interleave(M),
                                    torch.arange(E * M) // M, -1)
    else:
        m = contiguous_m_indices([4, 0, 2], 4, pad_extra=2)
        expert_of_row = m.long()
    R = expert_of_row.shape[0]
    a, a_s = make_rows(R, K, seed=11, device=device)
    b, b_s = make_weights(E, N, K, seed=12, device=device)
    row = int((expert_of_row == 2).nonzero()[0])             # a row of expert 2
    bad = _spoil(a, a_s, b, b_s, what, value, row, 2)
    if masked:
        op, last = moe_kernels.grouped_gemm_fp8_masked, counts.to(device)
        bad = (bad[0].view(E, M, K), bad[1].view(E, M, -1), bad[2], bad[3])
    else:
        op, last = moe_kernels.grouped_gemm_fp8, m.to(device)
    out = call_backend(op, *bad, last, out_dtype=torch.float32, backend=backend)
    out = out.reshape(R, N).cpu()
    reached = _reached(what, R, N, row, 2, expert_of_row)
    assert not out[reached].isfinite().any(), "every output the bad value reaches"
    assert out[~reached].isfinite().all(), "no output it does not reach"
    want = oracle(a, a_s, b, b_s, expert_of_row)
    assert calc_diff(out[~reached], want[~reached]) < 1e-5
    assert not out[expert_of_row < 0].any(), "rows without an expert stay exactly zero"


@pytest.mark.parametrize("K,column,want", [
    (336, None, True),      # rows of 336 bytes: 16-byte aligned
    (300, None, False),     # rows of 300 bytes: not
    (336, 8, False),        # a view starting 8 bytes in: base not aligned
    (336, 16, True),        # 16 bytes in: aligned
])
def test_tma_only_where_the_operands_allow_it(K, column, want):
    """The TMA variant falls back to pointer loads, not to an error, where a descriptor
    cannot describe the operands; and never runs where the config does not ask for it."""
    from moe_kernels.triton.grouped_gemm import _operands
    a = torch.zeros(32, K + 16, dtype=torch.float8_e4m3fn)[:, (column or 0):(column or 0) + K]
    b = torch.zeros(2, 64, K, dtype=torch.float8_e4m3fn)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "tma": True}
    assert _operands(cfg, a, b)[2] is want
    assert _operands(dict(cfg, tma=False), a, b)[2] is False
    assert _operands({"BLOCK_M": 16, "BLOCK_N": 64}, a, b)[2] is False


@pytest.mark.skipif(not HAS_SM90, reason="the ws kernels are Gluon for sm_90, which has no "
                    "interpreter")
@pytest.mark.parametrize("kind", ["contiguous", "segments"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_ws_kernel_over_many_k_blocks(kind, out_dtype):
    """The ws kernels' stage ring wraps many times (16 K blocks a pass, 6 or 5 stages;
    contiguous tiles holding two experts take several passes), over tiles of one expert,
    of two, a partial last tile and an empty expert: a phase or stage slip shows as a
    wrong sum. Segments: the align=1 layout of fused_moe_fp8, rows past the last expert
    left unwritten."""
    from moe_kernels.configs import grouped_gemm as configs
    from moe_kernels.triton import grouped_gemm as kernels
    require_ws_probe()
    counts = [130, 0, 257, 3]
    m = contiguous_m_indices(counts, 1, pad_extra=5).cuda()
    K, N = 2048, 384
    a, a_s = make_rows(m.shape[0], K, seed=5, device="cuda")
    b, b_s = make_weights(4, N, K, seed=6, device="cuda")
    assert kernels._ws_ready(a, b), "these operands must run the ws kernel, not the fallback"
    poison_allocator("cuda")
    if kind == "contiguous":
        out = call_backend(moe_kernels.grouped_gemm_fp8, a, a_s, b, b_s, m,
                           out_dtype=out_dtype, backend=WS)
    else:
        c = torch.tensor(counts, dtype=torch.int32, device="cuda")
        offsets = torch.cat([c.new_zeros(1), c.cumsum(0)]).long()
        table = configs.with_ws(configs.table_in_force(a.device))
        out = configs.with_table(table, kernels.grouped_gemm_fp8_segments, a, a_s, b, b_s,
                                 offsets, c, out_dtype)
    rows = (m >= 0).cpu() if kind == "segments" else slice(None)
    want = oracle(a, a_s, b, b_s, m.cpu())
    assert calc_diff(out.cpu()[rows], want[rows]) < 1e-5
    if kind == "contiguous":
        assert not out.cpu()[(m < 0).cpu()].float().any()


def test_ws_only_where_the_operands_allow_it():
    """The warp-specialised kernel reads a and b through 2-D TMA descriptors, b as one
    (E * N, K) matrix: other operands (and the interpreter, and a GPU without wgmma) run
    the bucket's own tile instead of failing."""
    from moe_kernels.triton.grouped_gemm import _ws_operands, _ws_ready
    a = torch.zeros(32, 352, dtype=torch.float8_e4m3fn)
    b = torch.zeros(2, 3, 64, 352, dtype=torch.float8_e4m3fn)
    assert _ws_operands(a[:, :336], b[0, :, :, :336])
    a300 = torch.zeros(32, 300, dtype=torch.float8_e4m3fn)      # rows 300 bytes apart
    assert not _ws_operands(a300, torch.zeros(3, 64, 300, dtype=torch.float8_e4m3fn))
    assert not _ws_operands(a[:, 8:344], b[0, :, :, :336])       # base 8 bytes in
    assert not _ws_operands(a[:, :336], b[:, 0, :, :336])        # experts 3 x 64 rows apart
    assert not _ws_operands(a[:, :336], b[0, :, :32, :336])      # 32 of each expert's 64 rows
    assert _ws_operands(a[:, :336], b[0, :, :, :336].contiguous())
    assert not _ws_ready(a[:, :336], b[0, :, :, :336])           # the CPU has no wgmma


@pytest.mark.parametrize("device,backend", device_backend_params(("triton",)))
@pytest.mark.parametrize("op", ["grouped_gemm_fp8", "grouped_gemm_fp8_masked", "fused_moe_fp8"])
def test_tma_tiles_equal_pointer_tiles_bit_for_bit(device, backend, op):
    """Same tiles, same products in the same order: only how the operands reach shared
    memory differs, so every edge case's output is bit-identical."""
    from moe_kernels import testing
    public = getattr(moe_kernels, op)
    compared = 0
    for case in testing.cases(op, "edge", device=device):
        args, kwargs = testing.run(op, lambda *a, **k: (a, k), case)
        want = public(*args, backend=backend, **kwargs)
        got = call_backend(public, *args, backend=TMA, **kwargs)
        assert got.shape == want.shape and got.dtype == want.dtype, case.name
        assert torch.equal(got.view(torch.int16 if got.element_size() == 2 else torch.int32),
                           want.view(torch.int16 if want.element_size() == 2 else torch.int32)), \
            case.name
        compared += got.numel() > 0
    assert compared >= 4
