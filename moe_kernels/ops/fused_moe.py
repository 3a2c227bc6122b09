"""The fused FP8 MoE forward of the routed experts, `fused_moe_fp8`: schema, checks, API.

quantize (1x128) -> permute (align=1, scales alongside) -> GEMM1 (w13) -> SiLU-mul-quant
-> GEMM2 (w2) -> weighted unpermute, each stage through the unchecked internal layer of
its op (the arguments are checked once, here). On the Triton backend the GEMMs run over
the expert segments of the align=1 layout, so no padding row is ever computed (at decode,
with 256 experts, align=128 padding would be ~250x the real rows), and at small T the
first two stages are one kernel (`gather_rows_quant_fp8`: GATHERED_QUANT_MAX_BYTES). Oracle:
reference.moe_forward (float32, unquantized activations), within 2e-2 relative error.
On the cpu backend the same stages run in one C++ call (csrc/cpu/fused_moe.cpp: the same
kernels, the same bits, no Python between them). Registered as `moe_kernels::fused_moe_fp8`:
that C++ kernel for CPU tensors, elsewhere a composite running the device's default
backend.
"""

from __future__ import annotations

import torch

from moe_kernels import _library
from moe_kernels._common import FLOAT_DTYPES, FP8, INDEX_DTYPES, SCALE_BLOCK, cdiv
from moe_kernels._validate import (all_strided, autodiff_possible, check_float_tensor,
                                   check_forward_only, check_fp8, check_last_dim_contiguous,
                                   check_out, check_same_device, check_scales, check_tensor)
from moe_kernels.ops import fp8, grouped_gemm, permute as perm

OP = "fused_moe_fp8"


