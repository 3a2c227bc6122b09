"""Every build of the C++ CPU kernels (csrc/cpu/simd.h: amx, avx512bf16, avx512, avx2,
generic) on this one machine: each is switched in with `_C.set_cpu_isa` and held to the
reference by the same rules as the default build. The op tests run the default (widest)
build only. amx is the avx512 build plus the AMX bf16 tile GEMMs (csrc/cpu/amx.h), and
avx512bf16 the avx512 build with the grouped GEMMs and MLA on AVX512-BF16 dot products
(simd.h, gemm_pairs); a build this CPU lacks skips its cases."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

import moe_kernels
from moe_kernels import _library, testing
from moe_kernels.reference import fp8 as ref_fp8
from moe_kernels.ops import mla as mla_ops
from moe_kernels.reference import mla as ref_mla
from moe_kernels.reference import permute as ref_permute

from helpers import assert_close, assert_fp8_close, calc_diff

pytestmark = pytest.mark.skipif(not _library.extension_loaded(),
                                reason="moe_kernels._C is not loaded")

ISAS = ("amx", "avx512bf16", "avx512", "avx2", "generic")
FP8 = torch.float8_e4m3fn


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":")[1].split()) for line in f
                         if line.startswith("flags")), set())
    except OSError:
        return set()


# What each build needs, in /proc/cpuinfo's names (simd.h): a build this CPU lacks skips.
AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"}
# (VBMI: the FP8 weight decode of amx::pack_weights_vnni, which both bf16 builds run)
NEEDS = {"amx": AVX512 | {"amx_tile", "amx_bf16", "avx512_bf16", "avx512vbmi"},
         "avx512bf16": AVX512 | {"avx512_bf16", "avx512vbmi"}, "avx512": AVX512,
         "avx2": {"avx2", "fma", "f16c"}, "generic": set()}


@pytest.fixture(params=ISAS)
def isa(request):
    missing = NEEDS[request.param] - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {sorted(missing)} for the {request.param} build")
    before = _library._C.cpu_isa()
    _library._C.set_cpu_isa(request.param)
    yield request.param
    _library._C.set_cpu_isa(before)


def test_default_build_is_the_widest_this_cpu_runs():
    widest = next(i for i in ISAS if not NEEDS[i] - _cpu_flags())
    if os.environ.get("MOE_KERNELS_CPU_ISA"):
        pytest.skip("MOE_KERNELS_CPU_ISA chooses the build")
    assert _library._C.cpu_isa() == widest


@pytest.mark.parametrize("name", ["generic", "avx-512"])
def test_environment_choice_not_taken_warns(name):
    """MOE_KERNELS_CPU_ISA naming no build (a typo; a build this CPU lacks takes the same
    path): a RuntimeWarning at import that says which build runs; a build it runs: none.
    A process each (the variable is read at import)."""
    run = subprocess.run([sys.executable, "-c", "import moe_kernels._library as l; "
                          "print(l._C.cpu_isa())"], capture_output=True, text=True,
                         env={**os.environ, "MOE_KERNELS_CPU_ISA": name}, timeout=120)
    assert run.returncode == 0, run.stderr
    taken = run.stdout.split()[-1]
    warned = f"MOE_KERNELS_CPU_ISA={name!r} is not one of" in run.stderr
    assert warned == (taken != name), run.stderr
    if name == "avx-512":
        assert warned and f"the cpu backend runs {taken!r}" in run.stderr


def test_unknown_or_unsupported_build_is_refused():
    with pytest.raises(ValueError, match="cpu isa"):
        _library._C.set_cpu_isa("avx1024")


def test_switch_is_seen(isa):
    assert _library._C.cpu_isa() == isa


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_value_quantizes_as_the_reference(isa, dtype):
    """All 65536 bit patterns (NaN, inf, subnormals, both zeros) in groups of 128: each
    group's scale and every FP8 code equal the reference's."""
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).view(512, 128)
    x = x[torch.randperm(512, generator=torch.Generator().manual_seed(0))].reshape(64, 1024)
    q, s = moe_kernels.quantize_fp8_per_token_group(x, 128, backend="cpu")
    rq, rs = ref_fp8.quantize_fp8_per_token_group(x, 128)
    assert torch.equal(s, rs)
    assert_fp8_close(q, rq, msg=f"{isa} {dtype}")


@pytest.mark.parametrize("ue8m0,column_major", [(False, False), (True, True)])
def test_float32_bit_patterns_quantize_as_the_reference(isa, ue8m0, column_major):
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(-2 ** 31, 2 ** 31, (256, 512), generator=g, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    x[::3] = torch.randn(x[::3].shape, generator=g) * 100   # groups with a usable scale
    kw = dict(scale_ue8m0=ue8m0, column_major_scales=column_major)
    q, s = moe_kernels.quantize_fp8_per_token_group(x, 128, backend="cpu", **kw)
    rq, rs = ref_fp8.quantize_fp8_per_token_group(x, 128, **kw)
    assert torch.equal(s, rs)
    assert_fp8_close(q, rq, msg=isa)


def _midpoint_quotients(amax: float, gen) -> torch.Tensor:
    """(rows, 128) float32 groups whose first value is amax (so the scale is amax / 448)
    and whose others, divided by that scale, land on an e4m3 rounding midpoint (normal
    and subnormal) or within 3 ulp of one, with random signs; +-0 fill the last group."""
    scale = torch.tensor(amax, dtype=torch.float32) / 448
    normal = [(1 + (2 * i + 1) / 16) * 2.0 ** e for e in range(-6, 9) for i in range(8)]
    subnormal = [(2 * i + 1) * 2.0 ** -10 for i in range(8)]
    mids = torch.tensor([m for m in normal + subnormal if m < 448], dtype=torch.float32)
    x = (mids * scale).view(torch.int32)
    x = torch.cat([x + d for d in range(-3, 4)]).view(torch.float32)
    x = x[torch.randperm(x.numel(), generator=gen)]
    x = x * (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1)
    rows = -(-x.numel() // 254) * 2
    rest = torch.zeros(rows * 127)
    rest[:x.numel()] = x
    rest[x.numel() + 1::2] = -0.0       # the sign of zero is kept too
    groups = torch.full((rows, 128), amax, dtype=torch.float32)
    groups[:, 1:] = rest.view(rows, 127)
    return groups


# The vector builds divide a group by its scale through the reciprocal and two FMA
# corrections (simd_kernels.inc quotient): exact only if those corrections are, since
# x * (1 / scale) alone rounds some of these quotients to the other side of a midpoint
# (asserted, so the case cannot pass vacuously).
@pytest.mark.parametrize("amax", [3.7, 1.0e-3, 6.1e4, 0.1, 123.456])
def test_quotients_at_fp8_midpoints_round_as_divided(isa, amax):
    x = _midpoint_quotients(amax, torch.Generator().manual_seed(2)).reshape(-1, 256)
    scale = torch.tensor(amax, dtype=torch.float32) / 448
    divided, by_reciprocal = (x / scale).to(FP8), (x * (1 / scale)).to(FP8)
    assert (divided.view(torch.uint8) != by_reciprocal.view(torch.uint8)).any()
    q, s = moe_kernels.quantize_fp8_per_token_group(x, 128, backend="cpu")
    rq, rs = ref_fp8.quantize_fp8_per_token_group(x, 128)
    assert torch.equal(s, rs) and torch.equal(rs[:, 0], scale.expand(x.shape[0]))
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), isa


# 0.5, an arbitrary scale, a subnormal one (products deep in the subnormals), and scales
# around 2^119, past which the vector builds' fp16-based decode (which scales by sc * 256)
# takes its plain path: bit for bit either way.
@pytest.mark.parametrize("scale", [0.5, 0.37, 2.0 ** -140, 2.0 ** 118, 2.0 ** 121, 3.0e38])
def test_every_fp8_value_dequantizes(isa, scale):
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).view(2, 128)
    s = torch.tensor([[scale]])
    got = moe_kernels.dequantize_fp8_block(q, s, dtype=torch.float32, backend="cpu")
    want = ref_fp8.dequantize_fp8_block(q, s, dtype=torch.float32)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32)), isa


def test_silu_and_mul_quant(isa):
    x = (torch.randn(33, 2 * 512, generator=torch.Generator().manual_seed(2)) * 6).bfloat16()
    x[0, :8] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0, -0.0, 90, -90, 1e-30])
    q, s = moe_kernels.silu_and_mul_quant_fp8(x, backend="cpu")
    rq, rs = ref_fp8.silu_and_mul_quant_fp8(x)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    assert_fp8_close(q, rq, max_steps=1, msg=isa)


@pytest.mark.parametrize("I", [256, 200])
def test_silu_where_exp_needs_2_to_the_128(isa, I):
    """exp(-gate) for gate in [-88.72, -88.38] is finite (up to 3.4e38) but its 2^n is
    2^128, not a float: a 2^n built from its bits is inf there, which makes silu(gate) -0
    and a group of such gates times ups of 3e38 (products ~ -100) all zeros. I = 256: the
    vector rows; I = 200: the scalar loop of other widths."""
    gate = torch.linspace(-88.72283, -88.38, I).expand(3, I)
    x = torch.cat([gate, torch.full((3, I), 3e38)], 1)
    q, s = moe_kernels.silu_and_mul_quant_fp8(x, backend="cpu")
    rq, rs = ref_fp8.silu_and_mul_quant_fp8(x)
    assert rs.min() > 0.1   # the reference's products are ~ -100, not 0
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    assert_fp8_close(q, rq, max_steps=1, msg=isa)


@pytest.mark.parametrize("K", [200, 133])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 40, 70])
def test_gemv_and_gemm_tiles_with_tails(isa, rows, K):
    """1 to 8 rows per expert take the register GEMV (1 to 6 on the avx512bf16 build, whose
    GEMV runs on bf16 dot products: 64 weights per step, so K = 200 and 133 end in a
    partial step with masked loads), more the panel GEMM (9: one partial
    vector of a panel; 40: several; 70: a second panel on AVX-512); K = 200 leaves a
    partial vector and a partial scale block, K = 133 an odd K as well (the bf16 dot
    products of the avx512bf16 build take k in pairs: its last pair holds one value and a
    zero), N = 130 partial blocks and tiles of weight rows (a 48-row block of the panel
    GEMMs across the 128-row scale block)."""
    g = torch.Generator().manual_seed(rows)
    E, N = 3, 130
    b, b_s = ref_fp8.quantize_fp8_block(torch.randn(E, N, K, generator=g) / K ** 0.5)
    a, a_s = ref_fp8.quantize_fp8_per_token_group(torch.randn(E * rows, K, generator=g))
    m = torch.arange(E, dtype=torch.int32).repeat_interleave(rows)
    got = moe_kernels.grouped_gemm_fp8(a, a_s, b, b_s, m, out_dtype=torch.float32, backend="cpu")
    want = moe_kernels.grouped_gemm_fp8(a, a_s, b, b_s, m, out_dtype=torch.float32,
                                        backend="reference")
    assert calc_diff(got, want) < 1e-10, f"{isa}: calc_diff {calc_diff(got, want)}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("H", [1, 7, 16, 72, 200])
def test_unpermute_row_sums_with_tails(isa, dtype, H):
    """The weighted row sum of unpermute runs four vectors of columns at a time, then one,
    then single values: H = 1 and 7 take only the last, 16 a single vector on AVX-512 (four
    on SSE2), 72 and 200 all three. Skipped pairs (-1, and a row past the end) add nothing,
    a row no routed pair names (NaN here) is not read, and a token with no routed pair is
    zeros. Bit for bit the reference's (multiply, then add, in pair order: no FMA on any
    build), and against
    float64 sums of the same values, by the tolerance of the output dtype."""
    g = torch.Generator().manual_seed(H)
    T, K, R = 6, 3, 14
    expert_out = (torch.randn(R, H, generator=g) * 3).to(dtype)
    expert_out[13] = float("nan")                         # a row no routed pair names
    row_of_pair = torch.randint(0, 13, (T, K), generator=g, dtype=torch.int32)
    row_of_pair[1, 0], row_of_pair[2] = -1, -1
    row_of_pair[4, 1] = R                                 # past the end: skipped
    w = torch.rand(T, K, generator=g)
    out = torch.ops.moe_kernels.unpermute(expert_out, row_of_pair, w)
    want = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            r = int(row_of_pair[t, k])
            if 0 <= r < R:
                want[t] += float(w[t, k]) * expert_out[r].double()
    assert_close(out, want.to(torch.float32), dtype=dtype, msg=f"{isa} H={H}")
    assert not out[2].float().any(), "a token without a routed pair"
    ref = ref_permute.unpermute(expert_out, torch.where(row_of_pair < R, row_of_pair, -1), w)
    assert torch.equal(out, ref), f"{isa} H={H}: not the reference's bits"


# big_scale: a weight scale of 2^119, where the vector builds' fp16-based decode takes its
# plain path, and one of 2^118, where it does not
@pytest.mark.parametrize("big_scale", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 8])
def test_every_fp8_weight_code_through_the_gemv(isa, rows, big_scale):
    """1 to 8 rows per expert take the register GEMV, which decodes a 128-wide weight block
    without the NaN select where no byte of it is an FP8 NaN code (1 to 6 on the
    avx512bf16 build, whose GEMV decodes every code by table). Weight row n holds every
    e4m3 code, rotated by n; the NaN codes (0x7F, 0xFF) stay in every 8th row and are zero
    elsewhere, so blocks with and without them meet every code. One-hot activations at k in
    both 128-blocks read single weights out: each output is one decoded code times its two
    scales (powers of two, exact in any order), or NaN for a row holding a NaN code."""
    codes = torch.arange(256)
    n = torch.arange(256)[:, None]
    b = ((codes[None, :] + n) % 256).to(torch.uint8)
    b = torch.where(((b & 0x7F) == 0x7F) & (n % 8 != 7), torch.zeros_like(b), b).view(FP8)
    ks = torch.tensor([0, 127, 128, 200, 255, 1, 64, 129])[:rows]
    a = (torch.nn.functional.one_hot(ks, 256) * 1.0).to(FP8)
    g = torch.Generator().manual_seed(rows)
    a_s = 2.0 ** torch.randint(-3, 4, (rows, 2), generator=g)
    b_s = 2.0 ** torch.randint(-3, 4, (1, 2, 2), generator=g)
    if big_scale:   # 2^119 takes the plain decode, 2^118 not; products stay finite
        a_s.fill_(2.0 ** -3)
        b_s[0, 1, 0] = 2.0 ** 119     # rows 128..255, first K block
        b_s[0, 0, 1] = 2.0 ** 118
    args = (a, a_s, b[None], b_s, torch.zeros(rows, dtype=torch.int32))
    got = moe_kernels.grouped_gemm_fp8(*args, out_dtype=torch.float32, backend="cpu")
    want = moe_kernels.grouped_gemm_fp8(*args, out_dtype=torch.float32, backend="reference")
    assert 0 < want.isnan().float().mean() < 0.5, "the NaN rows are not apart"
    assert torch.equal(got.isnan(), want.isnan()), isa
    assert torch.equal(got.nan_to_num(), want.nan_to_num()), isa


# The ops whose C++ kernels run the vector builds, through moe_kernels.testing's cases and
# rules (edge: named failure modes; random: seeded shapes).
VECTOR_OPS = ("grouped_topk", "quantize_fp8_per_token_group", "silu_and_mul_quant_fp8", "dequantize_fp8_block",
              "grouped_gemm_fp8", "grouped_gemm_fp8_masked", "fused_moe_fp8",
              "mla_decompress_kv", "mla_decompress_kv_paged")


@pytest.mark.parametrize("preset", ["edge", "random"])
@pytest.mark.parametrize("op", VECTOR_OPS)
def test_presets_pass_on_every_build(isa, op, preset):
    report = testing.check(op, functools.partial(getattr(moe_kernels, op), backend="cpu"),
                           preset=preset, raise_on_failure=False)
    assert report.passed, f"{isa}:\n{report.message()}"


# ---- the AMX tile GEMMs (csrc/cpu/amx.h): cases aimed at what the tiles do differently ----
# (on a CPU without AMX the amx cases skip and these hold the vector builds to the same rules)

def test_every_fp8_value_through_the_gemm(isa):
    """All 256 e4m3 codes (subnormals, both zeros, NaN) as activations against one-hot
    weight rows (1.0 at k = n), and as weights against one-hot activations: each output is
    then one decoded code times its scales, so a wrong decode of any code shows exactly
    (the tiles decode FP8 to bf16 by their own bit rules). A NaN code makes its whole row
    NaN (NaN * 0), so only every 8th activation / weight row keeps the NaN codes; the others
    hold zero there. 20 or more rows per expert take the tiles, fewer the GEMV."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    one_hot = (torch.eye(256) * 1.0).to(FP8)
    g = torch.Generator().manual_seed(3)

    def shuffled_codes(n):
        c = codes[torch.stack([torch.randperm(256, generator=g) for _ in range(n)])]
        keep_nan = (torch.arange(n) % 8 == 7)[:, None]
        nan_code = (c & 0x7F) == 0x7F
        return torch.where(nan_code & ~keep_nan, torch.zeros_like(c), c).view(FP8)

    rows = 40
    a_codes, a_hot = shuffled_codes(rows), one_hot[torch.arange(rows) % 256]
    b_codes = shuffled_codes(256)
    # powers of two: every product is exact whatever order a backend applies the scales in
    # (the tiles scale the exact block sum by a_s * b_s, the reference each operand)
    a_s = 2.0 ** torch.randint(-3, 4, (rows, 2), generator=g)
    b_s = 2.0 ** torch.randint(-3, 4, (1, 2, 2), generator=g)
    m = torch.zeros(rows, dtype=torch.int32)
    for a, b in ((a_codes, one_hot), (a_hot, b_codes)):
        args = (a, a_s, b[None], b_s, m)
        got = moe_kernels.grouped_gemm_fp8(*args, out_dtype=torch.float32, backend="cpu")
        want = moe_kernels.grouped_gemm_fp8(*args, out_dtype=torch.float32, backend="reference")
        assert 0 < want.isnan().float().mean() < 0.5, "the NaN rows / columns are not apart"
        assert torch.equal(got.isnan(), want.isnan()), isa
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), isa


