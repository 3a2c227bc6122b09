"""Fused sigmoid/softmax grouped top-k gating: schema, checks, public API.

Op `moe_kernels::grouped_topk` (CPU and CUDA kernels from C++; `_triton` variant), with a
fake and an autograd formula (the weights' gradient w.r.t. `logits`). Semantics:
docs/api.md and docs/gating.md.
"""

from __future__ import annotations

import math

import torch

from moe_kernels import _library
from moe_kernels._common import FLOAT_DTYPES, FLOAT_DTYPES_F64
from moe_kernels._validate import (STRIDED, check_bool, check_choice, check_differentiable_kernel,
                                   check_float_tensor, check_int, check_last_dim_contiguous,
                                   check_same_device, check_tensor)
from moe_kernels.reference import gating as reference

OP = "grouped_topk"
SCORING_FUNCS = ("sigmoid", "softmax")
GROUP_SCORINGS = ("top2_sum", "max")


def _fake(logits, correction_bias, top_k, num_expert_group, topk_group, scoring_func,
          group_scoring, renormalize, routed_scaling_factor, shared_expert_id):
    T, width = logits.shape[0], top_k + (shared_expert_id >= 0)
    return (logits.new_empty((T, width), dtype=torch.float32),
            logits.new_empty((T, width), dtype=torch.int32))


GROUPED_TOPK = _library.Op(
    OP, "(Tensor logits, Tensor? correction_bias, int top_k, int num_expert_group, "
        "int topk_group, str scoring_func, str group_scoring, bool renormalize, "
        "float routed_scaling_factor, int shared_expert_id) -> (Tensor, Tensor)",
    fake=_fake, triton="gating", native=("cpu", "cuda"))


