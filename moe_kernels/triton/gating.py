"""Triton kernel for `grouped_topk`: one program scores and selects ROWS tokens.

The row is loaded as a [G_PAD, GS_PAD] tile (group, slot in group), so groups of any size
(E=72 with G=8, E=160, ...) are plain masked reductions; padding slots never win. Every
choice (kept groups, then experts) follows the order of `reference/gating.py` exactly
(larger value, then lower index), in one of two forms (KEYS32):
- two int32 reductions: the max of the value's order-preserving int32 image `_monotone`,
  then the min index among the entries holding it: fewer instructions (a reduction within
  a warp can be one REDUX instruction on sm_80+);
- one max over int64 keys `_order_key` (the image and the inverted index): where a row's
  reductions cross warps, each crossing goes through shared memory behind a barrier, and
  this form crosses once a choice instead of twice.
With group selection, the expert rounds run on a [TG_PAD, GS_PAD] tile of the kept groups
only, reloaded and rescored by the same operations; the chosen scores are recomputed from
their logits (docs/gating.md: the SASS this saves).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moe_kernels._common import cdiv, next_power_of_2
from moe_kernels.triton.launch import cached_launch, configure

# Below every real key (reference.EXCLUDED_KEY); jit code may read only constexpr globals.
_NEG_KEY = tl.constexpr(-9223372036854775808)


# Below every real image of `_monotone` (-inf's is -2^31 + 2^23 - 1), above every index.
_NEG_IMAGE = tl.constexpr(-2147483648)
_NO_INDEX = tl.constexpr(2147483647)


@triton.jit
def _monotone(v):
    """float32 (no NaN) -> its order-preserving int32 image (-0.0 as +0.0)."""
    v = tl.where(v == 0.0, 0.0, v)
    bits = v.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _order_key(v, idx):
    """float32 (no NaN), int64 index -> int64 key; see reference.order_key."""
    return _monotone(v).to(tl.int64) * 4294967296 - idx


@cached_launch
@triton.jit
def _grouped_topk_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr,
    T, stride_t, scale, shared_id,
    G: tl.constexpr, GS: tl.constexpr, G_PAD: tl.constexpr, GS_PAD: tl.constexpr,
    TOPK_GROUP: tl.constexpr, TG_PAD: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_TOP2: tl.constexpr,
    SELECT_GROUPS: tl.constexpr, RENORM: tl.constexpr, ROWS: tl.constexpr,
    SHARED: tl.constexpr, KEYS32: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < T
    grp = tl.arange(0, G_PAD)
    slot = tl.arange(0, GS_PAD)
    expert = grp[:, None] * GS + slot[None, :]                 # [G_PAD, GS_PAD]
    real = (grp[:, None] < G) & (slot[None, :] < GS)
    mask = row_ok[:, None, None] & real[None, :, :]             # [ROWS, G_PAD, GS_PAD]

    # Convert right after the load: the interpreter's bf16 arithmetic is wrong
    # (docs/index.md, conventions).
    x = tl.load(logits_ptr + rows[:, None, None] * stride_t + expert[None, :, :],
                mask=mask, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)
    if SOFTMAX:
        m = tl.max(tl.max(x, axis=2), axis=1)
        e = tl.where(mask, tl.exp(tl.where(x == m[:, None, None], 0.0, x - m[:, None, None])), 0.0)
        den = tl.sum(tl.sum(e, axis=2), axis=1)
        s = e / den[:, None, None]
    else:
        s = 1.0 / (1.0 + tl.exp(-x))
    if HAS_BIAS:
        s_bias = tl.load(bias_ptr + expert, mask=real, other=0.0).to(tl.float32)
        b = s + s_bias[None, :, :]
    else:
        b = s
    b = tl.where(b != b, float("-inf"), b)

    if SELECT_GROUPS:
        b_real = tl.where(mask, b, float("-inf"))
        if GROUP_TOP2:
            # the top two values' sum; a tied top counts twice. float32 reductions only:
            # the whole tile's int64 keys are not needed when the experts are rescored
            top = tl.max(b_real, axis=2)
            is_top = b_real == top[:, :, None]
            ties = tl.sum(is_top.to(tl.int32), axis=2)
            second = tl.max(tl.where(is_top, float("-inf"), b_real), axis=2)
            gscore = top + tl.where(ties > 1, top, second)
        else:
            gscore = tl.max(b_real, axis=2)
        gscore = tl.where(gscore != gscore, float("-inf"), gscore)
        tcol = tl.arange(0, TG_PAD)[None, :]
        kept_g = tl.zeros((ROWS, TG_PAD), dtype=tl.int32)
        if KEYS32:
            gimage = tl.where((grp < G)[None, :], _monotone(gscore), _NEG_IMAGE)
            gidx = grp[None, :] + tl.zeros((ROWS, 1), tl.int32)
            for j in tl.static_range(TOPK_GROUP):
                gtop = tl.max(gimage, axis=1)
                gbest = tl.min(tl.where(gimage == gtop[:, None], gidx, _NO_INDEX), axis=1)
                kept_g = tl.where(tcol == j, gbest[:, None], kept_g)
                gimage = tl.where(gidx == gbest[:, None], _NEG_IMAGE, gimage)
        else:
            gkey = tl.where((grp < G)[None, :], _order_key(gscore, grp[None, :].to(tl.int64)), _NEG_KEY)
            for j in tl.static_range(TOPK_GROUP):
                gbest = tl.max(gkey, axis=1)
                kept_g = tl.where(tcol == j, ((-gbest) & 4294967295).to(tl.int32)[:, None], kept_g)
                gkey = tl.where(gkey == gbest[:, None], _NEG_KEY, gkey)
        # the experts of the kept groups only, reloaded (L1) and rescored by the same
        # operations: the top_k rounds below reduce over TOPK_GROUP groups, not G
        expert2 = kept_g[:, :, None] * GS + slot[None, None, :]       # [ROWS, TG_PAD, GS_PAD]
        mask2 = row_ok[:, None, None] & (tcol < TOPK_GROUP)[:, :, None] & (slot < GS)[None, None, :]
        x2 = tl.load(logits_ptr + rows[:, None, None] * stride_t + expert2, mask=mask2,
                     other=float("-inf")).to(tl.float32)
        x2 = tl.where(x2 != x2, float("-inf"), x2)
        if SOFTMAX:
            s2 = tl.exp(tl.where(x2 == m[:, None, None], 0.0, x2 - m[:, None, None])) / den[:, None, None]
        else:
            s2 = 1.0 / (1.0 + tl.exp(-x2))
        if HAS_BIAS:
            b2 = s2 + tl.load(bias_ptr + expert2, mask=mask2, other=0.0).to(tl.float32)
        else:
            b2 = s2
        b2 = tl.where(b2 != b2, float("-inf"), b2)
        b_cand, m_cand, e_cand = b2, mask2, expert2
    else:
        b_cand, m_cand = b, mask
        e_cand = expert[None, :, :] + tl.zeros((ROWS, 1, 1), tl.int32)

    kcol = tl.arange(0, K_PAD)[None, :]
    out_ids = tl.zeros((ROWS, K_PAD), dtype=tl.int32)
    if KEYS32:
        image = tl.where(m_cand, _monotone(b_cand), _NEG_IMAGE)
        for k in tl.static_range(TOP_K):
            top = tl.max(tl.max(image, axis=2), axis=1)
            holders = tl.where(image == top[:, None, None], e_cand, _NO_INDEX)
            chosen_id = tl.min(tl.min(holders, axis=2), axis=1)
            out_ids = tl.where(kcol == k, chosen_id[:, None], out_ids)
            image = tl.where(e_cand == chosen_id[:, None, None], _NEG_IMAGE, image)
    else:
        key = tl.where(m_cand, _order_key(b_cand, e_cand.to(tl.int64)), _NEG_KEY)
        for k in tl.static_range(TOP_K):
            best = tl.max(tl.max(key, axis=2), axis=1)
            chosen_id = ((-best) & 4294967295).to(tl.int32)
            out_ids = tl.where(kcol == k, chosen_id[:, None], out_ids)
            key = tl.where(key == best[:, None, None], _NEG_KEY, key)

    # The chosen scores, recomputed from their logits by the tile's own operations (so to
    # the same bits): a load per choice instead of a sum over the tile per choice.
    out_mask = row_ok[:, None] & (kcol < TOP_K)
    xk = tl.load(logits_ptr + rows[:, None] * stride_t + out_ids, mask=out_mask,
                 other=float("-inf")).to(tl.float32)
    xk = tl.where(xk != xk, float("-inf"), xk)
    if SOFTMAX:
        out_s = tl.exp(tl.where(xk == m[:, None], 0.0, xk - m[:, None])) / den[:, None]
    else:
        out_s = 1.0 / (1.0 + tl.exp(-xk))
    out_s = tl.where(out_mask, out_s, 0.0)

    w = out_s
    if RENORM:
        den = tl.sum(out_s, axis=1)[:, None]
        w = tl.where(den > 0, out_s / tl.where(den > 0, den, 1.0), 0.0)
    w = w * scale
    # rows of TOP_K columns, or TOP_K + 1 whose last holds the shared expert (weight 1)
    width = TOP_K + 1 if SHARED else TOP_K
    out_off = rows[:, None] * width + kcol
    tl.store(w_ptr + out_off, w, mask=out_mask)
    tl.store(ids_ptr + out_off, out_ids, mask=out_mask)
    if SHARED:
        tl.store(w_ptr + rows * width + TOP_K, tl.full((ROWS,), 1.0, tl.float32), mask=row_ok)
        tl.store(ids_ptr + rows * width + TOP_K, tl.full((ROWS,), 0, tl.int32) + shared_id,
                 mask=row_ok)


def _launch_config(T: int, E_pad: int) -> tuple[int, int, bool]:
    """(ROWS per program, num_warps, KEYS32). Rows and warps from benchmarks/tune_gating.py
    on an H100 at E=256 (bf16, 8 groups): up to 512 tokens one row per single-warp program
    is best (3.3-3.8 us; more rows or warps only add latency); at 4096-16384 tokens 8 rows
    on 2-4 warps (11.5 us and 39 us; 1 row per program is 7x slower). Wider rows keep the
    tile size. Swept on a kernel whose rounds reduced over the whole tile; this one's sweep
    is owed. KEYS32: `_keys32`."""
    if T <= 512:
        rows, warps = 1, 1 if E_pad <= 256 else 2
    else:
        rows, warps = max(1, 8 * 256 // E_pad), 2 if T <= 8192 else 4
    return rows, warps, _keys32(warps)


def _keys32(num_warps: int) -> bool:
    """The int32 form of the choices (module docstring) on one warp, where a row's
    reductions never leave the warp. From the sm_90a SASS (bf16, DeepSeek-V3 routing, one
    row on one warp): 1256 -> 1024 instructions on triton 3.6, 1008 -> 752 on 3.9. On more
    warps it depends on the layout each triton picks: at 4096 tokens (8 rows, 2 warps)
    3.9's barriers go 45 -> 13 but 3.6's 46 -> 82 (its reductions cross warps, twice a choice
    in this form), so the int64 form stays there until the H100 sweep (benchmarks/
    tune_gating.py) says otherwise."""
    return num_warps == 1


def grouped_topk(logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int,
                 num_expert_group: int, topk_group: int, scoring_func: str,
                 group_scoring: str, renormalize: bool, routed_scaling_factor: float,
                 shared_expert_id: int = -1, config: tuple | None = None):
    """logits (T, E) float, last dim contiguous -> (w (T, W) float32, ids int32), W =
    top_k, + 1 with a shared_expert_id >= 0 (its column last, weight 1). Arguments are
    validated by moe_kernels.ops.gating. `config` = (rows per program, num_warps[, keys32])
    overrides `_launch_config` (benchmarks/tune_gating.py)."""
    T, E = logits.shape
    width = top_k + (shared_expert_id >= 0)
    w = torch.empty((T, width), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, width), dtype=torch.int32, device=logits.device)
    if T == 0:
        return w, ids
    G = num_expert_group
    E_pad = next_power_of_2(G) * next_power_of_2(E // G)
    if config is None:
        rows, num_warps, keys32 = _launch_config(T, E_pad)
    else:
        rows, num_warps = config[:2]
        keys32 = config[2] if len(config) > 2 else _keys32(num_warps)
    # the kernel reads bias[e] at e: a strided (a column of a per-layer table) or expanded
    # bias is made contiguous first (E floats, a no-op when already contiguous)
    bias = correction_bias.contiguous() if correction_bias is not None else logits
    _configured(E, G, topk_group, top_k, scoring_func == "softmax",
                correction_bias is not None, group_scoring == "top2_sum", bool(renormalize),
                rows, num_warps, shared_expert_id >= 0, keys32)[(cdiv(T, rows),)](
        logits, bias, w, ids, T, logits.stride(0), float(routed_scaling_factor),
        shared_expert_id)
    return w, ids


@functools.lru_cache(maxsize=None)
def _configured(E, G, topk_group, top_k, softmax, has_bias, top2, renormalize, rows,
                num_warps, shared, keys32):
    """The kernel with one router configuration's constexprs bound (launch.configure)."""
    GS = E // G
    return configure(_grouped_topk_kernel, G=G, GS=GS, G_PAD=next_power_of_2(G),
                     GS_PAD=next_power_of_2(GS), TOPK_GROUP=topk_group,
                     TG_PAD=next_power_of_2(topk_group), TOP_K=top_k,
                     K_PAD=next_power_of_2(top_k), SOFTMAX=softmax, HAS_BIAS=has_bias,
                     GROUP_TOP2=top2, SELECT_GROUPS=topk_group < G, RENORM=renormalize,
                     ROWS=rows, SHARED=shared, KEYS32=keys32, num_warps=num_warps)