@pytest.mark.parametrize("offset", [0, 1])
def test_streamed_and_unaligned_outputs(isa, offset):
    """An output of 1 MB and more is written with streaming stores where its rows are
    64-byte aligned (offset 0), with ordinary stores where they are not (offset 1: an out=
    tensor starting 2 bytes into a line)."""
    g = torch.Generator().manual_seed(4)
    E, rows, N, K = 2, 256, 1024, 256
    a, a_s = ref_fp8.quantize_fp8_per_token_group(torch.randn(E * rows, K, generator=g))
    b, b_s = ref_fp8.quantize_fp8_block(torch.randn(E, N, K, generator=g) / K ** 0.5)
    m = torch.arange(E, dtype=torch.int32).repeat_interleave(rows)
    buf = torch.full((E * rows * N + 2,), float("nan"), dtype=torch.bfloat16)
    out = buf[offset:offset + E * rows * N].view(E * rows, N)
    moe_kernels.grouped_gemm_fp8(a, a_s, b, b_s, m, backend="cpu", out=out)
    want = moe_kernels.grouped_gemm_fp8(a, a_s, b, b_s, m, out_dtype=torch.float32,
                                        backend="reference")
    assert calc_diff(out.float(), want) < 1e-5, isa
    outside = torch.cat([buf[:offset], buf[offset + E * rows * N:]])
    assert outside.isnan().all(), "an element outside out was written"


