"""MLA latent KV decompression: every backend against the float32
reference, and the reference against the formula written out per head and per token here.

Outputs are float32 or bf16: compared by the per-dtype rule of helpers.assert_close. FP8
inputs (weights with 128x128 scales, an fp8 cache with a per-tensor scale) are exact in
every backend's compute dtype, so they need no extra tolerance.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_kernels
from moe_kernels import _library
from moe_kernels.ops import mla as mla_ops
from moe_kernels.reference import fp8 as ref_fp8
from moe_kernels.reference import mla as ref
from moe_kernels.testing import rules

from helpers import (FP8_INPUT_OPCHECKS, HAS_CUDA, assert_close, big_memory_devices,
                     device_backend_params, poison_allocator)

BACKENDS = ("triton", "cpu")
from moe_kernels._common import FP8


def make_weight(H, dn, dv, R, *, fp8, dtype=torch.float32, seed=0, device="cpu"):
    """kv_b_proj (H*(dn+dv), R) in dtype, or fp8 + 128x128 scales quantized from it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(H * (dn + dv), R, generator=g) * 0.05
    if fp8:
        q, s = ref_fp8.quantize_fp8_block(w)
        return q.to(device), s.to(device)
    return w.to(dtype).to(device), None


def make_latent(T, R, rope, dtype, *, seed=0, device="cpu", pad=0):
    """kv_c (T, R), k_pe (T, rope) as column slices of one (T, R + rope + pad) tensor: row
    strides R + rope + pad, as when they come out of a fused kv_a_proj."""
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(T, R + rope + pad, generator=g).to(dtype).to(device)
    return fused[:, :R], fused[:, R:R + rope]


def explicit(kv_c, k_pe, w, w_scale, H, dn, dv):
    """The documented formula (docs/api.md), one head at a time in float64 (independent of the reference)."""
    wf = (ref_fp8.dequantize_fp8_block(w, w_scale, 128, 128, torch.float64)
          if w.dtype == FP8 else w.double())
    c = kv_c.double()
    k, v = [], []
    for h in range(H):
        base = h * (dn + dv)
        k.append(torch.cat([c @ wf[base:base + dn].T, k_pe.double()], dim=1))
        v.append(c @ wf[base + dn:base + dn + dv].T)
    return torch.stack(k, 1), torch.stack(v, 1)