def _check_args_slow(logits, top_k, num_expert_group, topk_group, scoring_func,
                     correction_bias, group_scoring):
    """Every check, with the message naming the argument."""
    check_tensor(OP, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    E = logits.shape[1]
    if E < 1:
        raise ValueError(f"{OP}: logits must have at least one expert column, got shape "
                         f"{tuple(logits.shape)}")
    check_last_dim_contiguous(OP, "logits", logits)
    check_int(OP, "num_expert_group", num_expert_group, low=1)
    if E % num_expert_group != 0:
        raise ValueError(f"{OP}: num_expert_group={num_expert_group} must divide the number "
                         f"of experts E={E}")
    check_int(OP, "topk_group", topk_group, low=1, high=num_expert_group,
              high_name="num_expert_group")
    group_size = E // num_expert_group
    check_int(OP, "top_k", top_k, low=1, high=topk_group * group_size,
              high_name="topk_group * E / num_expert_group")
    check_choice(OP, "scoring_func", scoring_func, SCORING_FUNCS)
    check_choice(OP, "group_scoring", group_scoring, GROUP_SCORINGS)
    if topk_group < num_expert_group and group_scoring == "top2_sum" and group_size < 2:
        raise ValueError(f"{OP}: group_scoring='top2_sum' needs at least 2 experts per group, "
                         f"got E / num_expert_group = {group_size}; use 'max'")
    if correction_bias is not None:
        check_float_tensor(OP, "correction_bias", correction_bias, ndim=1)
        if correction_bias.shape[0] != E:
            raise ValueError(f"{OP}: correction_bias must have shape (E,) = ({E},), got "
                             f"{tuple(correction_bias.shape)}")
        check_same_device(OP, "correction_bias", correction_bias, "logits", logits)


def check_routing_config(op: str, num_experts: int, top_k: int, num_expert_group: int,
                         topk_group: int, group_scoring: str = "top2_sum") -> None:
    """The checks of grouped_topk's scalar configuration, for callers (the layer) that
    validate it once, up front; errors name grouped_topk's arguments."""
    logits = torch.empty((0, num_experts), dtype=torch.float32, device="meta")
    try:
        _check_args_slow(logits, top_k, num_expert_group, topk_group, "sigmoid", None,
                         group_scoring)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{op}: {exc}") from None


# Scalar configurations (E, top_k, G, topk_group, names) already validated: the eager path
# checks them once, not on every call (6.5 us -> ~2 us per call here). The ints' types are
# checked apart (True == 1 would hash alike).
_VALID_CONFIGS: set = set()


def _check_args(logits, top_k, num_expert_group, topk_group, scoring_func, correction_bias,
                group_scoring):
    """Fast predicates for the common case; any doubt goes to `_check_args_slow`, which
    raises the precise error (or passes, and the configuration is remembered)."""
    ok = (type(logits) is torch.Tensor or isinstance(logits, torch.Tensor)) \
        and logits.layout is STRIDED and logits.dim() == 2 and logits.dtype in FLOAT_DTYPES
    if ok:
        E = logits.shape[1]
        ok = (type(top_k) is int and type(num_expert_group) is int and type(topk_group) is int
              and (E, top_k, num_expert_group, topk_group, scoring_func,
                   group_scoring) in _VALID_CONFIGS
              and (E == 1 or logits.stride(1) == 1))   # not is_contiguous(): True when empty
        if ok and correction_bias is not None:
            ok = (isinstance(correction_bias, torch.Tensor)
                  and correction_bias.layout is STRIDED and correction_bias.dim() == 1
                  and correction_bias.shape[0] == E and correction_bias.is_floating_point()
                  and correction_bias.device == logits.device)
    if not ok:
        _check_args_slow(logits, top_k, num_expert_group, topk_group, scoring_func,
                         correction_bias, group_scoring)
        if not torch.compiler.is_compiling():   # a side effect strict export warns of
            _VALID_CONFIGS.add((logits.shape[1], top_k, num_expert_group, topk_group,
                                scoring_func, group_scoring))


def _check_shared_expert_id(num_experts: int, shared_expert_id) -> int:
    """None -> -1 (no shared column); else an int id the routed experts do not use."""
    if shared_expert_id is None:
        return -1
    check_int(OP, "shared_expert_id", shared_expert_id, low=num_experts, high=2**31 - 1)
    return shared_expert_id


def _finite(value) -> bool:
    """-inf < value < inf, NaN failing both: comparisons, which torch.compile also traces
    on a symbolic float (dynamic=True), where math.isfinite breaks the graph."""
    return -math.inf < value < math.inf


def check_scaling_factor(op: str, value) -> None:
    """routed_scaling_factor: a finite float (or int); also the layer's, checked once."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise ValueError(f"{op}: routed_scaling_factor must be a finite float, got {value!r}")


# --- autograd ------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    logits, _, top_k, _, _, scoring_func, _, renormalize, scale, _ = inputs
    ctx.save_for_backward(logits, output[1][:, :top_k])   # a shared column has no gradient
    ctx.opts = (scoring_func, renormalize, scale)
    ctx.top_k = top_k


def weights_backward(grad_w, logits, ids, scoring_func, renormalize, routed_scaling_factor):
    """d loss / d logits (T, E) in logits' dtype, from grad_w (T, K) and the chosen ids.

    The selection is piecewise constant, so only w = scale * s[ids] (/ sum) carries a
    gradient; NaN logits (treated as -inf) get zero, and so does a softmax row whose
    largest logit is +-inf (saturated: `reference.scores`)."""
    x = reference.clean_logits(logits)
    s = reference.scores(x, scoring_func)
    u = s.gather(1, ids.long())
    g = grad_w.float() * routed_scaling_factor
    if renormalize:
        den = u.sum(dim=-1, keepdim=True)
        safe = torch.where(den > 0, den, 1.0)
        g = torch.where(den > 0, g / safe - (g * u).sum(dim=-1, keepdim=True) / (safe * safe), 0.0)
    ds = torch.zeros_like(s).scatter_(1, ids.long(), g)
    if scoring_func == "sigmoid":
        dx = ds * s * (1.0 - s)
    else:
        dx = s * (ds - (ds * s).sum(dim=-1, keepdim=True))
        dx = torch.where(torch.isinf(x.amax(dim=-1, keepdim=True)), 0.0, dx)
    return torch.where(torch.isnan(logits), 0.0, dx).to(logits.dtype)


def _backward(ctx, grad_w, grad_ids):
    logits, ids = ctx.saved_tensors
    grad = weights_backward(grad_w[:, :ctx.top_k], logits, ids, *ctx.opts)
    return grad, None, None, None, None, None, None, None, None, None


GROUPED_TOPK.register_autograd(lambda backend: (_backward, _setup_context))


def grouped_topk_unchecked(backend, logits, correction_bias, top_k, num_expert_group,
                           topk_group, scoring_func, group_scoring, renormalize,
                           routed_scaling_factor, shared_expert_id=-1):
    """The internal layer: the schema's arguments, already checked; `backend` resolved."""
    kernel = (reference.grouped_topk if backend == "reference" else
              GROUPED_TOPK.kernel(backend, logits.requires_grad and torch.is_grad_enabled()))
    return kernel(logits, correction_bias, top_k, num_expert_group, topk_group, scoring_func,
                  group_scoring, renormalize, routed_scaling_factor, shared_expert_id)


# --- public API -------------------------------------------------------------------------

def grouped_topk(logits: torch.Tensor, top_k: int, *, num_expert_group: int = 1,
                 topk_group: int = 1, scoring_func: str = "sigmoid",
                 correction_bias: torch.Tensor | None = None,
                 group_scoring: str | None = None, renormalize: bool = True,
                 routed_scaling_factor: float = 1.0, shared_expert_id: int | None = None,
                 backend: str | None = None):
    """Fused grouped top-k gating of DeepSeek-V2/V3-style routers.

    logits: (T, E) float32 | bfloat16 | float16, last dimension contiguous.
    correction_bias: (E,) any float dtype; selects, never enters the weights.
    group_scoring: "top2_sum" | "max"; None means "top2_sum" with a bias, else "max".
    Returns topk_weights (T, top_k) float32 and topk_ids (T, top_k) int32, ordered by
    selection score descending, ties to the lower index (docs/gating.md).
    shared_expert_id: an id >= E: both outputs get a last column (T, top_k + 1) holding
    it with weight 1.0 for every token, the shared expert stacked after the routed ones
    (fused_moe_fp8 then runs it with them, as SGLang's fused shared experts).
    """
    if group_scoring is None:
        group_scoring = "top2_sum" if correction_bias is not None else "max"
    _check_args(logits, top_k, num_expert_group, topk_group, scoring_func, correction_bias,
                group_scoring)
    backend = GROUPED_TOPK.resolve(backend, logits)
    check_differentiable_kernel(OP, backend, {"logits": logits,
                                              "correction_bias": correction_bias})
    if backend == "triton" or backend == "cuda":
        _library.check_expert_limit(OP, backend, "gating_cuda_max_experts",
                                    "E (logits' columns)", logits.shape[1])
    if type(routed_scaling_factor) is not float or not _finite(routed_scaling_factor):
        check_scaling_factor(OP, routed_scaling_factor)
    if type(renormalize) is not bool:       # bool("false") is True
        check_bool(OP, "renormalize", renormalize)
    shared = _check_shared_expert_id(logits.shape[1], shared_expert_id)
    return grouped_topk_unchecked(backend, logits, correction_bias, top_k, num_expert_group,
                                  topk_group, scoring_func, group_scoring, renormalize,
                                  float(routed_scaling_factor), shared)


def update_correction_bias_(correction_bias: torch.Tensor, tokens_per_expert: torch.Tensor,
                            rate: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing step, in place and without host synchronisation:
    correction_bias (E,) float32 | bfloat16 | float16 | float64 += rate * sign(mean(count)
    - count).

    tokens_per_expert: (E,) any real dtype (counts of the last step); rate: a finite float
    >= 0 (a NaN or inf rate would turn the whole bias NaN / inf, and with it every later
    routing). Returns the bias."""
    op = "update_correction_bias_"
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(f"{op}: rate must be a float, got {type(rate).__name__}")
    if not (_finite(rate) and rate >= 0):
        raise ValueError(f"{op}: rate must be a finite float >= 0, got {rate!r}")
    check_float_tensor(op, "correction_bias", correction_bias, ndim=1)
    if correction_bias.dtype not in FLOAT_DTYPES_F64:   # no in-place add for fp8
        raise TypeError(f"{op}: correction_bias must be float32, bfloat16, float16 or float64 "
                        f"(updated in place by an add), got {correction_bias.dtype}")
    if correction_bias.shape[0] > 1 and correction_bias.stride(0) == 0:
        raise ValueError(f"{op}: correction_bias must not have elements sharing memory "
                         f"(stride 0, e.g. from expand), got strides {correction_bias.stride()}")
    check_tensor(op, "tokens_per_expert", tokens_per_expert, ndim=1)
    if tokens_per_expert.shape != correction_bias.shape:
        raise ValueError(f"{op}: tokens_per_expert must have shape {tuple(correction_bias.shape)}, "
                         f"got {tuple(tokens_per_expert.shape)}")
    check_same_device(op, "tokens_per_expert", tokens_per_expert, "correction_bias", correction_bias)
    counts = tokens_per_expert.double()
    step = torch.sign(counts.mean() - counts) * float(rate)
    with torch.no_grad():
        correction_bias.add_(step.to(correction_bias.dtype))
    return correction_bias