@pytest.mark.parametrize("weight", ["fp8", "bf16", "fp8 packed", "bf16 packed"])
@pytest.mark.parametrize("paged", [False, True])
def test_mla_tiles(isa, weight, paged):
    """MLA through the tiles: bf16 latent rows (or an fp8 cache with its scale) against
    fp8 or bf16 weights, as stored or packed (pack_kv_b_proj_tiles; the other builds unpack
    it), T = 600 (two token chunks, a partial tile; 1.8 MB of output: streamed), and heads
    whose dn + dv = 96 puts k / v boundaries inside 32-column blocks."""
    g = torch.Generator().manual_seed(5)
    T, H, dn, dv, R, rope = 600, 8, 48, 48, 512, 64
    w32 = torch.randn(H * (dn + dv), R, generator=g) * 0.05
    w, ws = ref_fp8.quantize_fp8_block(w32) if "fp8" in weight else (w32.bfloat16(), None)
    w_in = mla_ops.pack_kv_b_proj_tiles(w) if "packed" in weight else w
    if paged:
        bs, B = 64, 3
        lens = torch.tensor([250, 0, 350], dtype=torch.int32)
        table = torch.randperm(B * 6, generator=g).view(B, 6).int()
        cache = ref_fp8.to_fp8(torch.randn(B * 6, bs, R + rope, generator=g) * 20)
        scale = torch.tensor(0.05)
        k, v = moe_kernels.mla_decompress_kv_paged(cache, table, lens, w_in, num_heads=H,
                                                   qk_nope_head_dim=dn, v_head_dim=dv,
                                                   kv_b_proj_scale=ws, kv_cache_scale=scale,
                                                   num_tokens=T, backend="cpu")
        wk, wv = ref_mla.mla_decompress_kv_paged(cache, table, lens, w, ws, scale, H, dn, dv,
                                                 T, torch.float32)
    else:
        fused = torch.randn(T, R + rope + 8, generator=g).bfloat16()
        kv_c, k_pe = fused[:, :R], fused[:, R:R + rope]
        k, v = moe_kernels.mla_decompress_kv(kv_c, k_pe, w_in, num_heads=H,
                                             qk_nope_head_dim=dn, v_head_dim=dv,
                                             kv_b_proj_scale=ws, backend="cpu")
        wk, wv = ref_mla.mla_decompress_kv(kv_c, k_pe, w, ws, H, dn, dv, torch.float32)
    assert_close(k, wk, dtype=torch.bfloat16, msg=isa)
    assert_close(v, wv, dtype=torch.bfloat16, msg=isa)