def check_args(op, hidden, w13, w13_scales, w2, w2_scales, topk_weights, topk_ids):
    """fused_moe_fp8's argument checks, errors named `op` (also the layer's experts())."""
    check_tensor(op, "hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_last_dim_contiguous(op, "hidden", hidden)
    check_fp8(op, "w13", w13, ndim=3)
    check_fp8(op, "w2", w2, ndim=3)
    T, H = hidden.shape
    E, two_i, h13 = w13.shape
    if h13 != H or two_i % 2:
        raise ValueError(f"{op}: w13 must have shape (E, 2I, H={H}), got {tuple(w13.shape)}")
    inter = two_i // 2
    # the GEMM kernels read weight rows as contiguous (the public GEMMs check the same)
    check_last_dim_contiguous(op, "w13", w13)
    check_last_dim_contiguous(op, "w2", w2)
    if tuple(w2.shape) != (E, H, inter):
        raise ValueError(f"{op}: w2 must have shape (E, H, I) = {(E, H, inter)} (from w13), "
                         f"got {tuple(w2.shape)}")
    c = lambda n: cdiv(n, SCALE_BLOCK)
    check_scales(op, "w13_scales", w13_scales, (E, c(two_i), c(H)), "w13", w13)
    check_scales(op, "w2_scales", w2_scales, (E, c(H), c(inter)), "w2", w2)
    check_tensor(op, "topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    check_float_tensor(op, "topk_weights", topk_weights, ndim=2)
    if topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"{op}: topk_ids and topk_weights must both have shape (T={T}, K), got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    for name, t in (("w13", w13), ("w2", w2), ("topk_ids", topk_ids),
                    ("topk_weights", topk_weights)):
        check_same_device(op, name, t, "hidden", hidden)


def _plain_call(hidden, w13, w13_scales, w2, w2_scales, topk_weights, topk_ids) -> bool:
    """Whether the call is the common one (plain tensors of the usual dtypes, one device)
    and valid, in a few predicates, each implied by one of check_args' checks (or
    stricter): True means check_args would pass. check_args, one check at a time, took 14
    us of a decode call's Python on the CPU, this ~4 (2-core VM, a slow stretch)."""
    # tensor attributes cost 0.1-0.4 us each from Python: one shape read per tensor, and
    # is_contiguous() (0.09 us) for the weights where stride(2) takes 0.26-0.4 us
    if not (type(hidden) is torch.Tensor and type(w13) is torch.Tensor
            and type(w13_scales) is torch.Tensor and type(w2) is torch.Tensor
            and type(w2_scales) is torch.Tensor and type(topk_weights) is torch.Tensor
            and type(topk_ids) is torch.Tensor
            and all_strided(hidden, w13, w13_scales, w2, w2_scales, topk_weights, topk_ids)
            and hidden.dim() == 2 and w13.dim() == 3
            and hidden.dtype in FLOAT_DTYPES and w13.dtype == FP8 and w2.dtype == FP8
            and w13_scales.dtype == torch.float32 and w2_scales.dtype == torch.float32
            and topk_ids.dtype in INDEX_DTYPES and topk_weights.dtype in FLOAT_DTYPES
            and hidden.stride()[1] == 1 and w13.is_contiguous() and w2.is_contiguous()):
        return False
    T, H = hidden.shape
    E, two_i, h13 = w13.shape
    inter, device = two_i // 2, hidden.device
    c = lambda n: cdiv(n, SCALE_BLOCK)
    ids_shape = topk_ids.shape
    # is_contiguous() says nothing of an empty weight's strides: those go to check_args
    return (two_i % 2 == 0 and h13 == H and E > 0 and inter > 0 and H > 0
            and w2.shape == (E, H, inter)
            and w13_scales.shape == (E, c(two_i), c(H)) and w2_scales.shape == (E, c(H), c(inter))
            and len(ids_shape) == 2 and ids_shape[0] == T and topk_weights.shape == ids_shape
            and w13.device == device and w2.device == device and w13_scales.device == device
            and w2_scales.device == device and topk_ids.device == device
            and topk_weights.device == device)


# Up to this many bytes of hidden, the Triton path quantizes the rows as it permutes them:
# one launch where quantize, gather rows and gather scales are three (decode: 6 launches in
# all instead of 8), and no quantized copy in token order written and read back. Each row
# is read once per top-k choice, so hidden must stay in L2 (50 MB on the H100) between its
# reads; beyond, the quantized copy (half hidden's bytes at bf16) is what gets re-read.
GATHERED_QUANT_MAX_BYTES = 8 << 20


def permuted_fp8_rows(backend, hidden, topk_ids, num_experts):
    """hidden's rows quantized (1x128 groups) in the align=1 expert layout:
    (q (R, H) fp8, PermuteLayout with its scales (R, H/128) float32)."""
    if backend == "triton" and hidden.numel() * hidden.element_size() <= GATHERED_QUANT_MAX_BYTES:
        index = perm.PERMUTE_INDEX.kernel(backend)(topk_ids, num_experts, 1)
        q, s = fp8.gather_rows_quant_fp8_unchecked(backend, hidden, index[4], index[3],
                                                   SCALE_BLOCK, 1e-10)
        return q, perm.PermuteLayout(*index, scales=s)
    q, s = fp8.quantize_fp8_per_token_group_unchecked(backend, hidden, SCALE_BLOCK, 1e-10,
                                                      False, False)
    return perm.permute_unchecked(backend, q, topk_ids, num_experts, 1, s)


# Tokens per pass of the stages: a longer batch runs in chunks of this many tokens, each
# writing its rows of the output, so that the transient buffers are bounded whatever T is
# (vLLM's fused_experts chunks the same way, VLLM_FUSED_MOE_CHUNK_SIZE). At DeepSeek-V3's
# shape, top-8, bf16: 16 KB a routed row at the largest stage (expert_mlp), 2.2 GB a chunk.
# A chunk's GEMMs still hold 512 rows an expert on average at 256 experts (compute-bound
# tiles): 11.5 TFLOP, ~10 ms at the 1150 TFLOPS goal, against a few microseconds for the
# chunk's 6 extra launches (an estimate: not timed on a GPU).
CHUNK_TOKENS = 16384


def fused_moe_fp8_unchecked(backend, hidden, w13, w13_scales, w2, w2_scales, topk_weights,
                            topk_ids, out=None):
    """The internal layer: arguments checked, backend resolved (see fused_moe_fp8); the
    result in a new tensor, or written into `out` and returned. On the cpu backend one C++
    call runs every stage (csrc/cpu/fused_moe.cpp). More than CHUNK_TOKENS tokens: one pass
    per chunk of tokens, each the call on its rows alone."""
    if w13.shape[0] == 0:          # no expert: every pair is skipped
        return hidden.new_zeros(hidden.shape) if out is None else out.zero_()
    T = hidden.shape[0]
    if T > CHUNK_TOKENS:
        if out is None:
            out = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        # a chunk reads its own rows of hidden before writing its rows of out: out=hidden
        # stays in place chunk by chunk
        for t0 in range(0, T, CHUNK_TOKENS):
            rows = slice(t0, min(T, t0 + CHUNK_TOKENS))
            _one_pass(backend, hidden[rows], w13, w13_scales, w2, w2_scales,
                      topk_weights[rows], topk_ids[rows], out[rows])
        return out
    return _one_pass(backend, hidden, w13, w13_scales, w2, w2_scales, topk_weights, topk_ids,
                     out)


def _one_pass(backend, hidden, w13, w13_scales, w2, w2_scales, topk_weights, topk_ids, out):
    """fused_moe_fp8_unchecked of at least one expert, every token in one pass."""
    if backend == "cpu":
        if out is None:
            return FUSED_MOE_FP8.kernel(backend)(hidden, w13, w13_scales, w2, w2_scales,
                                                 topk_weights, topk_ids)
        FUSED_MOE_FP8_OUT.kernel(backend)(hidden, w13, w13_scales, w2, w2_scales,
                                          topk_weights, topk_ids, out)
        return out
    return fused_moe_fp8_composed(backend, hidden, w13, w13_scales, w2, w2_scales,
                                  topk_weights, topk_ids, out)


def fused_moe_fp8_composed(backend, hidden, w13, w13_scales, w2, w2_scales, topk_weights,
                           topk_ids, out=None):
    """The stages as calls of the ops' internal layer, one kernel each (on the Triton
    backend at small T the first two are one). hidden is read by the first stage only, so
    `out` may be hidden's own memory: the last stage writes it."""
    x, layout = permuted_fp8_rows(backend, hidden, topk_ids, w13.shape[0])
    gemm, row_of_pair = segment_gemm(layout, backend), layout.row_of_pair
    rows = [x, layout.scales]
    del x, layout             # expert_mlp holds the rows' only references (it frees them)
    z = expert_mlp(backend, gemm, rows, w13, w13_scales, w2, w2_scales, hidden.dtype)
    return perm.unpermute_unchecked(backend, z, row_of_pair, topk_weights, out)


def expert_mlp(backend, gemm, rows, w13, w13_scales, w2, w2_scales, out_dtype,
               masked_m=None):
    """down(silu(gate(x)) * up(x)) of FP8 rows with their 1x128 scales, each row by its
    expert's weights; gemm(a, a_scales, w, w_scales, dtype) knows the rows' layout (the
    expert segments, or the masked layout: then masked_m (E,), whose rows alone the
    activation reads and writes, see masked_gemm). GEMM1 writes bf16, as SGLang and vLLM
    do.

    rows: the list [q, s], emptied here. The caller passes its only references to the rows,
    so that each intermediate is freed once its last reader has run: the rows after GEMM1,
    GEMM1's output after the activation. At GEMM2 the live buffers are then its FP8 input
    and its output, R x (I + 2H) bytes at bf16 (DeepSeek-V3: 16 KB a routed row), not also
    the rows and GEMM1's output (R x (H + 4I) more: 31 KB a row in all)."""
    q, s = rows
    rows.clear()
    y = gemm(q, s, w13, w13_scales, torch.bfloat16)
    del q, s
    if masked_m is not None:
        E, M, two_i = y.shape
        q2 = torch.empty((E, M, two_i // 2), dtype=FP8, device=y.device)
        s2 = torch.empty((E, M, cdiv(two_i // 2, SCALE_BLOCK)), dtype=torch.float32,
                         device=y.device)
        fp8.silu_and_mul_quant_fp8_masked_out_unchecked(backend, y, masked_m, SCALE_BLOCK,
                                                        False, q2, s2)
    else:
        lead = y.shape[:-1]
        q2, s2 = fp8.silu_and_mul_quant_fp8_unchecked(backend, y.flatten(0, -2),
                                                      SCALE_BLOCK)
        q2, s2 = q2.view(*lead, q2.shape[-1]), s2.view(*lead, s2.shape[-1])
    del y
    return gemm(q2, s2, w2, w2_scales, out_dtype)


def segment_gemm(layout, backend):
    """GEMM over the layout's expert segments: the segments kernel on Triton, the
    contiguous op with m_indices elsewhere."""
    if backend == "triton":    # the offsets alone: the layout also holds the rows' scales
        offsets, counts = layout.expert_offsets, layout.tokens_per_expert
        return lambda a, s, w, ws, dt: grouped_gemm.grouped_gemm_fp8_segments_unchecked(
            a, s, w, ws, offsets, counts, dt)
    return dense_gemm(layout.m_indices, backend)


def dense_gemm(m_indices, backend):
    """The contiguous grouped GEMM: row r by expert m_indices[r]."""
    return lambda a, s, w, ws, dt: grouped_gemm.grouped_gemm_fp8_unchecked(
        backend, a, s, w, ws, m_indices, dt)


def masked_gemm(masked_m, backend):
    """GEMM over the masked layout (E, M, .): expert e's first masked_m[e] rows, the rows
    past them left unwritten (zero_fill=False). Nothing downstream reads those: GEMM2 reads
    the rows below masked_m only, and the low-latency combine sends every other row to a
    discarded slot (expert_mlp's activation with masked_m neither reads nor writes them).
    Zeroing them would move more bytes than the products at decode: a rank's (32 experts,
    8 ranks x 128 rows) buffers hold ~32 valid rows an expert, and their zero rows are
    268 MB (GEMM1, bf16, 2I = 4096) plus 470 MB (GEMM2, H = 7168) a layer, against 1.4 GB
    of weights read."""
    def gemm(a, s, w, ws, dt):
        out = torch.empty((*a.shape[:2], w.shape[1]), dtype=dt, device=a.device)
        return grouped_gemm.grouped_gemm_fp8_masked_out_unchecked(backend, a, s, w, ws,
                                                                  masked_m, out, False)
    return gemm


def fused_moe_fp8(hidden: torch.Tensor, w13: torch.Tensor, w13_scales: torch.Tensor,
                  w2: torch.Tensor, w2_scales: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, *, out: torch.Tensor | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """Routed-expert MoE forward with FP8 weights and activations.

    hidden: (T, H) bfloat16 | float16 | float32; w13: (E, 2I, H) float8_e4m3fn, rows
    [gate | up]; w13_scales: (E, ceil(2I/128), ceil(H/128)) float32; w2: (E, H, I)
    float8_e4m3fn; w2_scales: (E, ceil(H/128), ceil(I/128)) float32; topk_weights: (T, K)
    float; topk_ids: (T, K) int32 | int64 (ids outside [0, E) skipped; E = 0 skips every
    pair). Returns (T, H) in hidden's dtype: sum_k w[t, k] * down(silu(gate(h_t)) *
    up(h_t)) of expert ids[t, k]; or writes it into `out` (T, H) of hidden's dtype,
    contiguous, and returns it. `out` may be hidden itself (in place, vLLM's
    `inplace=True`: every row of hidden is read before out is written), but must not
    share memory with another input."""
    if autodiff_possible():
        check_forward_only(OP, hidden=hidden, w13=w13, w13_scales=w13_scales, w2=w2,
                           w2_scales=w2_scales, topk_weights=topk_weights)
    if not _plain_call(hidden, w13, w13_scales, w2, w2_scales, topk_weights, topk_ids):
        check_args(OP, hidden, w13, w13_scales, w2, w2_scales, topk_weights, topk_ids)
    if out is not None:
        # hidden is left out of the overlap check: it is read before out is written
        check_out(OP, "out", out, tuple(hidden.shape), (hidden.dtype,), "hidden", hidden,
                  {"w13": w13, "w13_scales": w13_scales, "w2": w2, "w2_scales": w2_scales,
                   "topk_weights": topk_weights, "topk_ids": topk_ids})
    backend = FUSED_MOE_FP8.resolve(backend, hidden)
    return fused_moe_fp8_unchecked(backend, hidden, w13, w13_scales, w2, w2_scales,
                                   topk_weights, topk_ids, out)


def _fused_moe_fp8_out(*args) -> None:
    """The registered out= op on devices without a native kernel: the public function."""
    fused_moe_fp8(*args[:-1], out=args[-1])


FUSED_MOE_FP8 = _library.Op(
    OP, "(Tensor hidden, Tensor w13, Tensor w13_scales, Tensor w2, Tensor w2_scales, "
        "Tensor topk_weights, Tensor topk_ids) -> Tensor",
    fake=lambda hidden, *weights_and_routing: hidden.new_empty(hidden.shape),
    native=("cpu",),
    composite=lambda *args: fused_moe_fp8(*args),
    backends=("reference", "triton", "cpu"))
# out= (fused_moe_fp8's out): on CPU tensors the C++ kernel writes it, elsewhere the
# composite over the stages' ops. No autograd, as for every out= op.
FUSED_MOE_FP8_OUT = _library.Op(
    OP + "_out", "(Tensor hidden, Tensor w13, Tensor w13_scales, Tensor w2, Tensor w2_scales, "
                 "Tensor topk_weights, Tensor topk_ids, Tensor(a!) out) -> ()",
    fake=_library.no_output,
    native=("cpu",),
    composite=_fused_moe_fp8_out,
    backends=("reference", "triton", "cpu"))