def explicit_paged_rows(cache, block_table, seq_lens, scale=1.0):
    """Latent rows of every token, sequence by sequence, with a Python loop."""
    bs = cache.shape[1]
    rows = [cache[int(block_table[b, p // bs]), p % bs].double() * scale
            for b in range(len(seq_lens)) for p in range(int(seq_lens[b]))]
    return torch.stack(rows) if rows else cache.new_zeros(0, cache.shape[2]).double()


# --- the reference against the formula --------------------------------------------------------

@pytest.mark.parametrize("fp8", [False, True])
def test_reference_formula(fp8):
    H, dn, dv, R, rope = 3, 32, 48, 160, 16
    kv_c, k_pe = make_latent(21, R, rope, torch.float32, seed=1)
    w, s = make_weight(H, dn, dv, R, fp8=fp8, seed=2)
    k, v = ref.mla_decompress_kv(kv_c, k_pe, w, s, H, dn, dv, torch.float32)
    ek, ev = explicit(kv_c, k_pe, w, s, H, dn, dv)
    torch.testing.assert_close(k.double(), ek, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.double(), ev, rtol=1e-5, atol=1e-6)
    assert torch.equal(k[:, :, dn:], k_pe[:, None, :].expand(-1, H, -1)), "k_pe copied as is"


def test_reference_paged_order():
    """Tokens of sequence 0, then 1, ...; a zero-length sequence contributes nothing; rows
    past sum(seq_lens) are zeros."""
    cache = torch.randn(9, 4, 20)
    bt = torch.tensor([[8, 1, 0], [5, 5, 5], [2, 7, 3]], dtype=torch.int32)
    lens = torch.tensor([6, 0, 9], dtype=torch.int32)
    rows = ref.gather_paged_rows(cache, bt, lens, 17, None)
    want = explicit_paged_rows(cache, bt, lens)
    assert torch.equal(rows[:15].double(), want)
    assert not rows[15:].any()


def test_reference_ignores_the_weights_layout():
    """The oracle gives the same bits for a float32 weight repeated with stride 0 and for its
    contiguous copy (torch's float32 matmul sums such a weight in another order: v came out
    1 ulp apart at this shape, H = 1, dn = 1, dv = 3, R = 14, whatever the values)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(10, 15, generator=g)
    w = (torch.randn(4, 14, generator=g) / 14 ** 0.5)[:1].expand(4, 14)
    got = ref.mla_decompress_kv(rows[:, :14], rows[:, 14:], w, None, 1, 1, 3, torch.float32)
    want = ref.mla_decompress_kv(rows[:, :14].contiguous(), rows[:, 14:].contiguous(),
                                 w.contiguous(), None, 1, 1, 3, torch.float32)
    for a, b in zip(got, want):
        assert torch.equal(a, b), (a - b).abs().max()


# --- backends against the reference -----------------------------------------------------------

CONTIGUOUS = [  # (T, H, dn, dv, R, rope)
    (0, 2, 32, 32, 64, 16),        # empty
    (1, 1, 128, 128, 512, 64),     # one token, DeepSeek-V3 head dims
    (37, 3, 32, 16, 64, 16),       # partial token tile
    (70, 4, 24, 40, 160, 24),      # dims not powers of two; R not a multiple of the K chunk
    (9, 16, 16, 16, 128, 8),       # many heads
]


def check_backend(k, v, kv_c, k_pe, w, s, H, dn, dv, dtype):
    """k, v against the float32 reference by the rule of `dtype`; float32 outputs as dot
    products (rules.dot_products: a value cancelled toward 0 keeps its terms' rounding,
    which a hypothesis draw showed 1.2e-6 apart from the reference's at a value of 0.005)."""
    want_k, want_v = ref.mla_decompress_kv(kv_c.cpu(), k_pe.cpu(), w.cpu(),
                                           None if s is None else s.cpu(), H, dn, dv,
                                           torch.float32)
    for name, got, want in (("k", k, want_k), ("v", v, want_v)):
        if dtype == torch.float32:
            verdict = rules.dot_products(name, got.cpu(), want)
            assert verdict.passed, str(verdict)
        else:
            assert_close(got, want, dtype=dtype)


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
@pytest.mark.parametrize("T,H,dn,dv,R,rope", CONTIGUOUS)
@pytest.mark.parametrize("dtype,fp8", [(torch.float32, False), (torch.bfloat16, False),
                                       (torch.bfloat16, True)])
def test_contiguous(device, backend, T, H, dn, dv, R, rope, dtype, fp8):
    kv_c, k_pe = make_latent(T, R, rope, dtype, seed=T + H, device=device, pad=8)
    w, s = make_weight(H, dn, dv, R, fp8=fp8, dtype=dtype, seed=R, device=device)
    poison_allocator(device)
    k, v = moe_kernels.mla_decompress_kv(kv_c, k_pe, w, num_heads=H, qk_nope_head_dim=dn,
                                         v_head_dim=dv, kv_b_proj_scale=s, backend=backend)
    assert k.shape == (T, H, dn + rope) and v.shape == (T, H, dv)
    assert k.dtype == v.dtype == dtype and k.stride(-1) == 1 and v.stride(-1) == 1
    check_backend(k, v, kv_c, k_pe, w, s, H, dn, dv, dtype)
    assert torch.equal(k[:, :, dn:].cpu(), k_pe.cpu()[:, None, :].expand(-1, H, -1))


@pytest.mark.parametrize("device,backend", device_backend_params(("reference",) + BACKENDS))
@pytest.mark.parametrize("spoil", ["scale-nan", "scale-inf", "code-nan"])
def test_non_finite_weight_reaches_exactly_its_outputs(device, backend, spoil):
    """A NaN / inf block scale of the FP8 weight makes non-finite exactly the outputs of
    its 128 weight rows for every token, a NaN weight code those of its row; every other
    output is the finite one (docs/api.md, "Non-finite inputs": NaN or inf, by backend)."""
    H, dn, dv, R, rope, T = 2, 64, 128, 256, 64, 5
    kv_c, k_pe = make_latent(T, R, rope, torch.bfloat16, seed=3, device=device)
    w, s = make_weight(H, dn, dv, R, fp8=True, seed=4, device=device)
    w, s = w.clone(), s.clone()
    if spoil == "code-nan":
        rows = [200]
        w.view(torch.uint8)[200, 9] = 0x7F                       # e4m3 NaN
    else:
        rows = range(128, 256)                                   # scale block row 1
        s[1, 1] = float(spoil.split("-")[1])
    k, v = moe_kernels.mla_decompress_kv(kv_c, k_pe, w, num_heads=H, qk_nope_head_dim=dn,
                                         v_head_dim=dv, kv_b_proj_scale=s, backend=backend)
    reached_k = torch.zeros(T, H, dn + rope, dtype=torch.bool)
    reached_v = torch.zeros(T, H, dv, dtype=torch.bool)
    for row in rows:                          # weight row -> (head, k_nope or v column)
        h, c = divmod(row, dn + dv)
        if c < dn:
            reached_k[:, h, c] = True
        else:
            reached_v[:, h, c - dn] = True
    k, v = k.cpu().float(), v.cpu().float()
    assert reached_k.any() or reached_v.any()
    assert not k[reached_k].isfinite().any() and not v[reached_v].isfinite().any()
    assert k[~reached_k].isfinite().all() and v[~reached_v].isfinite().all()
    clean = make_weight(H, dn, dv, R, fp8=True, seed=4)
    clean_k, clean_v = explicit(kv_c.cpu(), k_pe.cpu(), *clean, H, dn, dv)
    assert_close(k[~reached_k], clean_k[~reached_k].float(), dtype=torch.bfloat16)
    assert_close(v[~reached_v], clean_v[~reached_v].float(), dtype=torch.bfloat16)


@pytest.mark.parametrize("device,backend", device_backend_params(("reference",) + BACKENDS))
def test_out_buffers(device, backend):
    """Caller buffers (strided rows, NaN-filled) are written in full and returned; out_v may
    have another dtype than out_k."""
    T, H, dn, dv, R, rope = 19, 2, 32, 16, 128, 16
    kv_c, k_pe = make_latent(T, R, rope, torch.float32, seed=3, device=device)
    w, s = make_weight(H, dn, dv, R, fp8=True, seed=4, device=device)
    big_k = torch.full((T, H, dn + rope + 5), float("nan"), device=device)
    out_k = big_k[:, :, :dn + rope]
    out_v = torch.full((T, H, dv), float("nan"), dtype=torch.bfloat16, device=device)
    k, v = moe_kernels.mla_decompress_kv(kv_c, k_pe, w, num_heads=H, qk_nope_head_dim=dn,
                                         v_head_dim=dv, kv_b_proj_scale=s, out_k=out_k,
                                         out_v=out_v, backend=backend)
    assert k is out_k and v is out_v
    assert big_k[:, :, dn + rope:].isnan().all(), "wrote outside out_k's view"
    check_backend(k, v.float(), kv_c, k_pe, w, s, H, dn, dv, torch.bfloat16)


@pytest.mark.parametrize("device,backend", device_backend_params(("reference",) + BACKENDS))
def test_out_buffers_whose_elements_share_memory_are_refused(device, backend):
    """An expanded out_k / out_v (stride 0: two values to one place, which torch's copies
    refuse from inside a kernel and the tiles would race on) is refused before any kernel
    runs, naming the buffer; a permuted layout whose elements are apart (heads outermost)
    is taken and written in full."""
    T, H, dn, dv, R, rope = 6, 2, 16, 16, 64, 16
    kv_c, k_pe = make_latent(T, R, rope, torch.bfloat16, seed=5, device=device)
    w, s = make_weight(H, dn, dv, R, fp8=True, seed=6, device=device)
    kw = dict(num_heads=H, qk_nope_head_dim=dn, v_head_dim=dv, kv_b_proj_scale=s,
              backend=backend)
    nan = float("nan")
    good_k = torch.full((T, H, dn + rope), nan, dtype=torch.bfloat16, device=device)
    good_v = torch.full((T, H, dv), nan, dtype=torch.bfloat16, device=device)
    for name, bufs in (("out_k", dict(out_k=good_k[:1].expand(T, H, dn + rope), out_v=good_v)),
                       ("out_v", dict(out_k=good_k, out_v=good_v[:, :1].expand(T, H, dv)))):
        with pytest.raises(ValueError, match=f"{name} has elements that share memory"):
            moe_kernels.mla_decompress_kv(kv_c, k_pe, w, **kw, **bufs)
    out_k = torch.full((H, T, dn + rope), nan, dtype=torch.bfloat16, device=device)
    out_v = torch.full((H, T, dv), nan, dtype=torch.bfloat16, device=device)
    out_k, out_v = out_k.transpose(0, 1), out_v.transpose(0, 1)
    k, v = moe_kernels.mla_decompress_kv(kv_c, k_pe, w, out_k=out_k, out_v=out_v, **kw)
    assert k is out_k and v is out_v
    check_backend(k, v, kv_c, k_pe, w, s, H, dn, dv, torch.bfloat16)


def paged_case(seq_lens, block_size, R, rope, cache_dtype, *, seed, device, spare_blocks=3):
    """A cache with more blocks than needed and a random block table: each sequence's
    blocks are a random subset; unused table entries hold -1 or junk ids."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + spare_blocks
    max_blocks = max(need, default=0) + 2
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.randint(-1, 10**6, (len(seq_lens), max_blocks), generator=g)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n]
        at += n
    cache = torch.randn(num_blocks, block_size, R + rope, generator=g)
    scale = None
    if cache_dtype == FP8:
        scale = 0.37
        cache = ref_fp8.to_fp8(cache / scale)
    else:
        cache = cache.to(cache_dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return cache.to(device), table.int().to(device), lens.to(device), scale


PAGED = [  # (seq_lens, block_size, cache dtype)
    ([5, 0, 33, 17], 16, torch.bfloat16),   # uneven, one empty sequence
    ([70, 3], 64, torch.float32),
    ([1], 16, FP8),
    ([40, 9, 64], 16, FP8),
    ([], 16, torch.bfloat16),              # no sequences
]


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
@pytest.mark.parametrize("seq_lens,block_size,cache_dtype", PAGED)
@pytest.mark.parametrize("fp8_weight", [False, True])
def test_paged(device, backend, seq_lens, block_size, cache_dtype, fp8_weight):
    H, dn, dv, R, rope = 3, 32, 16, 128, 16
    cache, table, lens, scale = paged_case(seq_lens, block_size, R, rope, cache_dtype,
                                           seed=len(seq_lens) + block_size, device=device)
    w_dtype = cache_dtype if cache_dtype != FP8 else torch.bfloat16
    w, s = make_weight(H, dn, dv, R, fp8=fp8_weight, dtype=w_dtype, seed=5, device=device)
    poison_allocator(device)
    k, v = moe_kernels.mla_decompress_kv_paged(cache, table, lens, w, num_heads=H,
                                               qk_nope_head_dim=dn, v_head_dim=dv,
                                               kv_b_proj_scale=s, kv_cache_scale=scale,
                                               backend=backend)
    out_dtype = cache_dtype if cache_dtype != FP8 else w_dtype
    T = sum(seq_lens)
    assert k.shape == (T, H, dn + rope) and k.dtype == v.dtype == out_dtype
    rows = explicit_paged_rows(cache.cpu().float(), table.cpu(), seq_lens,
                               1.0 if scale is None else scale).float()
    check_backend(k, v, rows[:, :R], rows[:, R:], w, s, H, dn, dv, out_dtype)


@pytest.mark.parametrize("device,backend", device_backend_params(("reference",) + BACKENDS))
def test_paged_num_tokens_and_tensor_scale(device, backend):
    """num_tokens above sum(seq_lens) (a CUDA-graph bucket): the extra rows are zeros; the
    cache scale as a 0-dim tensor equals the float."""
    H, dn, dv, R, rope = 2, 16, 16, 64, 16
    cache, table, lens, scale = paged_case([7, 12], 4, R, rope, FP8, seed=9, device=device)
    w, s = make_weight(H, dn, dv, R, fp8=True, seed=6, device=device)
    tensor_scale = torch.tensor(scale, device=device)
    kw = dict(num_heads=H, qk_nope_head_dim=dn, v_head_dim=dv, kv_b_proj_scale=s,
              backend=backend)
    k, v = moe_kernels.mla_decompress_kv_paged(cache, table, lens, w, kv_cache_scale=scale,
                                               **kw)
    k2, v2 = moe_kernels.mla_decompress_kv_paged(cache, table, lens, w, num_tokens=32,
                                                 kv_cache_scale=tensor_scale, **kw)
    assert k2.shape[0] == 32
    assert torch.equal(k2[:19], k) and torch.equal(v2[:19], v)
    assert not k2[19:].cpu().float().any() and not v2[19:].cpu().float().any()


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_paged_unchecked_values_read_nothing_out_of_bounds(device, backend):
    """The registered op called directly (no value checks, as on the CUDA-graph path):
    tokens whose block id is outside [0, num_blocks) or whose position is past the block
    table get zeros; the others are right."""
    H, dn, dv, R, rope, bs = 2, 16, 16, 64, 16, 4
    cache, table, lens, _ = paged_case([8, 6], bs, R, rope, torch.float32, seed=4,
                                       device=device)
    max_blocks = table.shape[1]
    table[0] = torch.arange(max_blocks) % cache.shape[0]
    table[0, 1] = -5                      # tokens 4..7 of sequence 0
    lens[0] = n0 = max_blocks * bs + 7    # its last 7 tokens are past the table (and would
    table[1, 0] = cache.shape[0] + 3      # read row 1's ids); tokens 0..3 of sequence 1
    T = n0 + 6
    w, _ = make_weight(H, dn, dv, R, fp8=False, seed=5, device=device)
    out_k = torch.full((T, H, dn + rope), float("nan"), device=device)
    out_v = torch.full((T, H, dv), float("nan"), device=device)
    op = getattr(torch.ops.moe_kernels,
                 "mla_decompress_kv_paged" + ("_triton" if backend == "triton" else ""))
    op(cache, table, lens, w, None, None, out_k, out_v)
    zero = torch.zeros(T, dtype=torch.bool)
    zero[4:8] = True
    zero[n0 - 7:n0 + 4] = True
    assert not out_k.cpu()[zero].any() and not out_v.cpu()[zero].any()
    rows = []
    for t in torch.nonzero(~zero).flatten().tolist():
        b, p = (0, t) if t < n0 else (1, t - n0)
        rows.append(cache.cpu()[int(table[b, p // bs]), p % bs])
    rows = torch.stack(rows)
    check_backend(out_k.cpu()[~zero], out_v.cpu()[~zero], rows[:, :R], rows[:, R:], w, None,
                  H, dn, dv, torch.float32)


@settings(max_examples=20)
@given(data=st.data())
@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_property_random(device, backend, data):
    H = data.draw(st.integers(1, 16))
    dn = data.draw(st.integers(1, 40))
    dv = data.draw(st.integers(1, 40))
    R = data.draw(st.integers(1, 200))
    rope = data.draw(st.integers(1, 24))
    fp8 = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 99))
    w, s = make_weight(H, dn, dv, R, fp8=fp8, seed=seed, device=device)
    kw = dict(num_heads=H, qk_nope_head_dim=dn, v_head_dim=dv, kv_b_proj_scale=s,
              backend=backend)
    if data.draw(st.booleans()):
        T = data.draw(st.integers(0, 80))
        kv_c, k_pe = make_latent(T, R, rope, torch.float32, seed=seed, device=device)
        k, v = moe_kernels.mla_decompress_kv(kv_c, k_pe, w, **kw)
    else:
        lens = data.draw(st.lists(st.integers(0, 40), max_size=5))
        bs = data.draw(st.sampled_from([1, 4, 16, 64]))
        cache, table, lens_t, _ = paged_case(lens, bs, R, rope, torch.float32, seed=seed,
                                             device=device)
        k, v = moe_kernels.mla_decompress_kv_paged(cache, table, lens_t, w, **kw)
        rows = explicit_paged_rows(cache.cpu(), table.cpu(), lens).float()
        kv_c, k_pe = rows[:, :R], rows[:, R:]
    check_backend(k, v, kv_c, k_pe, w, s, H, dn, dv, torch.float32)


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_deterministic(device, backend):
    kv_c, k_pe = make_latent(50, 192, 32, torch.bfloat16, seed=7, device=device)
    w, s = make_weight(4, 32, 32, 192, fp8=True, seed=8, device=device)
    runs = [moe_kernels.mla_decompress_kv(kv_c, k_pe, w, num_heads=4, qk_nope_head_dim=32,
                                          v_head_dim=32, kv_b_proj_scale=s, backend=backend)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
@pytest.mark.parametrize("fp8", [False, True])
def test_opcheck(device, backend, fp8):
    sfx = "_triton" if backend == "triton" else ""
    ops = torch.ops.moe_kernels
    H, dn, dv, R, rope = 2, 16, 16, 64, 16
    utils = FP8_INPUT_OPCHECKS if fp8 else None   # the CPU has no fp8 arithmetic for the rest
    w, s = make_weight(H, dn, dv, R, fp8=fp8, seed=1, device=device)
    kv_c, k_pe = make_latent(10, R, rope, torch.float32, seed=2, device=device)
    out_k = torch.empty(10, H, dn + rope, device=device)
    out_v = torch.empty(10, H, dv, device=device)
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(getattr(ops, "mla_decompress_kv" + sfx).default,
                          (kv_c, k_pe, w, s, out_k, out_v), **kwargs)
    cache, table, lens, scale = paged_case([6, 3], 4, R, rope, FP8, seed=3, device=device)
    out_k, out_v = out_k[:9], out_v[:9]
    torch.library.opcheck(getattr(ops, "mla_decompress_kv_paged" + sfx).default,
                          (cache, table, lens, w, s, torch.tensor(scale, device=device),
                           out_k, out_v), test_utils=FP8_INPUT_OPCHECKS)


@pytest.mark.parametrize("device,backend", device_backend_params(("reference",) + BACKENDS))
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    H, dn, dv, R, rope = 2, 16, 16, 64, 16
    w, s = make_weight(H, dn, dv, R, fp8=True, seed=1, device=device)
    cache, table, lens, scale = paged_case([6, 3], 4, R, rope, torch.float32, seed=3,
                                           device=device)
    kv = torch.randn(12, R + rope, device=device)
    kw = dict(num_heads=H, qk_nope_head_dim=dn, v_head_dim=dv, kv_b_proj_scale=s,
              backend=backend)

    def f(kv, cache):
        k, v = moe_kernels.mla_decompress_kv(kv[:, :R], kv[:, R:], w, **kw)
        pk, pv = moe_kernels.mla_decompress_kv_paged(cache, table, lens, w, num_tokens=9, **kw)
        return k * 2, v, pk, pv

    got = torch.compile(f, fullgraph=True)(kv, cache)
    want = f(kv, cache)
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)


# --- the packed weight (mla_pack_kv_b_proj) ----------------------------------------------------

needs_ext = pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not loaded")


pack_tiles = mla_ops.pack_kv_b_proj_tiles


@pytest.mark.parametrize("fp8", [False, True])
def test_pack_layout(fp8):
    """The packed form's documented index map, element by element (independent of the
    reference's unpack, which is then checked to invert it)."""
    w, _ = make_weight(2, 24, 8, 64, fp8=fp8, dtype=torch.bfloat16, seed=1)
    packed = pack_tiles(w)
    assert packed.shape == (4, 2, 16, 32) and packed.dtype == torch.bfloat16
    wb = w.to(torch.bfloat16)
    for j in range(4):
        for c in range(2):
            for p in (0, 7, 15):
                for q in (0, 5, 15):
                    for e in (0, 1):
                        assert packed[j, c, p, 2 * q + e] == wb[16 * j + q, 32 * c + 2 * p + e]
    assert torch.equal(ref.unpack_kv_b_proj(packed), wb)


@needs_ext
def test_pack_picks_the_fastest_form():
    """mla_pack_kv_b_proj packs where the cpu backend runs its tile path, and gives the
    weight back where it would only be unpacked per call."""
    w, _ = make_weight(2, 16, 16, 64, fp8=True)
    before = _library._C.cpu_isa()
    try:
        for isa in ("amx", "avx512", "generic"):
            try:
                _library._C.set_cpu_isa(isa)
            except ValueError:
                continue   # this CPU cannot run that build
            got = moe_kernels.mla_pack_kv_b_proj(w)
            if isa == "amx":
                assert torch.equal(got, pack_tiles(w)), isa
            else:
                assert got is w, isa
    finally:
        _library._C.set_cpu_isa(before)


PACKABLE = [c for c in CONTIGUOUS if (c[1] * (c[2] + c[3])) % 32 == 0 and c[4] % 32 == 0]


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("T,H,dn,dv,R,rope", PACKABLE)
@pytest.mark.parametrize("dtype,fp8", [(torch.bfloat16, False), (torch.bfloat16, True),
                                       (torch.float32, True)])
def test_packed_weight(backend, T, H, dn, dv, R, rope, dtype, fp8):
    """The packed weight gives what the checkpoint weight gives, bit for bit (same values,
    same kernel math), and the reference's answer by the float rule; a float32 latent takes
    the float path with it."""
    kv_c, k_pe = make_latent(T, R, rope, dtype, seed=T + 1, pad=8)
    w, s = make_weight(H, dn, dv, R, fp8=fp8, dtype=torch.bfloat16, seed=R + 1)
    kw = dict(num_heads=H, qk_nope_head_dim=dn, v_head_dim=dv, kv_b_proj_scale=s,
              backend=backend)
    poison_allocator("cpu")
    k, v = moe_kernels.mla_decompress_kv(kv_c, k_pe, pack_tiles(w), **kw)
    k0, v0 = moe_kernels.mla_decompress_kv(kv_c, k_pe, w, **kw)
    assert torch.equal(k, k0) and torch.equal(v, v0)
    check_backend(k, v, kv_c, k_pe, w, s, H, dn, dv, dtype)


@needs_ext
@pytest.mark.parametrize("seq_lens,block_size,cache_dtype", PAGED[:4])
def test_packed_weight_paged(seq_lens, block_size, cache_dtype):
    H, dn, dv, R, rope = 2, 48, 16, 128, 16
    cache, table, lens, scale = paged_case(seq_lens, block_size, R, rope, cache_dtype,
                                           seed=len(seq_lens), device="cpu")
    w, s = make_weight(H, dn, dv, R, fp8=True, seed=6)
    kw = dict(num_heads=H, qk_nope_head_dim=dn, v_head_dim=dv, kv_b_proj_scale=s,
              kv_cache_scale=scale, backend="cpu")
    k, v = moe_kernels.mla_decompress_kv_paged(cache, table, lens, pack_tiles(w), **kw)
    k0, v0 = moe_kernels.mla_decompress_kv_paged(cache, table, lens, w, **kw)
    assert torch.equal(k, k0) and torch.equal(v, v0)
    rows = explicit_paged_rows(cache, table, lens, 1.0 if scale is None else scale).float()
    check_backend(k, v, rows[:, :R], rows[:, R:], w, s, H, dn, dv,
                  torch.float32 if cache_dtype == torch.float32 else torch.bfloat16)


@needs_ext
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_packed_weight_property(data):
    """Random packable shapes, fp8 or bf16 weights, contiguous or paged: the packed tiles give
    the checkpoint weight's outputs bit for bit on the cpu backend."""
    H = data.draw(st.integers(1, 6))
    dn = 16 * data.draw(st.integers(1, 6))
    dv = 32 * data.draw(st.integers(1, 4)) - dn % 32   # dn + dv a multiple of 32
    R = 32 * data.draw(st.integers(1, 10))
    rope = data.draw(st.integers(1, 24))
    fp8 = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 99))
    w, s = make_weight(H, dn, dv, R, fp8=fp8, dtype=torch.bfloat16, seed=seed)
    packed = pack_tiles(w)
    kw = dict(num_heads=H, qk_nope_head_dim=dn, v_head_dim=dv, kv_b_proj_scale=s,
              backend="cpu")
    if data.draw(st.booleans()):
        T = data.draw(st.integers(0, 70))
        kv_c, k_pe = make_latent(T, R, rope, torch.bfloat16, seed=seed, pad=data.draw(
            st.integers(0, 8)))
        got = moe_kernels.mla_decompress_kv(kv_c, k_pe, packed, **kw)
        want = moe_kernels.mla_decompress_kv(kv_c, k_pe, w, **kw)
    else:
        lens = data.draw(st.lists(st.integers(0, 40), max_size=4))
        bs = data.draw(st.sampled_from([1, 16, 64]))
        cache, table, lens_t, scale = paged_case(lens, bs, R, rope, FP8, seed=seed,
                                                 device="cpu")
        kw["kv_cache_scale"] = scale
        got = moe_kernels.mla_decompress_kv_paged(cache, table, lens_t, packed, **kw)
        want = moe_kernels.mla_decompress_kv_paged(cache, table, lens_t, w, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_ext
@settings(max_examples=200, deadline=None)
@given(lens=st.lists(st.integers(-2, 40), max_size=5), bs=st.sampled_from([1, 4, 16]),
       width=st.integers(0, 6), num_blocks=st.integers(0, 12), seed=st.integers(0, 99),
       table_dtype=st.sampled_from([torch.int32, torch.int64]),
       lens_dtype=st.sampled_from([torch.int32, torch.int64]), column_major=st.booleans())
def test_paged_value_checks_cpp_and_numpy_agree(lens, bs, width, num_blocks, seed, table_dtype,
                                                lens_dtype, column_major):
    """The paged value checks in C++ (extension loaded) and in numpy (without it) report the
    same first problem, or the same sum(seq_lens), on random tables with bad entries: each
    index dtype read as it is (C++ converts none), a column-major table too."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(-2, num_blocks + 2, (len(lens), width), generator=g).to(table_dtype)
    if column_major:
        table = table.t().contiguous().t()
    seq_lens = torch.tensor(lens, dtype=lens_dtype)
    got = mla_ops._paged_value_problem(table, seq_lens, num_blocks, bs)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_library, "extension_loaded", lambda: False)
        want = mla_ops._paged_value_problem(table, seq_lens, num_blocks, bs)
    assert got == want


@needs_ext
def test_paged_value_checks_refuse_block_size_0():
    """The C++ checks divide by the block size: 0 is reported, not a SIGFPE."""
    table, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    assert tuple(_library._C.mla_paged_values_cpu(table, lens, 1, 0)) == (4, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        mla_ops._check_paged_values("op", table, lens, 1, 0, None)


@pytest.mark.parametrize("cpp", [True, False], ids=["cpp", "numpy"])
@pytest.mark.parametrize("table,lens", [((2, 3), (3,)), ((6,), (2,)), ((2, 3), (2, 1))],
                         ids=["rows", "table 1-D", "lens 2-D"])
def test_paged_value_checks_refuse_other_shapes(cpp, table, lens):
    """Called with shapes the public checks refuse, the value checks report it (kind 5)
    instead of reading past seq_lens or asking a 1-D table for its columns."""
    if cpp and not _library.extension_loaded():
        pytest.skip("the C++ extension is not built")
    table, lens = torch.zeros(table, dtype=torch.int32), torch.ones(lens, dtype=torch.int32)
    with pytest.MonkeyPatch.context() as m:
        if not cpp:
            m.setattr(_library, "extension_loaded", lambda: False)
        assert tuple(mla_ops._paged_value_problem(table, lens, 1, 1)) == (5, 0, 0, 0, 0)
        with pytest.raises(ValueError, match=r"block_table must be \(B, max_blocks\)"):
            mla_ops._check_paged_values("op", table, lens, 1, 1, None)


@needs_ext
def test_packed_weight_opcheck_and_compile():
    """The packed (4-D) weight through the registered ops' checks (schema, fake, autograd
    registration) and a fullgraph torch.compile, equal to eager bit for bit."""
    torch._dynamo.reset()
    H, dn, dv, R, rope = 2, 16, 16, 64, 16
    w, s = make_weight(H, dn, dv, R, fp8=True, seed=1)
    packed = pack_tiles(w)
    kv_c, k_pe = make_latent(10, R, rope, torch.bfloat16, seed=2)
    out_k = torch.empty(10, H, dn + rope, dtype=torch.bfloat16)
    out_v = torch.empty(10, H, dv, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.moe_kernels.mla_decompress_kv.default,
                          (kv_c, k_pe, packed, s, out_k, out_v))
    cache, table, lens, scale = paged_case([6, 3], 4, R, rope, FP8, seed=3, device="cpu")
    torch.library.opcheck(torch.ops.moe_kernels.mla_decompress_kv_paged.default,
                          (cache, table, lens, packed, s, torch.tensor(scale), out_k[:9],
                           out_v[:9]), test_utils=FP8_INPUT_OPCHECKS)
    kw = dict(num_heads=H, qk_nope_head_dim=dn, v_head_dim=dv, kv_b_proj_scale=s,
              backend="cpu")

    def f(kv_c, k_pe):
        k, v = moe_kernels.mla_decompress_kv(kv_c, k_pe, packed, **kw)
        pk, pv = moe_kernels.mla_decompress_kv_paged(cache, table, lens, packed,
                                                     kv_cache_scale=scale, num_tokens=9, **kw)
        return k * 2, v, pk, pv

    got = torch.compile(f, fullgraph=True)(kv_c, k_pe)
    for g_, w_ in zip(got, f(kv_c, k_pe)):
        assert torch.equal(g_, w_)


BAD_PACK = [
    ("rows not a multiple of 32", torch.zeros(48, 64, dtype=torch.bfloat16), ValueError,
     "multiples of 32"),
    ("columns not a multiple of 32", torch.zeros(64, 48, dtype=torch.bfloat16), ValueError,
     "multiples of 32"),
    ("empty", torch.zeros(0, 64, dtype=torch.bfloat16), ValueError, "multiples of 32"),
    ("float32", torch.zeros(64, 64), TypeError, "kv_b_proj must have dtype"),
    ("3-D", torch.zeros(2, 64, 64, dtype=torch.bfloat16), ValueError, "2-D"),
]


@pytest.mark.parametrize("pack", [moe_kernels.mla_pack_kv_b_proj, pack_tiles])
@pytest.mark.parametrize("desc,w,exc,words", BAD_PACK, ids=[b[0] for b in BAD_PACK])
def test_bad_pack(pack, desc, w, exc, words):
    with pytest.raises(exc, match=words):
        pack(w)


_PACKED = pack_tiles(make_weight(2, 16, 16, 64, fp8=False, dtype=torch.bfloat16)[0])
BAD_PACKED = [
    ("packed for other heads", dict(kv_b_proj=_PACKED, num_heads=4), ValueError,
     "packed kv_b_proj"),
    ("packed float32", dict(kv_b_proj=_PACKED.float()), TypeError, "kv_b_proj must have dtype"),
    ("packed not contiguous", dict(kv_b_proj=_PACKED.transpose(2, 3).contiguous().transpose(2, 3)),
     ValueError, "contiguous"),
    ("packed scale shape", dict(kv_b_proj=_PACKED, kv_b_proj_scale=torch.ones(2, 2)),
     ValueError, "kv_b_proj_scale must have shape"),
    ("packed on triton", dict(kv_b_proj=_PACKED, backend="triton"), ValueError,
     "layout of the CPU kernels"),
    ("5-D", dict(kv_b_proj=_PACKED[None]), ValueError, "2-D"),
]


@pytest.mark.parametrize("desc,over,exc,words", BAD_PACKED, ids=[b[0] for b in BAD_PACKED])
def test_bad_packed_weight(desc, over, exc, words):
    with pytest.raises(exc, match=words):
        moe_kernels.mla_decompress_kv(**_contiguous_args(**over))


def test_bad_packed_weight_paged():
    kw = _paged_args(kv_b_proj=_PACKED, backend="triton")
    with pytest.raises(ValueError, match="layout of the CPU kernels"):
        moe_kernels.mla_decompress_kv_paged(**kw)


@needs_ext
def test_packed_weight_direct_op_calls():
    """Direct torch.ops calls: the Triton kernel refuses a packed weight, the C++ one a
    4-D weight of the wrong shape, each with a ValueError (no crash, no garbage)."""
    kv_c, k_pe = make_latent(4, 64, 16, torch.bfloat16)
    out_k, out_v = torch.empty(4, 2, 32, dtype=torch.bfloat16), torch.empty(4, 2, 16,
                                                                             dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="packed kv_b_proj"):
        torch.ops.moe_kernels.mla_decompress_kv_triton(kv_c, k_pe, _PACKED, None, out_k, out_v)
    with pytest.raises(ValueError, match="packed kv_b_proj must be contiguous"):
        torch.ops.moe_kernels.mla_decompress_kv(kv_c, k_pe, _PACKED[:, :, :8], None, out_k,
                                                out_v)
    with pytest.raises(ValueError, match="kv_b_proj has 64 rows"):
        torch.ops.moe_kernels.mla_decompress_kv(kv_c, k_pe, _PACKED, None, out_k[:, :1],
                                                out_v[:, :1])


# --- bad input --------------------------------------------------------------------------------

def _contiguous_args(**over):
    kv_c, k_pe = make_latent(4, 64, 16, torch.float32)
    w, _ = make_weight(2, 16, 16, 64, fp8=False)
    kw = dict(kv_c=kv_c, k_pe=k_pe, kv_b_proj=w, num_heads=2, qk_nope_head_dim=16,
              v_head_dim=16)
    kw.update(over)
    return kw


_FP8_W = make_weight(2, 16, 16, 64, fp8=True)

BAD = [
    ("kv_c int", dict(kv_c=torch.zeros(4, 64, dtype=torch.int32)), TypeError, "kv_c"),
    ("kv_c 3-D", dict(kv_c=torch.zeros(4, 1, 64)), ValueError, "kv_c must be 2-D"),
    ("k_pe rows", dict(k_pe=torch.zeros(5, 16)), ValueError, "k_pe must have shape"),
    ("weight rows", dict(num_heads=3), ValueError, "kv_b_proj must have shape"),
    ("weight cols", dict(kv_b_proj=torch.zeros(64, 32)), ValueError, "kv_b_proj must have"),
    ("weight dtype", dict(kv_b_proj=torch.zeros(64, 64, dtype=torch.bfloat16)), TypeError,
     "one dtype"),
    ("fp8 without scale", dict(kv_b_proj=_FP8_W[0]), ValueError, "kv_b_proj_scale"),
    ("scale shape", dict(kv_b_proj=_FP8_W[0], kv_b_proj_scale=torch.ones(2, 2)), ValueError,
     "kv_b_proj_scale must have shape"),
    ("scale for bf16", dict(kv_b_proj_scale=torch.ones(1, 1)), ValueError, "only for an fp8"),
    ("heads 0", dict(num_heads=0), ValueError, "num_heads"),
    ("latent width 0", dict(kv_c=torch.zeros(4, 0), kv_b_proj=torch.zeros(64, 0)), ValueError,
     "latent width R"),
    ("dn float", dict(qk_nope_head_dim=16.0), TypeError, "qk_nope_head_dim"),
    ("column stride", dict(kv_c=torch.zeros(64, 4).t()), ValueError, "contiguous last"),
    ("out_k shape", dict(out_k=torch.zeros(4, 2, 16)), ValueError, "out_k must have shape"),
    ("out_v dtype", dict(out_v=torch.zeros(4, 2, 16, dtype=torch.int32)), TypeError, "out_v"),
]


@pytest.mark.parametrize("desc,over,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input(desc, over, exc, words):
    with pytest.raises(exc, match=words):
        moe_kernels.mla_decompress_kv(**_contiguous_args(**over))


# Beyond BAD: invalid calls whose only fault is one the common-case predicate must see.
_NEAR_MISSES = BAD + [
    ("heads bool", dict(num_heads=True), None, None),
    ("k_pe rope 0", dict(k_pe=torch.zeros(4, 0)), None, None),
    ("k_pe on meta", dict(k_pe=torch.zeros(4, 16, device="meta")), None, None),
    ("weight on meta", dict(kv_b_proj=torch.zeros(64, 64, device="meta")), None, None),
    ("weight column-major", dict(kv_b_proj=torch.zeros(64, 64).t()), None, None),
    ("fp8 scale float64", dict(kv_b_proj=_FP8_W[0], kv_b_proj_scale=_FP8_W[1].double()),
     None, None),
    ("fp8 scale on meta", dict(kv_b_proj=_FP8_W[0], kv_b_proj_scale=_FP8_W[1].to("meta")),
     None, None),
    ("fp8 scale a list", dict(kv_b_proj=_FP8_W[0], kv_b_proj_scale=[1.0]), None, None),
]


def _predicate_args(kw):
    return (kw["kv_c"], kw["k_pe"], kw["kv_b_proj"], kw.get("kv_b_proj_scale"),
            kw["num_heads"], kw["qk_nope_head_dim"], kw["v_head_dim"])


@pytest.mark.parametrize("desc,over", [b[:2] for b in _NEAR_MISSES],
                         ids=[b[0] for b in _NEAR_MISSES])
def test_common_case_predicate_refuses_every_invalid_call(desc, over):
    """mla_decompress_kv skips its checks when there are no out buffers and _plain_call
    holds: every invalid call must fail that test (and so meet the checks)."""
    kw = _contiguous_args(**over)
    with pytest.raises((TypeError, ValueError)):
        mla_ops._check_args(*_predicate_args(kw), kw.get("out_k"), kw.get("out_v"))
    assert not (kw.get("out_k") is None and kw.get("out_v") is None
                and mla_ops._plain_call(*_predicate_args(kw)))


@pytest.mark.parametrize("fp8", [False, True])
def test_common_case_predicate_takes_the_common_call(fp8):
    """The plain call (a bf16 / fp32 weight, or fp8 with its scales) takes the short path."""
    kw = _contiguous_args(**(dict(kv_b_proj=_FP8_W[0], kv_b_proj_scale=_FP8_W[1]) if fp8
                             else {}))
    assert mla_ops._plain_call(*_predicate_args(kw))
    mla_ops._check_args(*_predicate_args(kw), None, None)


def _paged_args(**over):
    cache, table, lens, _ = paged_case([5, 9], 4, 64, 16, torch.float32, seed=0, device="cpu")
    w, _ = make_weight(2, 16, 16, 64, fp8=False)
    kw = dict(kv_cache=cache, block_table=table, seq_lens=lens, kv_b_proj=w, num_heads=2,
              qk_nope_head_dim=16, v_head_dim=16)
    kw.update(over)
    return kw


BAD_PAGED = [
    ("table too short", lambda kw: dict(block_table=kw["block_table"][:, :2]), ValueError,
     "too short for sequence 1"),
    ("block id out of range", lambda kw: dict(block_table=torch.full_like(kw["block_table"], 99)),
     ValueError, r"block_table\[0, 0\] = 99"),
    ("negative length", lambda kw: dict(seq_lens=torch.tensor([5, -1], dtype=torch.int32)),
     ValueError, "seq_lens must be >= 0"),
    ("lens count", lambda kw: dict(seq_lens=torch.tensor([5], dtype=torch.int32)), ValueError,
     "sequences"),
    ("lens float", lambda kw: dict(seq_lens=torch.tensor([5.0, 9.0])), TypeError, "seq_lens"),
    ("cache too narrow", lambda kw: dict(kv_cache=kw["kv_cache"][..., :64]), ValueError,
     "must hold the latent"),
    ("scale for float cache", lambda kw: dict(kv_cache_scale=0.5), ValueError,
     "fp8 kv_cache only"),
    ("num_tokens too small", lambda kw: dict(num_tokens=13), ValueError, "less than"),
    ("num_tokens vs out_k", lambda kw: dict(num_tokens=20, out_k=torch.zeros(14, 2, 32)),
     ValueError, "num_tokens"),
    ("cache int", lambda kw: dict(kv_cache=kw["kv_cache"].int()), TypeError, "kv_cache"),
]


@pytest.mark.parametrize("desc,over,exc,words", BAD_PAGED, ids=[b[0] for b in BAD_PAGED])
def test_bad_input_paged(desc, over, exc, words):
    kw = _paged_args()
    with pytest.raises(exc, match=words):
        moe_kernels.mla_decompress_kv_paged(**{**kw, **over(kw)})


# Invalid paged calls whose fault _check_paged_args finds (the metadata of BAD_PAGED and
# more): the common-case predicate must refuse each, so that each meets the checks.
_PAGED_W_FP8 = make_weight(2, 16, 16, 64, fp8=True)
_PAGED_NEAR_MISSES = [b[:2] for b in BAD_PAGED if b[0] in (
    "lens count", "lens float", "cache too narrow", "cache int")] + [
    ("heads bool", lambda kw: dict(num_heads=True)),
    ("dv 0", lambda kw: dict(v_head_dim=0)),
    ("num_tokens negative", lambda kw: dict(num_tokens=-1)),
    ("num_tokens bool", lambda kw: dict(num_tokens=True)),
    ("num_tokens float", lambda kw: dict(num_tokens=14.0)),
    ("cache block_size 0", lambda kw: dict(kv_cache=kw["kv_cache"][:, :0])),
    ("cache 2-D", lambda kw: dict(kv_cache=kw["kv_cache"][0])),
    ("cache last dim strided",
     lambda kw: dict(kv_cache=kw["kv_cache"].transpose(1, 2).contiguous().transpose(1, 2))),
    ("cache exactly the latent", lambda kw: dict(kv_cache=kw["kv_cache"][..., :64])),
    ("table int16", lambda kw: dict(block_table=kw["block_table"].short())),
    ("table 1-D", lambda kw: dict(block_table=kw["block_table"][0])),
    ("lens 2-D", lambda kw: dict(seq_lens=kw["seq_lens"][None])),
    ("table on meta", lambda kw: dict(block_table=kw["block_table"].to("meta"))),
    ("lens on meta", lambda kw: dict(seq_lens=kw["seq_lens"].to("meta"))),
    ("weight on meta", lambda kw: dict(kv_b_proj=kw["kv_b_proj"].to("meta"))),
    ("weight rows", lambda kw: dict(num_heads=3)),
    ("weight column-major", lambda kw: dict(kv_b_proj=kw["kv_b_proj"].t().contiguous().t())),
    ("weight 3-D", lambda kw: dict(kv_b_proj=kw["kv_b_proj"][None])),
    ("weight int", lambda kw: dict(kv_b_proj=kw["kv_b_proj"].int())),
    ("weight bf16, cache float32",
     lambda kw: dict(kv_b_proj=kw["kv_b_proj"].bfloat16())),
    ("scale for bf16 weight", lambda kw: dict(kv_b_proj_scale=torch.ones(1, 1))),
    ("fp8 without scale", lambda kw: dict(kv_b_proj=_PAGED_W_FP8[0])),
    ("fp8 scale shape", lambda kw: dict(kv_b_proj=_PAGED_W_FP8[0],
                                        kv_b_proj_scale=torch.ones(2, 2))),
    ("fp8 scale float64", lambda kw: dict(kv_b_proj=_PAGED_W_FP8[0],
                                          kv_b_proj_scale=_PAGED_W_FP8[1].double())),
    ("fp8 scale on meta", lambda kw: dict(kv_b_proj=_PAGED_W_FP8[0],
                                          kv_b_proj_scale=_PAGED_W_FP8[1].to("meta"))),
    ("fp8 scale a list", lambda kw: dict(kv_b_proj=_PAGED_W_FP8[0], kv_b_proj_scale=[1.0])),
    ("weight packed", lambda kw: dict(kv_b_proj=_PACKED)),
    ("latent width 0", lambda kw: dict(kv_b_proj=kw["kv_b_proj"][:, :0])),
]


def _paged_predicate_args(kw):
    return (kw["kv_cache"], kw["block_table"], kw["seq_lens"], kw["kv_b_proj"],
            kw.get("kv_b_proj_scale"), kw["num_heads"], kw["qk_nope_head_dim"],
            kw["v_head_dim"], kw.get("num_tokens"))


@pytest.mark.parametrize("desc,over", _PAGED_NEAR_MISSES, ids=[b[0] for b in _PAGED_NEAR_MISSES])
def test_paged_common_case_predicate_refuses_every_invalid_call(desc, over):
    """mla_decompress_kv_paged skips _check_paged_args when there are no out buffers and
    _plain_paged_call holds: each of these calls fails the checks, so it must fail the
    predicate too (a packed weight is valid but not the common call)."""
    kw = _paged_args()
    kw.update(over(kw))
    if desc != "weight packed":
        with pytest.raises((TypeError, ValueError)):
            mla_ops._check_paged_args(*_paged_predicate_args(kw))
    assert not mla_ops._plain_paged_call(*_paged_predicate_args(kw))


@pytest.mark.parametrize("variant", ["float32", "fp8 cache, bf16 weight", "fp8 weight",
                                     "num_tokens given"])
def test_paged_common_case_predicate_takes_the_common_call(variant):
    """The plain paged calls take the short path, and the full checks agree they are
    valid."""
    kw = _paged_args()
    if variant == "fp8 cache, bf16 weight":
        kw.update(kv_cache=kw["kv_cache"].to(FP8),
                  kv_b_proj=make_weight(2, 16, 16, 64, fp8=False, dtype=torch.bfloat16)[0])
    elif variant == "fp8 weight":
        kw.update(kv_b_proj=_PAGED_W_FP8[0], kv_b_proj_scale=_PAGED_W_FP8[1])
    elif variant == "num_tokens given":
        kw.update(num_tokens=20)
    assert mla_ops._plain_paged_call(*_paged_predicate_args(kw))
    mla_ops._check_paged_args(*_paged_predicate_args(kw))


def test_bad_fp8_cache_scale():
    cache, table, lens, _ = paged_case([5], 4, 64, 16, FP8, seed=0, device="cpu")
    w, _ = make_weight(2, 16, 16, 64, fp8=False, dtype=torch.bfloat16)
    kw = dict(num_heads=2, qk_nope_head_dim=16, v_head_dim=16)
    with pytest.raises(ValueError, match="one value"):
        moe_kernels.mla_decompress_kv_paged(cache, table, lens, w, kv_cache_scale=torch.ones(2),
                                            **kw)
    with pytest.raises(TypeError, match="kv_cache_scale"):
        moe_kernels.mla_decompress_kv_paged(cache, table, lens, w, kv_cache_scale="1", **kw)


# --- GPU only ---------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    """Given num_tokens, the paged call syncs nothing: capture, then replay on new data."""
    H, dn, dv, R, rope = 4, 128, 128, 512, 64
    cache, table, lens, scale = paged_case([100, 33], 16, R, rope, FP8, seed=1, device="cuda")
    w, s = make_weight(H, dn, dv, R, fp8=True, seed=2, device="cuda")
    scale_t = torch.tensor(scale, device="cuda")
    out_k = torch.empty(160, H, dn + rope, dtype=torch.bfloat16, device="cuda")
    out_v = torch.empty(160, H, dv, dtype=torch.bfloat16, device="cuda")
    kw = dict(num_heads=H, kv_b_proj_scale=s, kv_cache_scale=scale_t, out_k=out_k, out_v=out_v)
    moe_kernels.mla_decompress_kv_paged(cache, table, lens, w, **kw)   # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_kernels.mla_decompress_kv_paged(cache, table, lens, w, **kw)
    cache.copy_((torch.randn(cache.shape, device="cuda") * 2).to(FP8))
    graph.replay()
    want_k, want_v = moe_kernels.mla_decompress_kv_paged(cache, table, lens, w, num_heads=H,
                                                         kv_b_proj_scale=s,
                                                         kv_cache_scale=scale_t,
                                                         num_tokens=160)
    assert torch.equal(out_k, want_k) and torch.equal(out_v, want_v)


@pytest.mark.slow
@pytest.mark.parametrize("device", big_memory_devices(8))
def test_int64_addressing(device):
    """T * H * (dn + rope) beyond 2**31 elements: the last tokens must be right."""
    T, H, R, rope = 90_000, 128, 512, 64      # k: 90000 * 128 * 192 = 2.2e9 elements
    kv_c, k_pe = make_latent(T, R, rope, torch.bfloat16, seed=3, device=device)
    w, s = make_weight(H, 128, 128, R, fp8=True, seed=4, device=device)
    k, v = moe_kernels.mla_decompress_kv(kv_c, k_pe, w, num_heads=H, kv_b_proj_scale=s)
    check_backend(k[-3:], v[-3:], kv_c[-3:], k_pe[-3:], w, s, H, 128, 128, torch.bfloat16)