@pytest.mark.parametrize("k_dtype,v_dtype", [(torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.bfloat16)])
def test_mla_tiles_outputs_of_two_dtypes(isa, k_dtype, v_dtype):
    """out_k and out_v of different dtypes (allowed: docs/api.md), through the tiles (bf16
    latent rows): each is written in its own dtype, equal bit for bit to a call whose two
    buffers share that dtype. Tiles that wrote out_v in out_k's element size would corrupt
    the heap when out_k is the wider."""
    g = torch.Generator().manual_seed(8)
    T, H, dn, dv, R, rope = 40, 2, 48, 48, 256, 32
    w = (torch.randn(H * (dn + dv), R, generator=g) * 0.05).bfloat16()
    kv_c = torch.randn(T, R, generator=g).bfloat16()
    k_pe = torch.randn(T, rope, generator=g).bfloat16()

    def run(kd, vd):
        out_k = torch.full((T, H, dn + rope), float("nan"), dtype=kd)
        out_v = torch.full((T, H, dv), float("nan"), dtype=vd)
        return moe_kernels.mla_decompress_kv(kv_c, k_pe, w, num_heads=H, qk_nope_head_dim=dn,
                                             v_head_dim=dv, out_k=out_k, out_v=out_v,
                                             backend="cpu")

    k, v = run(k_dtype, v_dtype)
    assert torch.equal(k, run(k_dtype, k_dtype)[0]), isa
    assert torch.equal(v, run(v_dtype, v_dtype)[1]), isa


