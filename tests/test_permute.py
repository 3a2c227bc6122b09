"""Token permutation: every backend against the reference.

Index tensors and permuted rows are data movement: compared exactly. Weighted sums use
the float rule of helpers.TOLERANCES for the output dtype.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_kernels
from moe_kernels import BackendUnavailableError, _library
from moe_kernels.reference import permute as ref

from helpers import (DEVICES, HAS_CUDA, assert_close, assert_int_equal, big_memory_devices,
                     device_backend_params, poison_allocator)

BACKENDS = ("triton", "cpu", "cuda")  # cuda: CUDA index + Triton rows
LAYOUT_FIELDS = ("expert_offsets", "tokens_per_expert", "m_indices", "row_of_pair",
                 "pair_of_row")


def make_ids(T, K, E, device, seed, *, skip=0.25, beyond=0.05, one_expert=None):
    """Distinct-in-row random ids with a share of -1 (skipped) and >= E (other rank)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(max(E, K), generator=g)[:K] for _ in range(T)]) \
        if T else torch.zeros(0, K, dtype=torch.int64)
    ids = ids % E if E < K else ids
    if one_expert is not None:
        ids = torch.full((T, K), one_expert, dtype=torch.int64)
    u = torch.rand(T, K, generator=g)
    ids = torch.where(u < skip, -1, ids)
    ids = torch.where((u >= skip) & (u < skip + beyond), E + 3, ids)
    return ids.int().to(device)


