"""grouped_topk: every backend against the float32 reference.

Float32 scores computed by different exp implementations can differ in the last ulp, so
two experts (or two groups' top-two sums) of different inputs that the reference scores
within 1e-5 of each other may swap. `assert_same_selection` accepts exactly those swaps
(moe_kernels.testing.gating.acceptable_rows): candidates of equal inputs (exact ties:
integer logits, NaN/inf rows) score the same on every backend and must follow the
lower-index rule; the weights are checked against the reference's for the chosen ids.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_kernels
from moe_kernels import BackendUnavailableError, _library
from moe_kernels.reference import gating as ref
from moe_kernels.testing.gating import acceptable_rows

from helpers import (DEVICES, HAS_CUDA, assert_close, assert_int_equal, big_memory_devices,
                     device_backend_params, poison_allocator)

KERNEL_BACKENDS = ("triton", "cpu", "cuda")

# name: (E, G, topk_group, top_k, scoring, bias, group_scoring, renormalize, scale)
CONFIGS = {
    "deepseek_v3": (256, 8, 4, 8, "sigmoid", True, "top2_sum", True, 2.5),
    "deepseek_v2": (160, 8, 3, 6, "softmax", False, "max", False, 16.0),
    "kimi_k2": (384, 1, 1, 8, "sigmoid", True, "top2_sum", True, 2.827),
    "e72_g8": (72, 8, 3, 5, "sigmoid", True, "top2_sum", True, 1.0),   # group of 9
    "e512_g8": (512, 8, 2, 8, "softmax", True, "top2_sum", True, 1.0),
    "e8_g2": (8, 2, 1, 4, "sigmoid", False, "max", True, 1.0),        # K = all kept experts
    "g_eq_e": (64, 64, 5, 5, "sigmoid", True, "max", True, 1.0),      # groups of one expert
}


def make_inputs(T, E, dtype, device, bias, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, E, generator=g) * scale).to(dtype).to(device)
    b = (torch.randn(E, generator=g) * 0.1).to(device) if bias else None
    return logits, b


def run(backend, logits, top_k, cfg_kwargs):
    """backend: a backend's name, or a callable with grouped_topk's signature (the emulated
    CUDA kernel of test_cuda_emulated.py, which runs these tests' bodies too)."""
    if callable(backend):
        return backend(logits, top_k, **cfg_kwargs)
    poison_allocator(logits.device.type)
    return moe_kernels.grouped_topk(logits, top_k, backend=backend, **cfg_kwargs)


def kwargs_of(E, G, tg, K, scoring, bias, group_scoring, renorm, scale):
    return dict(num_expert_group=G, topk_group=tg, scoring_func=scoring,
                correction_bias=bias, group_scoring=group_scoring, renormalize=renorm,
                routed_scaling_factor=scale)


def assert_same_selection(w, ids, logits, top_k, kw, *, msg=""):
    """Checks (w, ids) of a backend against the reference for the same inputs: each row
    the reference's choice, or one that only orders near-tied candidates of different
    inputs the other way (moe_kernels.testing.gating.acceptable_rows), with the weights
    the reference gives the chosen ids."""
    T, E = logits.shape
    assert w.dtype == torch.float32 and ids.dtype == torch.int32, msg
    assert w.shape == (T, top_k) and ids.shape == (T, top_k), msg
    ids, w = ids.cpu(), w.cpu()
    assert ((ids >= 0) & (ids < E)).all(), f"{msg}: id out of range"
    if T:
        srt = ids.sort(dim=1).values
        assert (srt[:, 1:] != srt[:, :-1]).all(), f"{msg}: repeated id in a row"
    ok = acceptable_rows(ids, logits, top_k, **kw)
    if not bool(ok.all()):
        t = int((~ok).nonzero()[0])
        _, want = ref.select_experts(logits.cpu(), top_k, kw["num_expert_group"],
                                     kw["topk_group"], kw["scoring_func"],
                                     None if kw["correction_bias"] is None
                                     else kw["correction_bias"].cpu(),
                                     kw["group_scoring"] or ("top2_sum" if kw["correction_bias"]
                                                             is not None else "max"))
        raise AssertionError(f"{msg}: {int((~ok).sum())} of {T} rows chose otherwise, first "
                             f"row {t}: {ids[t].tolist()}, expected {want[t].tolist()}")
    s = ref.scores(ref.clean_logits(logits.cpu()), kw["scoring_func"])
    w_ref = ref.weights_of(s, ids, kw["renormalize"], kw["routed_scaling_factor"])
    assert_close(w, w_ref, dtype=torch.float32, msg=f"{msg}: weights")


@pytest.mark.parametrize("device,backend", device_backend_params(KERNEL_BACKENDS))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
def test_matches_reference(device, backend, config, dtype):
    E, G, tg, K, scoring, bias, gsc, renorm, scale = CONFIGS[config]
    # T=0 and T=1 (decode), 37 (odd: partial tiles of every row-blocking), 300 (several
    # programs / blocks; fewer rows under the interpreter, which runs in numpy).
    sizes = (0, 1, 37) if backend == "triton" and device == "cpu" else (0, 1, 37, 300, 4099)
    for T in sizes:
        logits, b = make_inputs(T, E, dtype, device, bias, seed=T * 31 + E)
        kw = kwargs_of(E, G, tg, K, scoring, b, gsc, renorm, scale)
        w, ids = run(backend, logits, K, kw)
        assert w.device == logits.device
        assert_same_selection(w, ids, logits, K, kw, msg=f"{backend} {config} T={T}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("config", ["deepseek_v3", "e72_g8", "e8_g2"])
def test_shared_expert_column(device, backend, config):
    """shared_expert_id: the same routed columns (bit for bit: the column is written beside
    them, nothing else changes), then one column of that id with weight 1.0 on every row.
    T=0, decode, a partial program of rows, and (where rows are cheap) 520 rows, which the
    Triton kernel takes several to a program; ids E (DeepSeek-V3's stacked shared expert)
    and far past E."""
    E, G, tg, K, scoring, bias, gsc, renorm, scale = CONFIGS[config]
    sizes = (0, 1, 37) if backend == "triton" and device == "cpu" and E > 64 else (0, 1, 37, 520)
    for T, shared in zip(sizes, (E, E + 1000, 2**31 - 1, E)):
        logits, b = make_inputs(T, E, torch.bfloat16, device, bias, seed=T + 5)
        kw = kwargs_of(E, G, tg, K, scoring, b, gsc, renorm, scale)
        w_plain, ids_plain = run(backend, logits, K, kw)
        w, ids = run(backend, logits, K, dict(kw, shared_expert_id=shared))
        msg = f"{backend} {config} T={T} shared={shared}"
        assert w.shape == ids.shape == (T, K + 1) and w.is_contiguous() and ids.is_contiguous()
        assert torch.equal(w[:, :K], w_plain) and torch.equal(ids[:, :K], ids_plain), msg
        assert (ids[:, K] == shared).all() and (w[:, K] == 1.0).all(), msg


BAD_SHARED = [(3, ValueError, "shared_expert_id must be >= 16"),
              (-1, ValueError, "shared_expert_id must be >= 16"),
              (2**31, ValueError, "shared_expert_id must be <= 2147483647"),
              (True, TypeError, "shared_expert_id must be an int"),
              (16.0, TypeError, "shared_expert_id must be an int")]


@pytest.mark.parametrize("shared,exc,words", BAD_SHARED, ids=[str(b[0]) for b in BAD_SHARED])
def test_bad_shared_expert_id(shared, exc, words):
    """An id the routed experts use (or no int) would make a routed expert run twice."""
    with pytest.raises(exc, match=words):
        moe_kernels.grouped_topk(torch.zeros(2, 16), 2, shared_expert_id=shared)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_shared_expert_column_has_no_gradient(backend):
    """The gradient w.r.t. logits is the routed weights' alone, whatever flows into the
    shared column's weight (a constant 1)."""
    if _library.backend_unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(_library.backend_unavailable_reason(backend, torch.device("cpu")))
    logits, b = make_inputs(5, 32, torch.float32, "cpu", True, seed=4)
    kw = dict(num_expert_group=4, topk_group=2, correction_bias=b, routed_scaling_factor=2.5,
              backend=backend)
    grad_out = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    x1 = logits.clone().requires_grad_(True)
    w, _ = moe_kernels.grouped_topk(x1, 4, shared_expert_id=32, **kw)
    (w * grad_out).sum().backward()
    x2 = logits.clone().requires_grad_(True)
    w, _ = moe_kernels.grouped_topk(x2, 4, **kw)
    (w * grad_out[:, :4]).sum().backward()
    assert torch.equal(x1.grad, x2.grad) and x1.grad.abs().sum() > 0


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("config", ["deepseek_v3", "deepseek_v2", "e72_g8", "g_eq_e"])
def test_exact_ties(device, backend, config):
    """Integer logits and biases give many exactly equal scores and group scores: every
    tie must go to the lower index, so ids equal the reference's exactly."""
    E, G, tg, K, scoring, bias, gsc, renorm, scale = CONFIGS[config]
    g = torch.Generator().manual_seed(7)
    logits = torch.randint(-2, 3, (23, E), generator=g).float().to(device)
    logits[0] = 0.0                      # everything tied: groups 0.. and experts 0.. win
    b = (torch.randint(-1, 2, (E,), generator=g).float() * 0.5).to(device) if bias else None
    kw = kwargs_of(E, G, tg, K, scoring, b, gsc, renorm, scale)
    w, ids = run(backend, logits, K, kw)
    assert_same_selection(w, ids, logits, K, kw, msg=f"{backend} {config}")
    if b is None:
        # Hand-computed: an all-zero row ties everywhere, so the first topk_group groups are
        # kept and the first K experts of them chosen, in index order.
        assert ids[0].tolist() == list(range(K))


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_equal_logits_tie_at_every_position(device, backend, scoring):
    """Equal logits must give equal scores wherever they sit in the row, so the tie goes
    to the lower index. Rows of a larger first logit (the softmax's maximum) and one value
    everywhere else, E = 2..40: experts past the last full vector of a row (a loop's
    epilogue) once scored an ulp off the others (E = 12, softmax: expert 11 before 2)."""
    first, rest = torch.tensor([1.8125, 2.5, 0.75, 3.0]), torch.tensor([-1.9296875, 0.3, -2.75,
                                                                      -0.0625])
    for E in range(2, 41):
        K = (E + 1) // 2
        logits = rest[:, None].expand(4, E).clone()
        logits[:, 0] = first
        w, ids = run(backend, logits.to(device), K, dict(scoring_func=scoring))
        want = torch.arange(K, dtype=torch.int32).expand(4, K)
        assert torch.equal(ids.cpu(), want), f"E={E}: {ids.tolist()}"
        assert (w[:, 1:] == w[:, 1:2]).all(), f"E={E}: unequal weights {w.tolist()}"


@pytest.mark.parametrize("device,backend", device_backend_params(["triton"]))
@pytest.mark.parametrize("config", ["deepseek_v3", "e72_g8", "kimi_k2", "deepseek_v2"])
def test_triton_choice_forms_agree(device, backend, config):
    """The Triton kernel chooses by two int32 reductions (image, then index) or by one
    over int64 keys, by launch shape (triton/gating.py `_keys32`): both forms give the
    reference's ids exactly on exact ties, and the same weights bit for bit."""
    from moe_kernels.triton import gating as triton_gating
    E, G, tg, K, scoring, bias, gsc, renorm, scale = CONFIGS[config]
    g = torch.Generator().manual_seed(11)
    logits = torch.randint(-2, 3, (9, E), generator=g).float().to(device)
    logits[0] = 0.0
    b = (torch.randint(-1, 2, (E,), generator=g).float() * 0.5).to(device) if bias else None
    kw = kwargs_of(E, G, tg, K, scoring, b, gsc, renorm, scale)
    got = {}
    for keys32 in (True, False):
        got[keys32] = triton_gating.grouped_topk(logits, b, K, G, tg, scoring, gsc, renorm,
                                                 scale, config=(4, 1, keys32))
        assert_same_selection(*got[keys32], logits, K, kw,
                              msg=f"{config} keys32={keys32}")
    assert torch.equal(got[True][0], got[False][0]) and torch.equal(got[True][1], got[False][1])


def test_reference_hand_example():
    """A worked example, computed by hand (not by any code here): E=8, G=4 groups of 2,
    2 groups kept, top 3, 'max' group score, sigmoid of logits chosen so that sigmoid
    order = logit order."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 1.0, -2.0, 2.0, 3.0, -1.0]])
    # group maxima: g0=3 (e1), g1=1, g2=2, g3=3 (e6) -> keep g0 and g3 (tie at 3: both kept)
    # candidates e0=0, e1=3, e6=3, e7=-1 -> order e1 (tie with e6, lower index), e6, e0
    w, ids = ref.grouped_topk(logits, None, 3, 4, 2, "sigmoid", "max", False, 1.0)
    assert ids.tolist() == [[1, 6, 0]]
    expect = torch.sigmoid(torch.tensor([3.0, 3.0, 0.0]))
    torch.testing.assert_close(w[0], expect)


def naive_grouped_topk(b_row, E, G, tg, K, group_scoring):
    """Pure-Python selection from float32 selection scores: the reference's oracle. The
    top-2 sum is rounded to float32 like the spec's math (sigmoid(-1) + sigmoid(1) is
    exactly 1.0 in float32 on some CPUs: a tie a float64 sum would miss)."""
    gs = E // G
    def gscore(g):
        vals = sorted(b_row[g * gs:(g + 1) * gs], reverse=True)
        v = float(np.float32(vals[0]) + np.float32(vals[1])) if group_scoring == "top2_sum" else vals[0]
        return float("-inf") if v != v else v
    groups = sorted(range(G), key=lambda g: (-gscore(g), g))[:tg]
    cand = [e for g in groups for e in range(g * gs, (g + 1) * gs)]
    return sorted(cand, key=lambda e: (-b_row[e], e))[:K]


@settings(max_examples=300)
@given(data=st.data())
def test_reference_matches_naive_oracle(data):
    G = data.draw(st.sampled_from([1, 2, 3, 4]))
    gs = data.draw(st.integers(2, 6))
    E = G * gs
    tg = data.draw(st.integers(1, G))
    K = data.draw(st.integers(1, tg * gs))
    group_scoring = data.draw(st.sampled_from(["top2_sum", "max"]))
    vals = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0, float("inf"), float("-inf"), float("nan")])
    logits = torch.tensor([data.draw(st.lists(vals, min_size=E, max_size=E)) for _ in range(3)])
    _, ids = ref.select_experts(logits, K, G, tg, "sigmoid", None, group_scoring)
    b = torch.sigmoid(torch.where(torch.isnan(logits), float("-inf"), logits))
    for t in range(3):
        assert ids[t].tolist() == naive_grouped_topk(b[t].tolist(), E, G, tg, K, group_scoring)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_nan_inf_rows(device, backend, scoring):
    """NaN counts as -inf; ids stay valid and distinct, weights never NaN."""
    E, G, tg, K = 16, 4, 2, 4
    nan, inf = float("nan"), float("inf")
    rows = [[nan] * E, [inf] * E, [-inf] * E,
            [nan, inf, -inf, 1.0] * 4, [inf, -inf] * 8, [0.0] * 15 + [nan]]
    logits = torch.tensor(rows, device=device)
    for renorm in (True, False):
        kw = kwargs_of(E, G, tg, K, scoring, None, "max", renorm, 1.0)
        w, ids = run(backend, logits, K, kw)
        assert not torch.isnan(w).any()
        assert_same_selection(w, ids, logits, K, kw, msg=f"{backend} {scoring}")
    # sigmoid of an all -inf/NaN row: zero weights (zero-sum renormalization), never NaN
    if scoring == "sigmoid":
        assert (w[0] == 0).all() and (w[2] == 0).all()


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_bias_with_inf_group_scores(device, backend):
    """+inf and -inf in one group make top2_sum NaN, which counts as -inf."""
    E = 8
    logits = torch.zeros(2, E, device=device)
    bias = torch.tensor([float("inf"), float("-inf"), 0, 0, 0, 0, 0, 0], device=device)
    kw = kwargs_of(E, 4, 2, 3, "sigmoid", bias, "top2_sum", True, 1.0)
    w, ids = run(backend, logits, 3, kw)
    assert_same_selection(w, ids, logits, 3, kw, msg=backend)


@settings(max_examples=60)
@given(data=st.data())
@pytest.mark.parametrize("device,backend", device_backend_params(KERNEL_BACKENDS))
def test_property_random(device, backend, data):
    interp = backend == "triton" and device == "cpu"
    G = data.draw(st.sampled_from([1, 2, 3, 4, 8]))
    gs = data.draw(st.integers(2, 12 if interp else 70))
    E = G * gs
    tg = data.draw(st.integers(1, G))
    K = data.draw(st.integers(1, min(tg * gs, 12)))
    T = data.draw(st.integers(0, 9 if interp else 200))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    scoring = data.draw(st.sampled_from(["sigmoid", "softmax"]))
    bias = data.draw(st.booleans())
    gsc = data.draw(st.sampled_from(["top2_sum", "max"]))
    ties = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**31 - 1))
    # integer logits: exact ties everywhere; with a bias, two groups' top-two sums can also
    # tie in exact arithmetic, (s0 + 1) + (s1 - 1) = (s1 + 1) + (s0 - 1), and round apart
    # in float32: the near-tie rule of acceptable_rows lets either group win there
    if ties:
        g = torch.Generator().manual_seed(seed)
        logits = torch.randint(-2, 3, (T, E), generator=g).to(dtype).to(device)
        b = torch.randint(-1, 2, (E,), generator=g).float().to(device) if bias else None
    else:
        logits, b = make_inputs(T, E, dtype, device, bias, seed, scale=3.0)
    kw = kwargs_of(E, G, tg, K, scoring, b, gsc, data.draw(st.booleans()), 1.5)
    w, ids = run(backend, logits, K, kw)
    assert_same_selection(w, ids, logits, K, kw, msg=f"{backend}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("scoring,renorm", [("sigmoid", True), ("sigmoid", False),
                                            ("softmax", True), ("softmax", False)])
def test_gradient(device, backend, scoring, renorm):
    """Gradient of a weighted loss w.r.t. logits equals plain autograd on the reference."""
    T, E, G, tg, K = 9, 32, 4, 2, 4
    logits, b = make_inputs(T, E, torch.float32, device, True, seed=3)
    kw = kwargs_of(E, G, tg, K, scoring, b, "top2_sum", renorm, 2.5)
    probe = torch.randn(T, K, generator=torch.Generator().manual_seed(4)).to(device)
    x = logits.clone().requires_grad_(True)
    w, ids = moe_kernels.grouped_topk(x, K, backend=backend, **kw)
    (w * probe).sum().backward()
    x_ref = logits.detach().cpu().clone().requires_grad_(True)
    w_ref, ids_ref = ref.grouped_topk(x_ref, b.cpu(), K, G, tg, scoring, "top2_sum", renorm, 2.5)
    assert_int_equal(ids.cpu(), ids_ref)
    (w_ref * probe.cpu()).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), x_ref.grad, rtol=1e-4, atol=1e-6)


def _rows_for_gradients() -> torch.Tensor:
    """(9, 8) logits, a row per case the softmax gradient must get right (why):"""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(9, 8, generator=g)
    x[0] = 0.0                          # all equal: a zero-initialised router, ties at the max
    x[1, [2, 5]] = x[1].max() + 1.0     # two entries tied at the maximum
    x[2, 4] = float("nan")              # a NaN entry (counts as -inf, zero gradient)
    x[3, 6] = float("inf")              # one +inf: saturated, no gradient
    x[4, [0, 7]] = float("inf")         # two +inf sharing the mass: saturated
    x[5] = float("-inf")                # all -inf: uniform, saturated
    x[6] = float("nan")                 # all NaN: as all -inf
    x[7, [1, 3]] = float("-inf")        # -inf entries in a finite row
    return x                            # row 8: plain random logits


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("scoring,renorm", [("softmax", True), ("softmax", False),
                                            ("sigmoid", True)])
def test_gradient_at_ties_and_non_finite_logits(device, backend, scoring, renorm):
    """The gradient w.r.t. logits against float64 autograd of the documented formula
    (torch's softmax / sigmoid, NaN as -inf) given the selection; a softmax row whose
    maximum is +-inf is saturated and gets zero (docs/api.md). Catches a softmax that
    shifts entries tied at the row maximum by a constant 0, which drops their gradient (an
    all-equal row would get none at all)."""
    logits = _rows_for_gradients()
    probe = torch.randn(9, 3, generator=torch.Generator().manual_seed(22))
    x = logits.clone().to(device).requires_grad_(True)
    w, ids = moe_kernels.grouped_topk(x, 3, scoring_func=scoring, renormalize=renorm,
                                      routed_scaling_factor=1.5, backend=backend)
    (w * probe.to(device)).sum().backward()
    _, ids_ref = ref.grouped_topk(logits, None, 3, 1, 1, scoring, "max", renorm, 1.5)
    assert_int_equal(ids.cpu(), ids_ref)
    x64 = logits.double().nan_to_num(nan=float("-inf")).requires_grad_(True)
    s = torch.softmax(x64, dim=-1) if scoring == "softmax" else torch.sigmoid(x64)
    u = s.gather(1, ids.cpu().long())
    if renorm:
        u = u / u.sum(dim=-1, keepdim=True)
    (u * 1.5 * probe.double()).sum().backward()
    want = x64.grad.nan_to_num(0.0)          # the saturated rows' NaN from inf - inf
    if scoring == "softmax":
        want[3:7] = 0.0
    assert x.grad.cpu().isfinite().all()
    torch.testing.assert_close(x.grad.cpu().double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device,backend", device_backend_params(KERNEL_BACKENDS))
def test_deterministic(device, backend):
    logits, b = make_inputs(37, 256, torch.bfloat16, device, True, seed=11)
    kw = kwargs_of(*CONFIGS["deepseek_v3"][:4], "sigmoid", b, "top2_sum", True, 2.5)
    w1, i1 = run(backend, logits, 8, kw)
    w2, i2 = run(backend, logits, 8, kw)
    assert torch.equal(i1, i2) and torch.equal(w1.view(torch.int32), w2.view(torch.int32))


@pytest.mark.parametrize("device,backend", device_backend_params(KERNEL_BACKENDS))
def test_row_strided_logits(device, backend):
    """logits may be a row-strided slice (last dim contiguous), e.g. of a wider GEMM out."""
    wide, b = make_inputs(19, 300, torch.float32, device, True, seed=5)
    logits = wide[:, 10:266]
    assert not logits.is_contiguous()
    kw = kwargs_of(*CONFIGS["deepseek_v3"][:4], "sigmoid", b[:256].contiguous(), "top2_sum",
                   True, 2.5)
    w, ids = run(backend, logits, 8, kw)
    w_c, ids_c = run(backend, logits.contiguous(), 8, kw)
    # Triton may lay out (and so reduce) differently for another stride: same ids, weights
    # by the float32 rule.
    assert_int_equal(ids, ids_c)
    assert_close(w, w_c, dtype=torch.float32)


@pytest.mark.parametrize("device,backend", device_backend_params(KERNEL_BACKENDS))
def test_direct_op_equals_api(device, backend):
    """torch.ops.moe_kernels.* (the registered op) gives what the eager fast path gives."""
    logits, b = make_inputs(13, 64, torch.float32, device, True, seed=9)
    args = (logits, b, 4, 8, 2, "sigmoid", "top2_sum", True, 2.5, -1)
    op = (torch.ops.moe_kernels.grouped_topk_triton if backend == "triton"
          else torch.ops.moe_kernels.grouped_topk)
    w_op, ids_op = op(*args)
    w, ids = moe_kernels.grouped_topk(logits, 4, num_expert_group=8, topk_group=2,
                                      correction_bias=b, routed_scaling_factor=2.5,
                                      backend=backend)
    assert torch.equal(ids, ids_op) and torch.equal(w, w_op)


@pytest.mark.parametrize("device,backend", device_backend_params(KERNEL_BACKENDS))
def test_opcheck(device, backend):
    logits, b = make_inputs(5, 32, torch.float32, device, True, seed=2)
    op = (torch.ops.moe_kernels.grouped_topk_triton.default if backend == "triton"
          else torch.ops.moe_kernels.grouped_topk.default)
    for args in [(logits, b, 4, 4, 2, "sigmoid", "top2_sum", True, 2.5, -1),
                 (logits.requires_grad_(True), None, 3, 1, 1, "softmax", "max", False, 1.0, 32)]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("shared", [None, 64], ids=["routed", "shared-column"])
def test_torch_compile_fullgraph(device, backend, shared):
    torch._dynamo.reset()
    logits, b = make_inputs(21, 64, torch.float32, device, True, seed=8)

    def route(x, bias):
        w, ids = moe_kernels.grouped_topk(x, 4, num_expert_group=8, topk_group=2,
                                          correction_bias=bias, routed_scaling_factor=2.5,
                                          shared_expert_id=shared, backend=backend)
        return w * 2.0, ids

    compiled = torch.compile(route, fullgraph=True)
    w_c, ids_c = compiled(logits, b)
    w_e, ids_e = route(logits, b)
    assert torch.equal(ids_c, ids_e)
    assert_close(w_c, w_e, dtype=torch.float32)


BAD_INPUTS = [
    # (description, logits shape, dtype, kwargs, exception, words in the message)
    ("E % G != 0", (4, 10), torch.float32, dict(num_expert_group=3), ValueError, "num_expert_group"),
    ("top_k too large", (4, 16), torch.float32, dict(top_k=9, num_expert_group=4, topk_group=2),
     ValueError, "top_k"),
    ("top_k zero", (4, 16), torch.float32, dict(top_k=0), ValueError, "top_k"),
    ("topk_group > G", (4, 16), torch.float32, dict(num_expert_group=4, topk_group=5),
     ValueError, "topk_group"),
    ("1-D logits", (16,), torch.float32, {}, ValueError, "logits"),
    ("int logits", (4, 16), torch.int32, {}, TypeError, "logits"),
    ("float64 logits", (4, 16), torch.float64, {}, TypeError, "logits"),
    ("bad scoring", (4, 16), torch.float32, dict(scoring_func="relu"), ValueError, "scoring_func"),
    ("bad group scoring", (4, 16), torch.float32, dict(group_scoring="mean"), ValueError,
     "group_scoring"),
    ("top2 on groups of one", (4, 16), torch.float32,
     dict(num_expert_group=16, topk_group=4, group_scoring="top2_sum"), ValueError, "top2_sum"),
    ("bias wrong shape", (4, 16), torch.float32, dict(correction_bias=torch.zeros(15)),
     ValueError, "correction_bias"),
    ("bias 2-D", (4, 16), torch.float32, dict(correction_bias=torch.zeros(1, 16)),
     ValueError, "correction_bias"),
    ("bias int", (4, 16), torch.float32, dict(correction_bias=torch.zeros(16, dtype=torch.int64)),
     TypeError, "correction_bias"),
    ("top_k float", (4, 16), torch.float32, dict(top_k=2.0), TypeError, "top_k"),
    ("unknown backend", (4, 16), torch.float32, dict(backend="tpu"), ValueError, "backend"),
    # degenerate numbers: a NaN or infinite scale would turn every weight into NaN / inf
    ("NaN scaling", (4, 16), torch.float32, dict(routed_scaling_factor=float("nan")),
     ValueError, "routed_scaling_factor"),
    ("inf scaling", (4, 16), torch.float32, dict(routed_scaling_factor=float("inf")),
     ValueError, "routed_scaling_factor"),
    ("scaling str", (4, 16), torch.float32, dict(routed_scaling_factor="2"), ValueError,
     "routed_scaling_factor"),
]


@pytest.mark.skipif(not _library.triton_interpreting() and not torch.cuda.is_available(),
                    reason="the triton backend needs a GPU or TRITON_INTERPRET=1")
def test_too_many_experts_for_triton_is_a_value_error():
    """One tile holds every expert: past Triton's tile cap our error, not Triton's."""
    logits = torch.zeros(1, _library.TRITON_MAX_EXPERTS + 1, device=DEVICES[-1])
    with pytest.raises(ValueError, match="triton backend takes E"):
        moe_kernels.grouped_topk(logits, 2, backend="triton")


def test_triton_expert_limit_is_tritons_tile_cap():
    import triton.language as tl
    assert _library.TRITON_MAX_EXPERTS == tl.TRITON_MAX_TENSOR_NUMEL


@pytest.mark.parametrize("desc,shape,dtype,kw,exc,words", BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(desc, shape, dtype, kw, exc, words):
    kw = dict(kw)
    top_k = kw.pop("top_k", 2)
    logits = torch.zeros(shape, dtype=dtype)
    with pytest.raises(exc, match=words):
        moe_kernels.grouped_topk(logits, top_k, **kw)


def test_bad_input_layout_and_device():
    with pytest.raises(ValueError, match="contiguous"):
        moe_kernels.grouped_topk(torch.zeros(16, 4).t(), 2)
    with pytest.raises(TypeError, match="logits"):
        moe_kernels.grouped_topk([[0.0, 1.0]], 1)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        moe_kernels.grouped_topk(torch.zeros(4, 16), 2, backend="cuda")
    if HAS_CUDA and moe_kernels.extension_has_cuda():
        with pytest.raises(ValueError, match="E <= 1024"):
            moe_kernels.grouped_topk(torch.zeros(4, 1040, device="cuda"), 2, backend="cuda")
    if HAS_CUDA:
        with pytest.raises(ValueError, match="correction_bias"):
            moe_kernels.grouped_topk(torch.zeros(4, 16, device="cuda"), 2,
                                     correction_bias=torch.zeros(16))


def test_empty_logits_with_a_strided_last_dim_are_refused():
    """torch calls an empty tensor contiguous whatever its strides; the layout rule is the
    last stride, so an empty (0, E) with stride 2 is refused like a full one, by the fast
    check of a configuration already seen too (`_check_args`, not only the full checks)."""
    moe_kernels.grouped_topk(torch.zeros(3, 6), 2)             # the configuration, seen
    empty = torch.zeros(4).as_strided((0, 6), (12, 2))
    assert empty.is_contiguous() and empty.stride(1) == 2
    for backend in ("reference", "cpu"):
        with pytest.raises(ValueError, match="contiguous last dimension"):
            moe_kernels.grouped_topk(empty, 2, backend=backend)


def test_cpp_checks_direct_op_call():
    """Direct torch.ops calls skip the public function's checks: the kernel's C++ check
    must still refuse bad input, raised as a Python exception. Run in a subprocess, so that
    a crash is a failure with its exit code rather than the end of the test session."""
    if not moe_kernels.extension_loaded():
        pytest.skip("moe_kernels._C not built")
    code = textwrap.dedent("""
        import torch, moe_kernels
        op = torch.ops.moe_kernels.grouped_topk
        cases = [((torch.zeros(4, 10), None, 2, 3, 1), "num_expert_group"),
                 ((torch.zeros(4, 16), None, 20, 4, 2), "top_k"),
                 ((torch.zeros(4, 16), torch.zeros(3), 2, 1, 1), "correction_bias"),
                 ((torch.zeros(4, 16), None, 2, 1, 1), "shared_expert_id")]
        for args, word in cases:
            shared = 15 if word == "shared_expert_id" else -1   # an id the routed take
            try:
                op(*args, "sigmoid", "max", True, 1.0, shared)
            except ValueError as e:
                assert word in str(e), str(e)
            else:
                raise AssertionError("no error for " + word)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


def test_default_backend():
    w, ids = moe_kernels.grouped_topk(torch.randn(3, 16), 2)
    expected = "cpu" if moe_kernels.extension_loaded() else "reference"
    w2, ids2 = moe_kernels.grouped_topk(torch.randn(3, 16), 2, backend=expected)
    assert w.shape == w2.shape
    assert moe_kernels._library.resolve_backend(None, torch.device("cpu"), "x") == expected


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_update_correction_bias(device):
    bias = torch.tensor([0.0, 0.5, -0.5, 1.0], device=device)
    counts = torch.tensor([10, 2, 6, 6], device=device, dtype=torch.int32)  # mean 6
    out = moe_kernels.update_correction_bias_(bias, counts, 0.01)
    assert out is bias
    expect = torch.tensor([0.0 - 0.01, 0.5 + 0.01, -0.5, 1.0])  # sign(6-10), sign(6-2), 0, 0
    torch.testing.assert_close(bias.cpu(), expect)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        moe_kernels.update_correction_bias_(bias, counts[:3], 0.01)
    with pytest.raises(TypeError, match="correction_bias"):
        moe_kernels.update_correction_bias_(counts, counts, 0.01)


def _int64_params():
    """(device, backend): the C++ kernel on the CPU, both GPU kernels on CUDA."""
    cpu, cuda = big_memory_devices(4.5)
    return [pytest.param("cpu", "cpu", id="cpu-cpu", marks=cpu.marks)] + [
        pytest.param("cuda", b, id=f"cuda-{b}", marks=cuda.marks) for b in ("triton", "cuda")]


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", _int64_params())
def test_int64_addressing(device, backend):
    """T * E beyond 2**31 elements: rows past the 2**31-th element must be right."""
    if moe_kernels._library.backend_unavailable_reason(backend, torch.device(device)):
        pytest.skip(f"{backend} unavailable")
    T, E = (1 << 23) + 64, 256
    logits = torch.zeros(T, E, dtype=torch.bfloat16, device=device)
    tail = torch.randn(64, E, generator=torch.Generator().manual_seed(1)).bfloat16().to(device)
    logits[-64:] = tail
    w, ids = moe_kernels.grouped_topk(logits, 8, num_expert_group=8, topk_group=4,
                                      backend=backend)
    w_ref, ids_ref = ref.grouped_topk(tail.cpu(), None, 8, 8, 4, "sigmoid", "max", True, 1.0)
    assert_int_equal(ids[-64:].cpu(), ids_ref)
    assert_close(w[-64:], w_ref, dtype=torch.float32)
