"""FP8 quantization: every backend against the reference, and the
reference against the formula written out here.

Scales are compared exactly (the same float32 operations everywhere). FP8 data is
compared bit for bit where every backend rounds the same float32 value, and within one
fp8 step for silu_and_mul_quant (exp differs by an ulp between libraries).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_kernels
from moe_kernels.reference import fp8 as ref

from helpers import (FP8_INPUT_OPCHECKS, assert_close, assert_fp8_close, big_memory_devices,
                     device_backend_params, poison_allocator)

BACKENDS = ("triton", "cpu")
from moe_kernels._common import FP8


def make_x(M, K, dtype, device, seed, *, specials=False):
    """Values over 12 decades (subnormal fp8 after scaling, ties, > 448 after scaling), a
    zero row, and optionally inf / NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-6, 4, K)[torch.randperm(K, generator=g)]
    if M > 2:
        x[1] = 0.0
    if specials and M > 3 and K > 3:
        x[2, 0], x[2, 1], x[3, 2] = float("inf"), float("-inf"), float("nan")
    return x.to(dtype).to(device)


CASES = [  # (M, K): empty (and empty with one group), one row, partial group, several
    (0, 256), (0, 128), (1, 128), (1, 7), (37, 300), (64, 512), (5, 1000),  # groups, K % 128
]


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
@pytest.mark.parametrize("M,K", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ue8m0,column_major", [(False, False), (True, False), (False, True)])
def test_per_token_group_matches_reference(device, backend, M, K, dtype, ue8m0, column_major):
    x = make_x(M, K, dtype, device, seed=M * 7 + K, specials=True)
    poison_allocator(device)
    q, s = moe_kernels.quantize_fp8_per_token_group(x, 128, scale_ue8m0=ue8m0,
                                                    column_major_scales=column_major,
                                                    backend=backend)
    rq, rs = ref.quantize_fp8_per_token_group(x.cpu(), 128, 1e-10, ue8m0, column_major)
    assert s.shape == rs.shape and s.dtype == torch.float32
    # row-major scales keep row-major strides with no rows too (a consumer views their
    # bytes: ep_dispatch's FP8 payload); column-major ones of no rows are any strides
    assert s.stride() == rs.stride() or (s.numel() == 0 and column_major)
    assert torch.equal(s.cpu(), rs), "scales"
    assert_fp8_close(q, rq, msg=f"{backend} {M}x{K}")


@pytest.mark.parametrize("group", [32, 64, 128])
def test_reference_formula(group):
    """The reference against the contract written out directly: scale = max(amax, eps) /
    448, q = fp8(clamp(x / scale)), an all-zero group -> eps / 448 and zeros."""
    x = make_x(9, 3 * group + 5, torch.float32, "cpu", seed=group)
    q, s = ref.quantize_fp8_per_token_group(x, group)
    for g in range(s.shape[1]):
        cols = slice(g * group, (g + 1) * group)
        amax = x[:, cols].abs().amax(dim=1)
        want = torch.clamp(amax, min=1e-10) / 448.0
        assert torch.equal(s[:, g], want)
        expect_q = torch.clamp(x[:, cols] / want[:, None], -448, 448).to(FP8)
        assert torch.equal(q[:, cols].view(torch.uint8), expect_q.view(torch.uint8))
    assert torch.equal(s[1], torch.full_like(s[1], 1e-10 / 448.0))
    assert not q[1].float().any()


def test_round_trip_error_bound():
    """|dequant(q) - x| <= half an fp8 step: 2**-4 relative for normals, 2**-10 * scale
    in the subnormal range (below 2**-6 * scale)."""
    x = make_x(50, 640, torch.float32, "cpu", seed=3)
    q, s = ref.quantize_fp8_per_token_group(x)
    back = ref.dequantize_per_token_group(q, s)
    s_full = s.repeat_interleave(128, dim=1)
    bound = torch.maximum(x.abs() * 2.0 ** -4, s_full * 2.0 ** -10)
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()


def test_ue8m0_scales_are_powers_of_two_covering_amax():
    x = make_x(20, 384, torch.float32, "cpu", seed=5)
    _, s = ref.quantize_fp8_per_token_group(x, scale_ue8m0=True)
    _, s_plain = ref.quantize_fp8_per_token_group(x)
    m, _ = torch.frexp(s)
    assert (m == 0.5).all(), "a power of two"
    assert (s >= s_plain).all() and (s < 2 * s_plain).all(), "the next power up"


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS + ("reference",)))
def test_specials(device, backend):
    """inf saturates to +-448, NaN stays NaN, neither changes its group's scale."""
    x = torch.tensor([[1.0, float("inf"), -float("inf"), float("nan")] + [0.5] * 124],
                     device=device)
    q, s = moe_kernels.quantize_fp8_per_token_group(x, backend=backend)
    assert torch.equal(s.cpu(), torch.tensor([[1.0]]) / 448.0)
    assert q.float()[0, :3].tolist() == [448.0, 448.0, -448.0]
    assert q.float()[0, 3].isnan()


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
@pytest.mark.parametrize("shape", [(128, 128), (200, 300), (3, 130, 260), (1, 1), (2, 0, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_quant_dequant(device, backend, shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    w = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
    poison_allocator(device)
    q, s = moe_kernels.quantize_fp8_block(w, backend=backend)
    rq, rs = ref.quantize_fp8_block(w.cpu())
    assert torch.equal(s.cpu(), rs)
    assert_fp8_close(q, rq, msg=f"{backend} {shape}")
    for out_dtype in (torch.float32, torch.bfloat16):
        d = moe_kernels.dequantize_fp8_block(q, s, dtype=out_dtype, backend=backend)
        assert d.dtype == out_dtype and d.shape == w.shape
        assert torch.equal(d.cpu(), ref.dequantize_fp8_block(rq, rs, dtype=out_dtype))


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_dequant_every_fp8_value(device, backend):
    """All 256 e4m3 bit patterns (subnormals, +-0, NaN) decode as torch decodes them."""
    q = torch.arange(256, dtype=torch.uint8).view(FP8).reshape(2, 128).to(device)
    s = torch.ones(1, 1, device=device)
    d = moe_kernels.dequantize_fp8_block(q, s, dtype=torch.float32, backend=backend).cpu()
    want = q.cpu().float()
    assert torch.equal(d.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(d[ok], want[ok]) and torch.equal(d[ok].signbit(), want[ok].signbit())


def test_block_scale_formula():
    w = torch.randn(2, 256, 384)
    q, s = ref.quantize_fp8_block(w)
    blocks = w.view(2, 2, 128, 3, 128).abs().amax(dim=(2, 4))
    assert torch.equal(s, blocks / 448.0)
    assert torch.equal(q.view(torch.uint8),
                       torch.clamp(w / s.repeat_interleave(128, 1).repeat_interleave(128, 2),
                                   -448, 448).to(FP8).view(torch.uint8))


@pytest.mark.parametrize("shape,layout", [((2, 256, 384), "contiguous"),
                                          ((3, 200, 130), "contiguous"),
                                          ((256, 384), "transposed"),
                                          ((2, 256, 384), "float32 input")])
def test_reference_block_dequant_formula(shape, layout):
    """The reference scales one float32 copy of q in place, block by block: each element
    is q * its block's scale in float32 (the scales expanded to q's shape), on whole and
    partial blocks, strided q; a float32 q passed in is not written."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g)
    q, s = ref.quantize_fp8_block(w)
    if layout == "transposed":
        q = q.t().contiguous().t()
    if layout == "float32 input":
        q = q.float()
    before = q.clone()
    N, K = q.shape[-2:]
    full = s.repeat_interleave(128, -2)[..., :N, :].repeat_interleave(128, -1)[..., :K]
    want = q.float() * full
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(ref.dequantize_fp8_block(q, s, dtype=dtype), want.to(dtype))
    assert torch.equal(q.float(), before.float())


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
@pytest.mark.parametrize("M,N", [(0, 128), (1, 128), (33, 200), (8, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_quant(device, backend, M, N, dtype):
    g = torch.Generator().manual_seed(M + N)
    x = (torch.randn(M, 2 * N, generator=g) * 4).to(dtype).to(device)
    poison_allocator(device)
    q, s = moe_kernels.silu_and_mul_quant_fp8(x, backend=backend)
    xf = x.cpu().float()
    y = xf[:, :N] * torch.sigmoid(xf[:, :N]) * xf[:, N:]     # the contract, written out
    rq, rs = ref.quantize_fp8_per_token_group(y)
    assert_close(s, rs, dtype=torch.float32)
    assert_fp8_close(q, rq, max_steps=1, msg=f"{backend} {M}x{N}")


@pytest.mark.parametrize("device,backend", device_backend_params((*BACKENDS, "reference")))
@pytest.mark.parametrize("M,N", [(6, 384), (1, 200), (0, 128)])
def test_silu_and_mul_quant_masked(device, backend, M, N):
    """masked_m (E,): rows below masked_m[e] are the 2-D op's on the same rows, bit for bit
    (counts 0, partial, M, past M, negative); the others zero (q 0, scale 0), NaN and inf
    in them never read; with zero_fill=False into buffers, those rows keep their bits."""
    E = 5
    g = torch.Generator().manual_seed(M + N)
    x = (torch.randn(E, M, 2 * N, generator=g) * 4).bfloat16()
    masked = torch.tensor([0, min(2, M), M, M + 3, -1], dtype=torch.int32)
    valid = torch.arange(M)[None, :] < masked.long()[:, None]
    x[~valid] = float("nan")
    x[~valid & (torch.arange(M)[None, :] % 2 == 0)] = float("inf")
    x, masked_d = x.to(device), masked.to(device)
    want_q, want_s = moe_kernels.silu_and_mul_quant_fp8(
        x.reshape(E * M, 2 * N).nan_to_num(0.0, 0.0, 0.0), backend=backend)
    want_q = want_q.view(E, M, N).view(torch.uint8).cpu()
    want_s = want_s.view(E, M, (N + 127) // 128).cpu()
    poison_allocator(device)
    q, s = moe_kernels.silu_and_mul_quant_fp8(x, masked_m=masked_d, backend=backend)
    assert q.shape == (E, M, N) and s.shape == (E, M, (N + 127) // 128)
    q8 = q.view(torch.uint8).cpu()
    assert torch.equal(q8[valid], want_q[valid]) and torch.equal(s.cpu()[valid], want_s[valid])
    assert not q8[~valid].any() and not s.cpu()[~valid].any()
    # x as a column slice of a wider buffer (strided groups and rows): the same bits
    wide = torch.cat([x, torch.full_like(x[..., :64], float("nan"))], dim=-1)[..., :2 * N]
    qw, sw = moe_kernels.silu_and_mul_quant_fp8(wide, masked_m=masked_d, backend=backend)
    assert torch.equal(qw.view(torch.uint8), q.view(torch.uint8)) and torch.equal(sw, s)
    qb = torch.full((E, M, N), 0x7F, dtype=torch.uint8).view(FP8).to(device)
    sb = torch.full(s.shape, float("nan")).to(device)
    got = moe_kernels.silu_and_mul_quant_fp8(x, masked_m=masked_d, out=(qb, sb),
                                             zero_fill=False, backend=backend)
    assert got[0] is qb and got[1] is sb
    qb8, sbc = qb.view(torch.uint8).cpu(), sb.cpu()
    assert torch.equal(qb8[valid], want_q[valid]) and torch.equal(sbc[valid], want_s[valid])
    assert (qb8[~valid] == 0x7F).all() and sbc[~valid].isnan().all()


def test_silu_and_mul_quant_masked_refusals():
    x = torch.randn(2, 3, 256)
    mm = torch.tensor([1, 2])
    op = moe_kernels.silu_and_mul_quant_fp8
    with pytest.raises(ValueError, match="zero_fill=False .* needs out="):
        op(x, masked_m=mm, zero_fill=False)
    with pytest.raises(ValueError, match="needs masked_m"):
        op(x[0], zero_fill=False, out=(torch.empty(3, 128, dtype=FP8), torch.empty(3, 1)))
    with pytest.raises(ValueError, match="masked_m must have shape"):
        op(x, masked_m=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="masked_m"):
        op(x, masked_m=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="3-D"):
        op(x[0], masked_m=mm)
    with pytest.raises(TypeError, match="zero_fill must be a bool"):
        op(x, masked_m=mm, zero_fill="false")
    huge = torch.empty(2 ** 15, 2 ** 15 + 1, 2, device="meta")
    with pytest.raises(ValueError, match="exceed"):
        op(huge, masked_m=torch.empty(2 ** 15, dtype=torch.int32, device="meta"))


@settings(max_examples=30)
@given(data=st.data())
@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_property_random(device, backend, data):
    M = data.draw(st.integers(0, 20))
    K = data.draw(st.integers(1, 400))
    group = data.draw(st.sampled_from([16, 64, 128]))
    ue8m0 = data.draw(st.booleans())
    x = make_x(M, K, torch.float32, device, seed=data.draw(st.integers(0, 999)), specials=True)
    q, s = moe_kernels.quantize_fp8_per_token_group(x, group, scale_ue8m0=ue8m0, backend=backend)
    rq, rs = ref.quantize_fp8_per_token_group(x.cpu(), group, 1e-10, ue8m0)
    assert torch.equal(s.cpu(), rs)
    assert_fp8_close(q, rq)


# gather_rows_quant_fp8: fused_moe_fp8's first kernel on Triton at small T, x's rows
# quantized as quantize_fp8_per_token_group does and laid out as permute(align=1) lays
# them. Why each case: no tokens; one token over many experts; a group narrower than 128;
# skipped pairs (-1 ids: padding rows at the layout's end) with ties of ids; every pair on
# one expert; a width that ends in a partial group.
GATHER_CASES = [(0, 256, 2, 4), (1, 128, 8, 16), (1, 7, 1, 1), (37, 300, 4, 5),
                (6, 1000, 3, 7)]


def _gathered_expectation(x, pair_of_row, K):
    """x quantized by the reference, row r from x[pair_of_row[r] // K], zeros (scale 0) for
    padding rows: the contract written out row by row."""
    q, s = ref.quantize_fp8_per_token_group(x.cpu(), 128)
    want_q = torch.zeros((len(pair_of_row), x.shape[1]), dtype=torch.uint8)
    want_s = torch.zeros((len(pair_of_row), s.shape[1]))
    for r, p in enumerate(pair_of_row.tolist()):
        if p >= 0:
            want_q[r], want_s[r] = q[p // K].view(torch.uint8), s[p // K]
    return want_q.view(FP8), want_s


@pytest.mark.parametrize("device,backend", device_backend_params(("triton", "reference")))
@pytest.mark.parametrize("T,H,K,E", GATHER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("routing", ["random", "one_expert"])
def test_gather_rows_quant_matches_quantize_then_gather(device, backend, T, H, K, E, dtype,
                                                       routing):
    from moe_kernels.ops import fp8 as ops
    from moe_kernels.reference import permute as ref_permute
    g = torch.Generator().manual_seed(T * 31 + H)
    # rows with a stride past H: the kernel reads x through its row stride
    x = make_x(T, H + 16, dtype, device, seed=T + H, specials=True)[:, :H]
    ids = (torch.randint(-1, E, (T, K), generator=g) if routing == "random"
           else torch.full((T, K), E - 1)).int()
    index = ref_permute.permute_index(ids, E, 1)
    row_of_pair, pair_of_row = (t.to(device) for t in index[3:5])
    poison_allocator(device)
    q, s = ops.gather_rows_quant_fp8_unchecked(backend, x, pair_of_row, row_of_pair, 128,
                                               1e-10)
    want_q, want_s = _gathered_expectation(x, index[4], K)
    assert torch.equal(s.cpu(), want_s), "scales"
    assert_fp8_close(q.cpu(), want_q, msg=f"{backend} T={T} H={H}")


@pytest.mark.parametrize("device,backend", device_backend_params(("triton",)))
def test_gather_rows_quant_reads_nothing_for_pairs_out_of_range(device, backend):
    """A pair index outside [0, T*K) (not one permute_index makes) is a padding row: zero
    data, scale 0, no read past x."""
    from moe_kernels.ops import fp8 as ops
    x = torch.randn(2, 256, device=device)
    pair_of_row = torch.tensor([3, 4, -7, 2**31 - 1, 0], dtype=torch.int32, device=device)
    row_of_pair = torch.zeros(2, 2, dtype=torch.int32, device=device)
    q, s = ops.gather_rows_quant_fp8_unchecked(backend, x, pair_of_row, row_of_pair, 128, 1e-10)
    want_q, want_s = _gathered_expectation(x, torch.tensor([3, -1, -1, -1, 0]), 2)
    assert torch.equal(s.cpu(), want_s)
    assert_fp8_close(q.cpu(), want_q)


# opcheck's test_schema compares inputs before and after the call with an op PyTorch
# lacks for float8 on the CPU ("mul_cpu_reduced_float"); the other checks run.

@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_opcheck(device, backend):
    sfx = "_triton" if backend == "triton" else ""
    ops = torch.ops.moe_kernels
    x = torch.randn(9, 200, device=device)
    torch.library.opcheck(getattr(ops, "quantize_fp8_per_token_group" + sfx).default,
                          (x, 128, 1e-10, False, True))
    torch.library.opcheck(getattr(ops, "silu_and_mul_quant_fp8" + sfx).default, (x, 64, 1e-10))
    if backend == "triton":   # Triton only: the op itself, no _triton variant
        pair_of_row = torch.tensor([4, -1, 0, 17], dtype=torch.int32, device=device)
        torch.library.opcheck(ops.gather_rows_quant_fp8.default,
                              (x, pair_of_row, torch.zeros(9, 2, dtype=torch.int32,
                                                           device=device), 128, 1e-10))
    w = torch.randn(2, 130, 200, device=device)
    torch.library.opcheck(getattr(ops, "quantize_fp8_block" + sfx).default, (w, 128, 128, 1e-10))
    q, s = ref.quantize_fp8_block(w.cpu())
    torch.library.opcheck(getattr(ops, "dequantize_fp8_block" + sfx).default,
                          (q.to(device), s.to(device), 128, 128, torch.bfloat16),
                          test_utils=FP8_INPUT_OPCHECKS)


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS + ("reference",)))
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    x = torch.randn(11, 256, device=device)

    def f(x):
        q, s = moe_kernels.quantize_fp8_per_token_group(x, column_major_scales=True,
                                                        backend=backend)
        q2, s2 = moe_kernels.silu_and_mul_quant_fp8(x, backend=backend)
        wq, ws = moe_kernels.quantize_fp8_block(x, backend=backend)
        return q, s, q2, s2, moe_kernels.dequantize_fp8_block(wq, ws, backend=backend)

    got = torch.compile(f, fullgraph=True)(x)
    want = f(x)
    for a, b in zip(got, want):
        if a.dtype == FP8:
            assert_fp8_close(a, b)
        else:
            assert torch.equal(a, b) and a.stride() == b.stride()


def _q():
    return ref.quantize_fp8_block(torch.randn(4, 256))


BAD = [
    ("x int", lambda: moe_kernels.quantize_fp8_per_token_group(torch.zeros(2, 8, dtype=torch.int32)),
     TypeError, "x"),
    ("x 3-D", lambda: moe_kernels.quantize_fp8_per_token_group(torch.zeros(2, 2, 8)), ValueError, "x"),
    ("x strided", lambda: moe_kernels.quantize_fp8_per_token_group(torch.zeros(8, 4).t()),
     ValueError, "contiguous"),
    ("group 100", lambda: moe_kernels.quantize_fp8_per_token_group(torch.zeros(2, 8), 100),
     ValueError, "group_size"),
    ("eps 0", lambda: moe_kernels.quantize_fp8_per_token_group(torch.zeros(2, 8), eps=0.0),
     ValueError, "eps"),
    # eps / 448 must be a normal float32: 1e-40 underflows and a zero group's 0 / 0 is NaN
    ("eps underflows", lambda: moe_kernels.quantize_fp8_per_token_group(torch.zeros(2, 8),
                                                                        eps=1e-40),
     ValueError, "eps"),
    ("eps inf", lambda: moe_kernels.quantize_fp8_per_token_group(torch.zeros(2, 8),
                                                                 eps=float("inf")),
     ValueError, "eps"),
    ("eps NaN", lambda: moe_kernels.quantize_fp8_block(torch.zeros(4, 4), eps=float("nan")),
     ValueError, "eps"),
    ("block int", lambda: moe_kernels.quantize_fp8_block(torch.zeros(4, 4), block=128),
     TypeError, "block"),
    ("w 1-D", lambda: moe_kernels.quantize_fp8_block(torch.zeros(4)), ValueError, "w"),
    ("q not fp8", lambda: moe_kernels.dequantize_fp8_block(torch.zeros(4, 256), _q()[1]),
     TypeError, "q"),
    ("s shape", lambda: moe_kernels.dequantize_fp8_block(_q()[0], torch.ones(1, 1)),
     ValueError, "s must have shape"),
    ("dtype int", lambda: moe_kernels.dequantize_fp8_block(*_q(), dtype=torch.int32),
     TypeError, "dtype"),
    ("silu odd", lambda: moe_kernels.silu_and_mul_quant_fp8(torch.zeros(2, 7)), ValueError, "even"),
]


@pytest.mark.parametrize("desc,call,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input(desc, call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.slow
@pytest.mark.parametrize("device", big_memory_devices(7))
@pytest.mark.parametrize("op", ["quantize_fp8_per_token_group", "silu_and_mul_quant_fp8",
                                "quantize_fp8_block", "dequantize_fp8_block"])
def test_int64_addressing(device, op):
    """Inputs of more than 2**31 elements: the last rows must be right (CPU: the C++
    kernels; CUDA: the Triton ones)."""
    M, K = 300_000, 7168                      # 2.15e9 elements
    tail = torch.randn(3, K, generator=torch.Generator().manual_seed(2)).bfloat16()
    if op == "dequantize_fp8_block":
        q_tail, s_tail = ref.quantize_fp8_block(tail[:, :K].float(), 128, 128)
        q = torch.zeros(M, K, dtype=FP8, device=device)
        q[-3:] = q_tail.to(device)
        s = torch.ones(M // 128 + 1, K // 128, device=device)   # 300000 = 2343 * 128 + 96
        s[-1] = s_tail.to(device)
        out = moe_kernels.dequantize_fp8_block(q, s)
        want = ref.dequantize_fp8_block(q_tail, s_tail, 128, 128, torch.bfloat16)
        assert torch.equal(out[-3:].cpu(), want)
        return
    x = torch.zeros(M, K, dtype=torch.bfloat16, device=device)
    x[-3:] = tail.to(device)
    if op == "quantize_fp8_block":
        # the last block row holds rows 299904..299999: three non-zero rows at its end
        q, s = moe_kernels.quantize_fp8_block(x)
        q_ref, s_ref = ref.quantize_fp8_block(x[-96:].cpu().float(), 128, 128)
        assert_fp8_close(q[-96:].cpu(), q_ref)
        assert torch.equal(s[-1].cpu(), s_ref[0])
        return
    fn = getattr(moe_kernels, op)
    q, s = fn(x)
    q_ref, s_ref = getattr(ref, op)(tail)
    assert_fp8_close(q[-3:].cpu(), q_ref)
    assert torch.equal(s[-3:].cpu(), s_ref)