def _bits(results) -> list:
    """Every tensor of an op's result as raw bytes (floats by bit pattern, NaN == NaN)."""
    if isinstance(results, torch.Tensor):
        return [results.detach().contiguous().view(-1).view(torch.uint8)]
    return [b for r in results for b in _bits(r)] if isinstance(results, (tuple, list)) else []


@pytest.mark.parametrize("op", testing.ops())
def test_results_do_not_depend_on_the_thread_count(op):
    """The C++ kernels split work over threads without changing any sum's order: one
    thread and two give the same bits (docs/api.md, Determinism), on DeepSeek-V3's shapes
    scaled down, drawn cases and the edge cases. The other tests run with one thread under
    `make test` (tests/conftest.py), so this is where the split itself is checked."""
    cases = (testing.cases(op, "deepseek_v3")[:2] + testing.cases(op, "random", seed=3)[:2]
             + testing.cases(op, "edge"))
    fn = lambda *a, **k: getattr(moe_kernels, op)(*a, **k, backend="cpu")
    saved = torch.get_num_threads()
    try:
        for case in cases:
            runs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                runs.append(_bits(testing.run(op, fn, case)))
            assert len(runs[0]) == len(runs[1]) and runs[0], case.name
            for one, two in zip(*runs):
                assert torch.equal(one, two), f"{case.name}: results differ with 2 threads"
    finally:
        torch.set_num_threads(saved)