def check_permute(backend, device, T, K, E, H, align, dtype, seed, **id_kw):
    ids = make_ids(T, K, E, device, seed, **id_kw)
    g = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(T, H, generator=g).to(dtype).to(device)
    scales = torch.rand(T, 3, generator=g).to(device)
    poison_allocator(device)
    out, layout = moe_kernels.permute(hidden, ids, E, align=align, scales=scales,
                                      backend=backend)
    r_out, r_scales, r_index = ref.permute(hidden.cpu(), ids.cpu(), E, align, scales.cpu())
    msg = f"{backend} T={T} K={K} E={E} align={align}"
    R = T * K + min(E, T * K) * (align - 1)   # at most min(E, T*K) experts are non-empty
    assert out.shape == (R, H) and out.dtype == dtype, msg
    for name, got, want in zip(LAYOUT_FIELDS, layout[:5], r_index):
        assert got.dtype == want.dtype, f"{msg}: {name} dtype"
        assert_int_equal(got.cpu(), want, f"{msg}: {name}")
    assert torch.equal(out.cpu(), r_out), f"{msg}: permuted rows"
    assert torch.equal(layout.scales.cpu(), r_scales), f"{msg}: scales"
    w = torch.rand(T, K, generator=g).to(device)
    y = moe_kernels.unpermute(out, layout, w, backend=backend)
    assert y.shape == (T, H) and y.dtype == dtype
    assert_close(y, ref.unpermute(r_out, r_index[3], w.cpu()), msg=f"{msg}: unpermute")
    return ids, hidden, out, layout, w, y


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
@pytest.mark.parametrize("case", [
    # (T, K, E, H, align, id options)  -- why each is here
    (0, 8, 4, 16, 16, {}),                    # no tokens: only padding rows
    (1, 1, 1, 8, 1, {"skip": 0}),             # T=1, K=1, E=1
    (1, 8, 256, 64, 128, {}),                 # decode, DeepSeek E, big alignment
    (37, 8, 72, 33, 16, {}),                  # odd T, E not a power of two, odd H
    (50, 6, 6, 16, 1, {"skip": 0, "beyond": 0}),  # K = E: every expert in every row
    (40, 4, 9, 24, 4, {"one_expert": 5}),     # all tokens on one expert, others empty
    (64, 8, 16, 40, 1, {"skip": 0.9}),        # mostly skipped: many empty experts
    (33, 2, 5, 8, 3, {"skip": 0, "beyond": 0.5}),  # half the ids belong to another rank
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
def test_permute_matches_reference(device, backend, case, dtype):
    T, K, E, H, align, kw = case
    check_permute(backend, device, T, K, E, H, align, dtype, seed=T * 7 + E, **kw)


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_permute_fp8_rows_and_scales(device, backend):
    """FP8 activations (quantize -> permute in the FP8 MoE) move bit-exactly, with their
    per-128 scales."""
    T, K, E, H = 21, 4, 6, 256
    ids = make_ids(T, K, E, device, seed=8)
    g = torch.Generator().manual_seed(8)
    hidden = (torch.randn(T, H, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = torch.rand(T, H // 128, generator=g)
    out, layout = moe_kernels.permute(hidden.to(device), ids, E, align=16,
                                      scales=scales.to(device), backend=backend)
    want, want_scales, _ = ref.permute(hidden, ids.cpu(), E, 16, scales)
    assert out.dtype == torch.float8_e4m3fn
    assert torch.equal(out.cpu().view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(layout.scales.cpu(), want_scales)


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_row_strided_rows_are_read_in_place(device, backend):
    """FP8 rows and their scales as slices of wider rows (ep_dispatch's payload rows: the
    FP8 bytes, then the scales' bytes): permuted bit for bit as their contiguous copies,
    and without a contiguous copy first (no aten::contiguous or clone in the call)."""
    T, K, E, H, G = 19, 4, 6, 256, 2
    ids = make_ids(T, K, E, device, seed=9)
    g = torch.Generator().manual_seed(9)
    q = (torch.randn(T, H, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(T, G, generator=g)
    payload = torch.cat([q.view(torch.uint8), s.view(torch.uint8)], dim=1).to(device)
    rows, scales = payload[:, :H].view(q.dtype), payload[:, H:].view(torch.float32)
    assert rows.stride(0) == scales.stride(0) * 4 == H + 4 * G    # read in place, or not
    permute = lambda x, sc: moe_kernels.permute(x, ids, E, align=8, scales=sc,
                                                backend=backend)
    want, want_layout = permute(rows.contiguous(), scales.contiguous())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out, layout = permute(rows, scales)
    copies = [e.name for e in prof.events() if e.name in ("aten::contiguous", "aten::clone")]
    assert copies == []
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(layout.scales, want_layout.scales)


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_round_trip_is_weighted_sum(device, backend):
    """unpermute(permute(x)) = sum over routed k of w[t,k] * x[t], computed here directly
    from the ids (an oracle independent of the reference's index code)."""
    T, K, E, H = 29, 6, 10, 20
    ids, hidden, out, layout, w, y = check_permute(backend, device, T, K, E, H, 16,
                                                   torch.float32, seed=5)
    routed = ((ids >= 0) & (ids < E)).float().cpu()
    expect = (w.cpu() * routed).sum(1, keepdim=True) * hidden.cpu()
    torch.testing.assert_close(y.cpu(), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS + ("reference",)))
def test_unpermute_ignores_unreferenced_rows(device, backend):
    """Padding rows and rows of skipped pairs may hold anything (NaN): nothing leaks."""
    T, K, E, H = 12, 4, 6, 16
    ids = make_ids(T, K, E, device, seed=3)
    hidden = torch.randn(T, H, device=device)
    out, layout = moe_kernels.permute(hidden, ids, E, align=8, backend=backend)
    out = torch.where((layout.m_indices >= 0)[:, None], out, float("nan"))
    y = moe_kernels.unpermute(out, layout, torch.rand(T, K, device=device), backend=backend)
    assert not torch.isnan(y).any()


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS + ("reference",)))
def test_unpermute_skips_rows_outside_expert_out(device, backend):
    """A layout row outside [0, R) (a -2, R, or 2^31 - 1 in a hand-made or corrupted
    layout) is a skipped pair on every backend: never read, nothing added. Checking the
    values would need a host sync; a reference indexing such a row raises IndexError where
    the kernels skip it."""
    R, H = 5, 8
    rows = torch.arange(R * H, dtype=torch.float32, device=device).view(R, H)
    row_of_pair = torch.tensor([[1, R], [2**31 - 1, 4], [-2, -1]], dtype=torch.int32,
                               device=device)
    layout = moe_kernels.PermuteLayout(
        expert_offsets=torch.tensor([0, R], device=device),
        tokens_per_expert=torch.tensor([R], dtype=torch.int32, device=device),
        m_indices=torch.zeros(R, dtype=torch.int32, device=device), row_of_pair=row_of_pair,
        pair_of_row=torch.zeros(R, dtype=torch.int32, device=device), scales=None)
    w = torch.tensor([[0.5, 3.0], [7.0, 0.25], [1.0, 1.0]], device=device)
    y = moe_kernels.unpermute(rows, layout, w, backend=backend)
    expect = torch.stack([0.5 * rows[1], 0.25 * rows[4], torch.zeros(H, device=device)])
    assert torch.equal(y, expect), f"{backend}: {y}"


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS + ("reference",)))
def test_moe_align_block_size(device, backend):
    # Hand-worked: pairs 0..5 -> experts [1,0 | 1,-1 | 3,1], E=4, block 4: expert 0 owns
    # rows 0-3 (pair 1), expert 1 rows 4-7 (pairs 0, 2, 5), expert 3 rows 8-11 (pair 4).
    ids = torch.tensor([[1, 0], [1, -1], [3, 1]], dtype=torch.int32, device=device)
    s, e, n = moe_kernels.moe_align_block_size(ids, 4, 4, backend=backend)
    P = 6
    assert s.cpu().tolist() == [1, P, P, P, 0, 2, 5, P, 4] + [P] * 9
    assert e.cpu().tolist() == [0, 1, 3, -1, -1]
    assert n.cpu().tolist() == [12]
    for name, t in (("sorted_token_ids", s), ("expert_ids", e), ("num_tokens_post_padded", n)):
        assert t.dtype == torch.int32, name


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
@pytest.mark.parametrize("T,K,E,bs", [(0, 8, 8, 16), (1, 8, 256, 64), (100, 8, 72, 16),
                                      (300, 6, 160, 128), (64, 1, 3, 1)])
def test_moe_align_block_size_matches_reference(device, backend, T, K, E, bs):
    ids = make_ids(T, K, E, device, seed=T + E)
    got = moe_kernels.moe_align_block_size(ids, E, bs, backend=backend)
    want = ref.moe_align_block_size(ids.cpu(), E, bs)
    for name, a, b in zip(("sorted", "expert_ids", "post_padded"), got, want):
        assert_int_equal(a.cpu(), b, name)
    # vLLM invariant: every real entry of block b is a pair routed to expert_ids[b]
    s, e = got[0].cpu().long(), got[1].cpu().long()
    flat = ids.cpu().reshape(-1).long()
    real = s < T * K
    block_expert = e.repeat_interleave(bs)[: s.numel()]
    assert torch.equal(flat[s[real]], block_expert[real])


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS + ("reference",)))
@pytest.mark.parametrize("T,K,E,M,one_expert", [
    (23, 4, 5, 6, None),    # one chunk of pairs (Triton: one program), some experts overflow M
    (70, 4, 9, 5, None),    # 280 pairs: three chunks, slots continue across chunks
    (40, 4, 7, 24, 3),      # every pair on one expert: 160 pairs, 24 kept, 136 dropped
    (5, 0, 4, 3, None),     # no pair at all (K = 0): every row padding, unpermute gives zeros
])
def test_permute_masked(device, backend, T, K, E, M, one_expert):
    """Direct oracle: expert e's slot j holds the j-th routed pair (in pair order) of e."""
    H = 12
    ids = make_ids(T, K, E, device, seed=11, skip=0.1, one_expert=one_expert)
    hidden = torch.randn(T, H, device=device)
    out, layout = moe_kernels.permute_masked(hidden, ids, E, M, backend=backend)
    assert out.shape == (E, M, H)
    flat = ids.cpu().reshape(-1).tolist()
    for e in range(E):
        pairs = [p for p, x in enumerate(flat) if x == e]
        assert layout.tokens_per_expert[e].item() == len(pairs)
        assert layout.masked_m[e].item() == min(len(pairs), M)
        for j in range(M):
            want = hidden[pairs[j] // K].cpu() if j < len(pairs) else torch.zeros(H)
            assert torch.equal(out[e, j].cpu(), want), (e, j)
        for j, p in enumerate(pairs):
            assert layout.row_of_pair.view(-1)[p].item() == (e * M + j if j < M else -1)
    w = torch.rand(T, K, device=device)
    y = moe_kernels.unpermute(out, layout, w, backend=backend)
    kept = (layout.row_of_pair >= 0).float()
    torch.testing.assert_close(y, (w * kept).sum(1, keepdim=True) * hidden, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS + ("reference",)))
def test_zero_width_rows(device, backend):
    """H = 0 (rows of no element): every layout, out= buffer and gradient keeps its shape,
    on every backend. A flattening reshape(-1, 0) is ambiguous to torch, so none is used."""
    ids = make_ids(3, 2, 4, device, seed=5, skip=0.0, beyond=0.0)
    x = torch.randn(3, 0, device=device, requires_grad=True)
    w = torch.rand(3, 2, device=device, requires_grad=True)
    rows, layout = moe_kernels.permute(x, ids, 4, align=2, backend=backend)
    assert rows.shape == (layout.m_indices.shape[0], 0)
    y = moe_kernels.unpermute(rows, layout, w, backend=backend)
    y.sum().backward()
    assert x.grad.shape == (3, 0) and torch.equal(w.grad, torch.zeros_like(w))
    out = torch.empty(rows.shape, device=device)
    moe_kernels.permute(x.detach(), ids, 4, align=2, out=out, backend=backend)
    masked, mlayout = moe_kernels.permute_masked(x.detach(), ids, 4, 2, backend=backend)
    assert masked.shape == (4, 2, 0)
    moe_kernels.permute_masked(x.detach(), ids, 4, 2, out=torch.empty(4, 2, 0, device=device),
                               backend=backend)
    assert moe_kernels.unpermute(masked, mlayout, w.detach(), backend=backend).shape == (3, 0)


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_gradients(device, backend):
    """permute (hidden) and unpermute (expert_out, weights) against reference autograd."""
    T, K, E, H = 13, 4, 7, 10
    ids = make_ids(T, K, E, device, seed=2)
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(T, H, generator=g).to(device)
    w = torch.rand(T, K, generator=g).to(device)
    probe = torch.randn(T, H, generator=g).to(device)
    grads = []
    for be in (backend, "reference"):
        h = hidden.clone().requires_grad_(True)
        wt = w.clone().requires_grad_(True)
        out, layout = moe_kernels.permute(h, ids, E, align=4, backend=be)
        expert_out = out * 1.5 + 0.25   # some expert function, differentiable
        y = moe_kernels.unpermute(expert_out, layout, wt, backend=be)
        (y * probe).sum().backward()
        grads.append((h.grad, wt.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)


@settings(max_examples=40)
@given(data=st.data())
@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_property_random(device, backend, data):
    interp = backend == "triton" and device == "cpu"
    T = data.draw(st.integers(0, 40 if interp else 300))
    E = data.draw(st.integers(1, 40))
    K = data.draw(st.integers(1, 8))
    H = data.draw(st.integers(1, 40))
    align = data.draw(st.sampled_from([1, 2, 16, 128]))
    skip = data.draw(st.sampled_from([0.0, 0.25, 1.0]))
    one = data.draw(st.one_of(st.none(), st.integers(0, E - 1)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    check_permute(backend, device, T, K, E, H, align, dtype, seed=data.draw(st.integers(0, 999)),
                  skip=skip, one_expert=one)


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_deterministic(device, backend):
    ids = make_ids(200, 8, 32, device, seed=1)
    hidden = torch.randn(200, 64, device=device)
    w = torch.rand(200, 8, device=device)
    runs = []
    for _ in range(2):
        out, layout = moe_kernels.permute(hidden, ids, 32, align=16, backend=backend)
        runs.append((out, *layout[:5], moe_kernels.unpermute(out, layout, w, backend=backend)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS))
def test_opcheck(device, backend):
    index_sfx = "_triton" if backend == "triton" else ""
    rows_sfx = "" if backend == "cpu" else "_triton"   # on the GPU rows move in Triton
    ops = torch.ops.moe_kernels
    ids = make_ids(6, 3, 5, device, seed=4)
    hidden = torch.randn(6, 8, device=device, requires_grad=True)
    index = getattr(ops, "permute_index" + index_sfx)(ids, 5, 4)
    torch.library.opcheck(getattr(ops, "permute_index" + index_sfx).default, (ids, 5, 4))
    torch.library.opcheck(getattr(ops, "moe_align_block_size" + index_sfx).default, (ids, 5, 4))
    torch.library.opcheck(getattr(ops, "gather_rows" + rows_sfx).default,
                          (hidden, index[4], index[3]))
    eo = torch.randn(index[4].shape[0], 8, device=device, requires_grad=True)
    w = torch.rand(6, 3, device=device, requires_grad=True)
    torch.library.opcheck(getattr(ops, "unpermute" + rows_sfx).default, (eo, index[3], w))
    for big in (False, True):   # Triton: one program, and count + scatter over chunks
        ids_m = make_ids(50, 4, 5, device, seed=5) if big else ids
        torch.library.opcheck(getattr(ops, "permute_masked_index" + rows_sfx).default,
                              (ids_m, 5, 3))


@pytest.mark.parametrize("device,backend", device_backend_params(BACKENDS + ("reference",)))
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    ids = make_ids(17, 4, 9, device, seed=6)
    hidden = torch.randn(17, 24, device=device)
    w = torch.rand(17, 4, device=device)

    def moe(x, topk_ids, topk_w):
        out, layout = moe_kernels.permute(x, topk_ids, 9, align=8, backend=backend)
        return moe_kernels.unpermute(out * 2.0, layout, topk_w, backend=backend)

    got = torch.compile(moe, fullgraph=True)(hidden, ids, w)
    assert_close(got, moe(hidden, ids, w))

    def masked(x, topk_ids, topk_w):
        out, layout = moe_kernels.permute_masked(x, topk_ids, 9, 5, backend=backend)
        return moe_kernels.unpermute(out - 1.0, layout, topk_w, backend=backend), layout.masked_m

    got, got_m = torch.compile(masked, fullgraph=True)(hidden, ids, w)
    want, want_m = masked(hidden, ids, w)
    assert_close(got, want)
    assert_int_equal(got_m, want_m)


DEVICE_PARAMS = [pytest.param("cpu"),
                 pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA,
                                                               reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_registered_permute(device):
    """torch.ops.moe_kernels.permute (composite, the device's default backend): the
    reference's layout exactly, the permuted rows and scales, (R, 0) scales when none are
    given, and d hidden equal to autograd through the reference."""
    ids = make_ids(7, 3, 5, device, seed=11)
    hidden = torch.randn(7, 16, device=device, requires_grad=True)
    scales = torch.rand(7, 2, device=device)
    got = torch.ops.moe_kernels.permute(hidden, ids, 5, 4, scales)
    want_out, want_scales, want_index = ref.permute(hidden, ids, 5, 4, scales)
    assert_close(got[0], want_out)
    for g, w in zip(got[1:6], want_index):
        assert_int_equal(g, w)
    assert_close(got[6], want_scales)
    none = torch.ops.moe_kernels.permute(hidden, ids, 5)       # align, scales: defaults
    assert none[6].shape == (none[0].shape[0], 0) and none[0].shape[0] == 7 * 3
    grad = torch.randn_like(got[0])
    (d_got,) = torch.autograd.grad(got[0], hidden, grad)
    (d_want,) = torch.autograd.grad(want_out, hidden, grad)
    assert_close(d_got, d_want)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_registered_permute_masked(device):
    ids = make_ids(9, 2, 4, device, seed=12)
    hidden = torch.randn(9, 8, device=device, requires_grad=True)
    got = torch.ops.moe_kernels.permute_masked(hidden, ids, 4, 3)
    want_out, _, want_index = ref.permute_masked(hidden, ids, 4, 3, None)
    assert_close(got[0], want_out)
    for g, w in zip(got[1:5], want_index):
        assert_int_equal(g, w)
    assert got[5].shape == (4, 3, 0)
    grad = torch.randn_like(got[0])
    (d_got,) = torch.autograd.grad(got[0], hidden, grad)
    (d_want,) = torch.autograd.grad(want_out, hidden, grad)
    assert_close(d_got, d_want)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_registered_composites_opcheck_and_compile(device):
    ids = make_ids(6, 3, 5, device, seed=13)
    hidden = torch.randn(6, 8, device=device, requires_grad=True)
    scales = torch.rand(6, 2, device=device)
    ops = torch.ops.moe_kernels
    torch.library.opcheck(ops.permute.default, (hidden, ids, 5, 4, scales))
    torch.library.opcheck(ops.permute_masked.default, (hidden, ids, 5, 2, None))
    torch._dynamo.reset()
    f = torch.compile(lambda x, i: ops.permute(x, i, 5, 4, None)[0] * 2.0, fullgraph=True)
    assert_close(f(hidden, ids), ref.permute(hidden, ids, 5, 4, None)[0] * 2.0)
    g = torch.compile(lambda x, i: ops.permute_masked(x, i, 5, 2)[:2], fullgraph=True)
    want_out, _, want_index = ref.permute_masked(hidden, ids, 5, 2, None)
    got_out, got_m = g(hidden, ids)
    assert_close(got_out, want_out)
    assert_int_equal(got_m, want_index[0])


def test_registered_permute_checks_its_arguments():
    """Direct torch.ops calls get the public function's errors, not a crash."""
    ids = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="align"):
        torch.ops.moe_kernels.permute(torch.zeros(4, 8), ids, 3, 0, None)
    with pytest.raises(ValueError, match="tokens"):
        torch.ops.moe_kernels.permute_masked(torch.zeros(5, 8), ids, 3, 2, None)



@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not loaded")
def test_registered_masked_index_refuses_more_pairs_than_int32_addresses():
    """A direct call of the masked index's C++ kernel with 2^31 pairs (a stride-0 view: no
    memory) is refused by its check, whose message names the pairs (the masked layout has
    no alignment to name)."""
    ids = torch.zeros(1, 1, dtype=torch.int32).expand(2**31, 1)
    with pytest.raises(ValueError, match="topk_ids has 2147483648 pairs, more than int32"):
        torch.ops.moe_kernels.permute_masked_index(ids, 4, 1)


BAD = [
    ("ids 1-D", lambda d: dict(topk_ids=torch.zeros(4, dtype=torch.int32)), ValueError, "topk_ids"),
    ("ids float", lambda d: dict(topk_ids=torch.zeros(4, 2)), TypeError, "topk_ids"),
    ("T mismatch", lambda d: dict(hidden=torch.zeros(5, 8)), ValueError, "tokens"),
    ("align 0", lambda d: dict(align=0), ValueError, "align"),
    ("E 0", lambda d: dict(num_experts=0), ValueError, "num_experts"),
    ("scales rows", lambda d: dict(scales=torch.zeros(3, 1)), ValueError, "scales"),
    ("hidden 3-D", lambda d: dict(hidden=torch.zeros(4, 2, 2)), ValueError, "hidden"),
    # rows are copied as 1/2/4/8-byte integers: wider elements are refused up front
    ("hidden complex128", lambda d: dict(hidden=torch.zeros(4, 8, dtype=torch.complex128)),
     TypeError, "8 bytes wide"),
    ("cuda backend", lambda d: dict(backend="cuda"), BackendUnavailableError, "cuda"),
]


@pytest.mark.parametrize("desc,make,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_permute(desc, make, exc, words):
    kw = dict(hidden=torch.zeros(4, 8), topk_ids=torch.zeros(4, 2, dtype=torch.int32),
              num_experts=4)
    kw.update(make(None))
    with pytest.raises(exc, match=words):
        moe_kernels.permute(kw.pop("hidden"), kw.pop("topk_ids"), kw.pop("num_experts"), **kw)


def test_bad_input_unpermute_and_align():
    ids = torch.zeros(4, 2, dtype=torch.int32)
    out, layout = moe_kernels.permute(torch.zeros(4, 8), ids, 3)
    with pytest.raises(ValueError, match="topk_weights"):
        moe_kernels.unpermute(out, layout, torch.zeros(4, 3))
    with pytest.raises(TypeError, match="topk_weights"):
        moe_kernels.unpermute(out, layout, torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="layout"):
        moe_kernels.unpermute(out, (1, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="block_size"):
        moe_kernels.moe_align_block_size(ids, 3, 0)
    with pytest.raises(ValueError, match="max_tokens_per_expert"):
        moe_kernels.permute_masked(torch.zeros(4, 8), ids, 3, 0)
    # our TypeError, not the C++ dispatch's "not implemented for 'Long'"
    with pytest.raises(TypeError, match="expert_out"):
        moe_kernels.unpermute(out.long(), layout, torch.zeros(4, 2))


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_unpermute_rows_must_be_the_layouts(backend):
    """A slice of the expert output, or another layout's, would silently drop pairs (or
    index out of range): one ValueError on every backend."""
    if _library.backend_unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(_library.backend_unavailable_reason(backend, torch.device("cpu")))
    ids = torch.tensor([[0, 1], [2, 0], [1, 2]], dtype=torch.int32)
    out, layout = moe_kernels.permute(torch.randn(3, 8), ids, 3, align=2)
    w = torch.rand(3, 2)
    with pytest.raises(ValueError, match="expert_out must have shape"):
        moe_kernels.unpermute(out[:5], layout, w, backend=backend)
    masked, mlayout = moe_kernels.permute_masked(torch.randn(3, 8), ids, 3, 4)
    with pytest.raises(ValueError, match="expert_out must have shape"):
        moe_kernels.unpermute(masked.reshape(4, 3, 8), mlayout, w, backend=backend)   # wrong M
    with pytest.raises(ValueError, match="expert_out must have shape"):
        moe_kernels.unpermute(masked.reshape(12, 8), mlayout, w, backend=backend)     # flattened
    with pytest.raises(ValueError, match="expert_out must have shape"):
        moe_kernels.unpermute(out, mlayout, w, backend=backend)                       # other layout


def _tokens_past_the_cache(K: int, row_bytes: int) -> int:
    """Tokens whose T*K rows of row_bytes outgrow the last-level cache (the CPU kernels'
    measure: _C.last_level_cache_bytes); skips where that would take more than 64 MiB."""
    llc = _library._C.last_level_cache_bytes()
    if llc > 64 << 20:
        pytest.skip(f"the last-level cache ({llc >> 20} MiB) would need an output past 64 MiB")
    return llc // (K * row_bytes) + 1


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not loaded")
@pytest.mark.parametrize("H,out_offset", [(4096, None), (4096, 0), (4096, 1), (4100, None)],
                         ids=["streamed", "streamed-into-out", "out-not-16-byte-aligned",
                              "rows-not-whole-lines"])
def test_cpu_rows_past_the_last_level_cache(H, out_offset):
    """Past the last-level cache, the CPU writes permuted rows with non-temporal stores
    (csrc/cpu/permute.cpp), which need rows of whole 64-byte lines from a 16-byte aligned
    base (out= may start anywhere: a 2-byte offset here; H = 4100 bf16 rows are 8200
    bytes); the other cases copy as below the cache's size. Every row, the padding's zeros
    included, equals the reference, and out= (NaN before the call) is written in place."""
    K, E, align = 8, 16, 16
    T = _tokens_past_the_cache(K, H * 2)
    ids = make_ids(T, K, E, "cpu", seed=T)
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).bfloat16()
    R = T * K + min(E, T * K) * (align - 1)
    assert R * H * 2 > _library._C.last_level_cache_bytes()
    out = None
    if out_offset is not None:
        buf = torch.full((R * H + out_offset,), float("nan"), dtype=torch.bfloat16)
        out = buf[out_offset:].view(R, H)
    got, _ = moe_kernels.permute(hidden, ids, E, align=align, out=out, backend="cpu")
    want, _, _ = ref.permute(hidden, ids, E, align, None)
    assert torch.equal(got, want)
    if out is not None:
        assert got.data_ptr() == out.data_ptr()


@pytest.mark.skipif(not _library.triton_interpreting() and not HAS_CUDA,
                    reason="the triton backend needs a GPU or TRITON_INTERPRET=1")
def test_too_many_experts_for_triton_is_a_value_error():
    ids = torch.zeros(2, 2, dtype=torch.int32, device=DEVICES[-1])
    with pytest.raises(ValueError, match="triton backend takes num_experts"):
        moe_kernels.permute(torch.zeros(2, 4, device=ids.device), ids,
                            _library.TRITON_MAX_EXPERTS + 1, backend="triton")


@pytest.mark.slow
@pytest.mark.parametrize("device", big_memory_devices(6))
def test_int64_addressing(device):
    """R * H beyond 2**31 elements: the last rows must land right, and unpermute must read
    them back from there (CPU: the C++ kernels)."""
    T, K, E, H = 40000, 8, 64, 7168   # R * H = 320000 * 7168 > 2**31
    ids = torch.randint(0, E, (T, K), device=device, dtype=torch.int32)
    hidden = torch.empty(T, H, device=device, dtype=torch.bfloat16)
    hidden[:, :4] = (torch.arange(T, device=device)[:, None] % 256).bfloat16()
    out, layout = moe_kernels.permute(hidden, ids, E)
    last = layout.pair_of_row[-8:].long()
    assert torch.equal(out[-8:, :4].float(), hidden[last // K, :4].float())
    out[:, 4:].zero_()
    weights = torch.zeros(T, K, device=device)
    weights[-1] = 1.0
    back = moe_kernels.unpermute(out, layout, weights)
    assert torch.equal(back[-1, :4].float(), hidden[-1, :4].float() * K)


@pytest.mark.skipif(_library.backend_unavailable_reason("triton", torch.device("cpu")) is not None,
                    reason="the triton backend needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("variant", ["permute_index_triton", "moe_align_block_size_triton"])
def test_triton_index_refuses_zero_alignment_on_direct_calls(variant):
    """The registered Triton index ops skip the public checks: an alignment of 0 would divide
    by zero inside the kernel and write rows anywhere (on the GPU, out of bounds)."""
    ids = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="align"):
        getattr(torch.ops.moe_kernels, variant)(ids, 4, 0)
