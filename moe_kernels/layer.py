"""`DeepseekV3MoE`: HF transformers' DeepseekV3MoE as a drop-in module on our ops
(data flow and decisions: docs/architecture.md).

router: float32 linear -> grouped_topk (sigmoid, correction bias, top-2-sum groups)
routed experts + shared expert: fused_moe_fp8 (FP8 128x128 weights, 1x128 activations)

When the shared expert has the routed experts' width (n_shared_experts == 1, as in
DeepSeek-V3), it is stored as expert E of the stacked weights and every token routes to it
with weight 1: one fused_moe_fp8 call computes routed + shared, summed in float32 (SGLang's
"shared experts fusion"). Otherwise it runs on its own (quantize, then the expert MLP
over all rows: no permutation, every row goes to it) and is added.

With an `ep_group` (expert parallelism, docs/expert_parallel.md) each rank holds only its
placement's expert slots and the shared expert; forward gates locally, sends FP8 rows
to the experts' ranks (ep_dispatch), runs its slots on what it receives, and sums the
returned rows with the shared expert's in the same float32 sum as the one-device layer.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_kernels import checkpoint
from moe_kernels._library import BACKENDS
from moe_kernels._common import FLOAT_DTYPES, FP8, SCALE_BLOCK, cdiv, without_autocast
from moe_kernels._validate import (autodiff_possible, check_bool, check_choice,
                                   check_forward_only, check_int, check_tensor)
from moe_kernels.ops import expert_parallel as ep
from moe_kernels.ops import fp8, fused_moe, gating
from moe_kernels.ops import permute as perm
from moe_kernels.ops.fp8 import dequantize_fp8_block, quantize_fp8_block
from moe_kernels.reference import fp8 as ref_fp8
from moe_kernels.reference.gating import append_shared_expert

# FP8 formats other than e4m3fn: their checkpoint weights are dequantized with their
# weight_scale_inv and requantized to e4m3fn 128x128 blocks.
OTHER_FP8 = (torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)

CONFIG_FIELDS = ("hidden_size", "moe_intermediate_size", "n_routed_experts",
                 "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
                 "routed_scaling_factor", "norm_topk_prob")

# Config fields that name what the layer computes in one fixed way: the routing
# (DeepSeek's config.json has both; HF's DeepseekV3Config neither) and the experts'
# activation (HF's config has it). Where present, they must be V3's.
V3_FIXED = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "hidden_act": "silu"}

ROUTED_EXPERT_KEY = re.compile(r"experts\.(\d+)\.")


@without_autocast
def router_logits(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """x (T, H) any float dtype, gate_weight (E, H) float32 -> logits (T, E) float32: HF's
    router GEMM in float32, also inside a caller's autocast region."""
    return F.linear(x.float(), gate_weight)


class DeepseekV3MoE(nn.Module):
    """forward(hidden (..., H) bf16 | fp16 | fp32) -> (..., H) in hidden's dtype.

    Buffers: gate_weight (E, H) float32, e_score_correction_bias (E,) float32, w13
    (E [+1], 2I, H) and w2 (E [+1], H, I) float8_e4m3fn with 128x128 float32 scales
    (w13_scale, w2_scale); shared_w13 / shared_w2 (1, ...) only when the shared expert is
    not fused. Load weights with `from_hf` or `from_safetensors`.

    Expert parallelism: ep_group (a torch.distributed group) and placement (an
    ExpertPlacement; default uniform) make w13 / w2 (P / world, ...) hold this rank's slots
    (slot_experts: their logical experts) and shared_w13 / shared_w2 the shared expert.
    ep_mode "normal" or "low_latency" (needs max_tokens_per_rank: no pair is dropped while
    every rank has at most that many tokens); forward(hidden, mode=) overrides it per call,
    the same on every rank. Pairs a low-latency buffer could not take are added to
    ep_dropped (P,) int64 (zero it to reset)."""

    def __init__(self, *, hidden_size: int, moe_intermediate_size: int,
                 n_routed_experts: int, num_experts_per_tok: int, n_shared_experts: int = 1,
                 n_group: int = 1, topk_group: int = 1, routed_scaling_factor: float = 1.0,
                 norm_topk_prob: bool = True, device=None, backend: str | None = None,
                 ep_group=None, placement: ep.ExpertPlacement | None = None,
                 ep_mode: str = "normal", max_tokens_per_rank: int | None = None):
        super().__init__()
        H, I, E = hidden_size, moe_intermediate_size, n_routed_experts
        for name, value in (("hidden_size", H), ("moe_intermediate_size", I),
                            ("n_routed_experts", E), ("num_experts_per_tok", num_experts_per_tok),
                            ("n_group", n_group), ("topk_group", topk_group)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DeepseekV3MoE: {name} must be a positive int, got {value!r}")
        if (isinstance(n_shared_experts, bool) or not isinstance(n_shared_experts, int)
                or n_shared_experts < 0):
            raise ValueError(f"DeepseekV3MoE: n_shared_experts must be an int >= 0, got "
                             f"{n_shared_experts!r}")
        # grouped_topk's checks, once here: the layer routes through its unchecked layer,
        # where a NaN factor would make every output NaN and "false" would be a true flag
        gating.check_scaling_factor("DeepseekV3MoE", routed_scaling_factor)
        check_bool("DeepseekV3MoE", "norm_topk_prob", norm_topk_prob)
        check_choice("DeepseekV3MoE", "backend", backend, (None, *BACKENDS))
        # the routing configuration must be one grouped_topk takes: fail here, not at forward
        gating.check_routing_config("DeepseekV3MoE", E, num_experts_per_tok, n_group,
                                    topk_group)
        self.hidden_size, self.intermediate_size, self.num_experts = H, I, E
        self.top_k, self.n_group, self.topk_group = num_experts_per_tok, n_group, topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.norm_topk_prob = bool(norm_topk_prob)
        self.backend = backend
        self.shared_intermediate = I * n_shared_experts
        # a shared expert of the routed width is summed with the routed pairs in one
        # float32 sum; on one device it is stacked as expert E of w13 / w2
        self.shared_fused = n_shared_experts == 1
        kw = dict(device=device)
        self.ep_group = ep_group
        self.slot_experts = self._configure_ep(ep_group, placement, ep_mode,
                                               max_tokens_per_rank, kw)
        self.shared_stacked = self.shared_fused and ep_group is None
        stacked = len(self.slot_experts) + (1 if self.shared_stacked else 0)
        self.register_buffer("gate_weight", torch.zeros(E, H, dtype=torch.float32, **kw))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32, **kw))
        self._fp8_buffers("w13", (stacked, 2 * I, H), kw)
        self._fp8_buffers("w2", (stacked, H, I), kw)
        if n_shared_experts and not self.shared_stacked:
            self._fp8_buffers("shared_w13", (1, 2 * self.shared_intermediate, H), kw)
            self._fp8_buffers("shared_w2", (1, H, self.shared_intermediate), kw)

    def _configure_ep(self, group, placement, mode, max_tokens_per_rank, kw) -> list[int]:
        """Checks the expert-parallel arguments, keeps the placement's tables as buffers
        (they move with the layer), and returns the logical expert of each local slot."""
        op, E = "DeepseekV3MoE", self.num_experts
        if group is None:
            if placement is not None or max_tokens_per_rank is not None or mode != "normal":
                raise ValueError(f"{op}: placement, ep_mode and max_tokens_per_rank need an "
                                 f"ep_group")
            return list(range(E))
        if not dist.is_initialized():
            raise ValueError(f"{op}: ep_group given but torch.distributed is not initialized")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if rank < 0:
            raise ValueError(f"{op}: this process is not a member of ep_group")
        placement = ep.ExpertPlacement.uniform(E, world) if placement is None else placement
        if not isinstance(placement, ep.ExpertPlacement):
            raise TypeError(f"{op}: placement must be an ExpertPlacement, got "
                            f"{type(placement).__name__}")
        if placement.num_experts != E or placement.world_size != world:
            raise ValueError(f"{op}: placement is for {placement.num_experts} experts on "
                             f"{placement.world_size} ranks; the layer has {E} experts and "
                             f"ep_group {world} ranks")
        check_choice(op, "ep_mode", mode, ep.MODES)
        if max_tokens_per_rank is not None:
            check_int(op, "max_tokens_per_rank", max_tokens_per_rank, low=1)
        elif mode == "low_latency":
            raise ValueError(f"{op}: ep_mode='low_latency' needs max_tokens_per_rank")
        self.ep_mode, self.max_tokens_per_rank = mode, max_tokens_per_rank
        # configuration, not weights: kept out of state_dict
        for name in ("phy2log", "log2phy", "logcnt"):
            self.register_buffer("ep_" + name, getattr(placement, name).to(kw["device"]),
                                 persistent=False)
        self.register_buffer("ep_dropped", torch.zeros(placement.num_slots, dtype=torch.int64,
                                                       **kw), persistent=False)
        return placement.local_experts(rank).tolist()

    @property
    def placement(self) -> ep.ExpertPlacement | None:
        if self.ep_group is None:
            return None
        return ep.ExpertPlacement(self.ep_phy2log, self.ep_log2phy, self.ep_logcnt,
                                  dist.get_world_size(self.ep_group))

    def _fp8_buffers(self, name, shape, kw):
        self.register_buffer(name, torch.zeros(shape, dtype=FP8, **kw))
        scale_shape = (shape[0], cdiv(shape[1], SCALE_BLOCK), cdiv(shape[2], SCALE_BLOCK))
        self.register_buffer(name + "_scale", torch.ones(scale_shape, dtype=torch.float32, **kw))

    def _apply(self, fn, recurse=True):
        """Module.to / .cuda / .half / .bfloat16 route through here: device moves apply,
        casts do not. Every buffer's dtype is part of the layer's numerics (FP8 weights,
        their float32 scales, the float32 router and bias, as HF keeps a quantized model's
        scales), so `model.to(torch.bfloat16)` in a pipeline leaves them as they are."""
        if recurse:
            for child in self.children():
                child._apply(fn)
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            # where fn sends a tensor like this one, learnt from an empty one (no copy)
            probe = fn(torch.empty(0, dtype=buf.dtype, device=buf.device))
            self._buffers[name] = fn(buf) if probe.dtype == buf.dtype else \
                buf.to(device=probe.device)
        return self

    def extra_repr(self) -> str:
        """The configuration, as nn.Linear prints its sizes: what a printed model shows."""
        text = (f"hidden_size={self.hidden_size}, moe_intermediate_size="
                f"{self.intermediate_size}, n_routed_experts={self.num_experts}, "
                f"num_experts_per_tok={self.top_k}, n_shared_experts="
                f"{self.shared_intermediate // self.intermediate_size}, n_group={self.n_group}, "
                f"topk_group={self.topk_group}, routed_scaling_factor="
                f"{self.routed_scaling_factor}, norm_topk_prob={self.norm_topk_prob}, "
                f"backend={self.backend!r}")
        if self.ep_group is not None:
            text += (f", ep_mode={self.ep_mode!r}, max_tokens_per_rank="
                     f"{self.max_tokens_per_rank}, local_experts={len(self.slot_experts)}")
        return text

    def forward(self, hidden: torch.Tensor, *, mode: str | None = None) -> torch.Tensor:
        """Checks hidden once; the ops run through their unchecked internal layer. mode:
        with an ep_group, "normal" or "low_latency" for this call (default ep_mode)."""
        self._check_hidden("DeepseekV3MoE", "hidden", hidden, rows_only=False)
        if autodiff_possible():     # the experts have no backward
            check_forward_only("DeepseekV3MoE", hidden=hidden)
        if self.ep_group is None:
            if mode is not None:
                raise ValueError("DeepseekV3MoE: mode is for a layer with an ep_group")
        else:
            mode = self.ep_mode if mode is None else mode
            check_choice("DeepseekV3MoE", "mode", mode, ep.MODES)
        shape = hidden.shape
        x = hidden.reshape(-1, self.hidden_size).contiguous()
        backend = fused_moe.FUSED_MOE_FP8.resolve(self.backend, x)
        if self.shared_stacked:   # the router appends the shared expert's column itself
            w, ids = self._route(x, self.num_experts)
            out = self._expert_sum(backend, x, w, ids)
        elif self.ep_group is None:
            out = self._experts(backend, x, *self._route(x, -1))
        else:
            out = self._experts_ep(backend, x, *self._route(x, -1), mode)
        return out.view(shape)

    def _check_hidden(self, op: str, name: str, x, rows_only: bool) -> None:
        """x: float, on the weights' device, (T, hidden_size) where rows_only, else
        (..., hidden_size)."""
        check_tensor(op, name, x, ndim=2 if rows_only else None, dtypes=FLOAT_DTYPES)
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            lead = "T" if rows_only else "..."
            raise ValueError(f"{op}: {name} must have shape ({lead}, hidden_size="
                             f"{self.hidden_size}), got {tuple(x.shape)}")
        if x.device != self.w13.device:
            raise ValueError(f"{op}: {name} is on {x.device} but the weights are on "
                             f"{self.w13.device}")

    def route(self, x: torch.Tensor):
        """x (T, H) float -> (topk_weights (T, K) float32, topk_ids (T, K) int32): HF's
        router (differentiable w.r.t. x, as grouped_topk is)."""
        self._check_hidden("DeepseekV3MoE.route", "x", x, rows_only=True)
        return self._route(x, -1)

    def _route(self, x: torch.Tensor, shared_expert_id: int):
        """route, with grouped_topk's shared column (id shared_expert_id, weight 1) where
        shared_expert_id >= 0: no concatenation after it (four launches at decode)."""
        logits = router_logits(x, self.gate_weight)
        return gating.grouped_topk_unchecked(
            gating.GROUPED_TOPK.resolve(self.backend, logits), logits,
            self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group, "sigmoid",
            "top2_sum", self.norm_topk_prob, self.routed_scaling_factor, shared_expert_id)

    def experts(self, backend, x, topk_weights, topk_ids):
        """The one-device expert computation of routed pairs plus the shared expert: x (T,
        H) float, topk_weights (T, K) float, topk_ids (T, K) int32 | int64 (ids outside
        [0, E) add nothing) -> (T, H) in x's dtype. backend: as the ops' (None: the
        device's default); forward only, as forward is."""
        op = "DeepseekV3MoE.experts"
        if self.ep_group is not None:
            raise ValueError(f"{op}: this layer holds only its rank's experts")
        self._check_hidden(op, "x", x, rows_only=True)
        if autodiff_possible():
            check_forward_only(op, x=x, topk_weights=topk_weights)
        x = x.contiguous()        # any strides, as forward takes
        E = self.num_experts      # the routed experts' weights, the checks' shapes
        fused_moe.check_args(op, x, self.w13[:E], self.w13_scale[:E], self.w2[:E],
                             self.w2_scale[:E], topk_weights, topk_ids)
        backend = fused_moe.FUSED_MOE_FP8.resolve(backend, x)
        return self._experts(backend, x, topk_weights, topk_ids)

    def _experts(self, backend, x, w, ids):
        """experts() of checked arguments and a resolved backend."""
        if self.shared_stacked:   # the shared expert is expert E, weight 1 for every token
            w, ids = append_shared_expert(w, ids, self.num_experts)
        return self._expert_sum(backend, x, w, ids)

    def _expert_sum(self, backend, x, w, ids):
        """experts() of pairs that hold a stacked shared expert's column already, if any."""
        out = fused_moe.fused_moe_fp8_unchecked(backend, x, self.w13, self.w13_scale, self.w2,
                                                self.w2_scale, w, ids)
        if hasattr(self, "shared_w13"):
            self._add_shared_expert(backend, x, out)
        return out

    def _add_shared_expert(self, backend, x, out):
        """out (T, H) += the separate shared expert's rows of x, one pass per
        fused_moe.CHUNK_TOKENS tokens: its transient buffers are bounded whatever T is, as
        the routed experts' are. out is a fresh tensor of the caller's; adding in place
        rounds as `out + shared` does and saves a (T, H) buffer."""
        step = fused_moe.CHUNK_TOKENS
        for t0 in range(0, x.shape[0], step):
            out[t0:t0 + step].add_(self._shared_expert(backend, x[t0:t0 + step]))

    def _shared_expert(self, backend, x):
        """(T, H) in x's dtype: the shared expert's output rows. Every row goes to the one
        expert, so the rows need no permutation: quantize, then the MLP over all rows."""
        rows = list(fp8.quantize_fp8_per_token_group_unchecked(backend, x, SCALE_BLOCK, 1e-10,
                                                               False, False))
        gemm = fused_moe.dense_gemm(x.new_zeros(x.shape[0], dtype=torch.int32), backend)
        return fused_moe.expert_mlp(backend, gemm, rows, self.shared_w13, self.shared_w13_scale,
                                    self.shared_w2, self.shared_w2_scale, x.dtype)

    def _experts_ep(self, backend, x, w, ids, mode):
        """Dispatch FP8 rows (the experts quantize them anyway: the same bits, half the
        bytes), run this rank's slots on the received rows, send them back, and sum each
        token's rows in k order with the shared expert's last: the one-device sum."""
        low_latency = mode == "low_latency"
        if low_latency and self.max_tokens_per_rank is None:
            raise ValueError("DeepseekV3MoE: mode='low_latency' needs max_tokens_per_rank")
        (q, s), handle = ep.ep_dispatch(
            x, ids, w, self.placement, group=self.ep_group, mode=mode,
            max_tokens_per_rank=self.max_tokens_per_rank if low_latency else None,
            use_fp8=True, backend=backend)
        if low_latency:
            gemm = fused_moe.masked_gemm(handle.masked_m, backend)
            self.ep_dropped.add_(handle.dropped)
        else:
            gemm = fused_moe.segment_gemm(handle.layout, backend)
        received = [q, s]
        del q, s                  # expert_mlp frees the received rows after GEMM1
        z = fused_moe.expert_mlp(backend, gemm, received, self.w13, self.w13_scale, self.w2,
                                 self.w2_scale, x.dtype,
                                 masked_m=handle.masked_m if low_latency else None)
        rows = ep.combine_rows("DeepseekV3MoE", z, handle)
        del z                     # sent back: not held through the shared expert and the sum
        row_of_pair = handle.row_of_pair
        if self.shared_fused:
            T = x.shape[0]
            shared_rows = rows.shape[0] + torch.arange(T, dtype=torch.int32, device=x.device)
            rows = torch.cat([rows, self._shared_expert(backend, x)])
            row_of_pair = torch.cat([row_of_pair, shared_rows[:, None]], dim=1)
            w = torch.cat([w, w.new_ones(T, 1)], dim=1)
        out = perm.unpermute_unchecked(backend, rows, row_of_pair, w)
        if hasattr(self, "shared_w13") and not self.shared_fused:
            self._add_shared_expert(backend, x, out)
        return out

    # --- loading --------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config, *, device=None, backend: str | None = None,
                    **ep_args) -> "DeepseekV3MoE":
        """An unloaded layer from an HF DeepseekV3Config-like object or a dict (config.json
        as read; its CONFIG_FIELDS); ep_args: ep_group, placement, ep_mode,
        max_tokens_per_rank. A config that names another routing (DeepSeek-V2's softmax,
        greedy top-k) or activation is refused: the layer would compute it as V3 without a
        word."""
        if isinstance(config, Mapping):
            config = SimpleNamespace(**config)
        for field, ours in V3_FIXED.items():
            value = getattr(config, field, None)
            if value is not None and value != ours:
                raise ValueError(f"DeepseekV3MoE: config has {field}={value!r}; the layer "
                                 f"computes DeepSeek-V3's {field}={ours!r}")
        missing = [f for f in CONFIG_FIELDS if not hasattr(config, f)]
        if missing:
            raise ValueError(f"DeepseekV3MoE: config lacks {', '.join(missing)}")
        return cls(**{f: getattr(config, f) for f in CONFIG_FIELDS}, device=device,
                   backend=backend, **ep_args)

    @classmethod
    def from_hf(cls, config, state_dict: dict, prefix: str = "", *, device=None,
                backend: str | None = None, strict: bool = True,
                **ep_args) -> "DeepseekV3MoE":
        """From an HF DeepseekV3Config-like object and the MoE's state dict (keys under
        prefix: gate.weight, gate.e_score_correction_bias, shared_experts.*, and the routed
        experts as experts.{i}.{gate,up,down}_proj.weight [+ .weight_scale_inv] or fused
        experts.gate_up_proj (E, 2I, H) / experts.down_proj (E, H, I)). Float weights are
        quantized to 128x128 FP8 blocks; e4m3fn ones are taken as they are, other FP8
        formats dequantized with their weight_scale_inv and requantized. Keys under prefix
        that no weight is read from raise ValueError with strict (as load_state_dict does),
        else a warning; keys outside prefix are not looked at. ep_args (ep_group,
        placement, ep_mode, max_tokens_per_rank): an expert-parallel layer, which reads
        only its rank's experts (and the shared expert); the other ranks' expert keys are
        expected and skipped."""
        layer = cls.from_config(config, device=device, backend=backend, **ep_args)
        layer._load(state_dict, prefix, device, strict)
        return layer

    def _load(self, state_dict, prefix, device, strict):
        loader = _Loader(self, state_dict, prefix, device)
        loader.load()
        unexpected = loader.unexpected()
        if unexpected:
            shown = ", ".join(repr(k) for k in unexpected[:5])
            more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
            message = (f"DeepseekV3MoE.from_hf: unexpected keys under {prefix!r}: {shown}{more} "
                       f"(no weight is read from them; strict=False to ignore them)")
            if strict:
                raise ValueError(message)
            warnings.warn(message, stacklevel=3)

    def other_ranks_key(self, key: str) -> bool:
        """Whether a key (without prefix) is a routed expert this rank does not hold."""
        m = ROUTED_EXPERT_KEY.match(key)
        return bool(m) and int(m.group(1)) < self.num_experts and \
            int(m.group(1)) not in self.slot_experts

    @classmethod
    def from_safetensors(cls, directory: str, layer: int, config=None, *, device=None,
                         backend: str | None = None, strict: bool = True,
                         **ep_args) -> "DeepseekV3MoE":
        """Layer `layer`'s MoE from a (sharded) safetensors checkpoint directory, reading
        only its tensors (keys model.layers.{layer}.mlp.*; with ep_args, not the other
        ranks' experts); config defaults to the directory's config.json."""
        if config is None:
            with open(os.path.join(directory, "config.json")) as f:
                config = SimpleNamespace(**json.load(f))
        module = cls.from_config(config, device=device, backend=backend, **ep_args)
        prefix = f"model.layers.{layer}.mlp."
        tensors = checkpoint.load_prefix(
            directory, prefix, keep=lambda name: not module.other_ranks_key(name[len(prefix):]))
        if not tensors:
            raise KeyError(f"{directory}: no tensors under {prefix!r} (is layer {layer} an "
                           f"MoE layer?)")
        module._load(tensors, prefix, device, strict)
        return module


class _Loader:
    """Fills a DeepseekV3MoE's buffers from a state dict, checking every key and shape."""

    def __init__(self, layer: DeepseekV3MoE, state_dict: dict, prefix: str, device):
        self.layer, self.sd, self.prefix, self.device = layer, state_dict, prefix, device
        self.used: set[str] = set()

    def get(self, key: str, shape: tuple) -> torch.Tensor:
        full = self.prefix + key
        if full not in self.sd:
            raise KeyError(f"DeepseekV3MoE: missing key {full!r}")
        self.used.add(full)
        t = self.sd[full]
        check_tensor("DeepseekV3MoE", repr(full), t)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"DeepseekV3MoE: {full!r} must have shape {tuple(shape)}, got "
                             f"{tuple(t.shape)}")
        return t.to(self.device) if self.device is not None else t

    def fp8_block(self, key: str, shape: tuple):
        """(q, scale) of a weight: FP8 with its weight_scale_inv, or a float one quantized."""
        w = self.get(key, shape)
        if w.dtype == FP8 or w.dtype in OTHER_FP8:
            scale_key = key[:-len("weight")] + "weight_scale_inv"
            s = self.get(scale_key, (cdiv(shape[0], SCALE_BLOCK), cdiv(shape[1], SCALE_BLOCK)))
            if w.dtype == FP8:
                return w, s.float()
            # another FP8 format: its real values (w * scale, per 128x128 block), requantized
            return quantize_fp8_block(ref_fp8.dequantize_fp8_block(w, s, dtype=torch.float32))
        if not w.is_floating_point():
            raise TypeError(f"DeepseekV3MoE: {self.prefix + key!r} must be a float or "
                            f"float8_e4m3fn tensor, got {w.dtype}")
        return quantize_fp8_block(w.float())

    def mlp(self, key: str, inter: int):
        """(w13 (2I, H), its scales, w2 (H, I), its scales) of one expert's three
        projections; gate and up are stacked by 128-row blocks, so an I that is not a
        multiple of 128 is requantized from the dequantized halves."""
        H = self.layer.hidden_size
        g, gs = self.fp8_block(f"{key}.gate_proj.weight", (inter, H))
        u, us = self.fp8_block(f"{key}.up_proj.weight", (inter, H))
        d, ds = self.fp8_block(f"{key}.down_proj.weight", (H, inter))
        if inter % 128:
            both = torch.cat([dequantize_fp8_block(g, gs, dtype=torch.float32),
                              dequantize_fp8_block(u, us, dtype=torch.float32)])
            w13, s13 = quantize_fp8_block(both)
        else:
            w13, s13 = torch.cat([g, u]), torch.cat([gs, us])
        return w13, s13, d, ds

    def load(self) -> None:
        m = self.layer
        E, H, I = m.num_experts, m.hidden_size, m.intermediate_size
        with torch.no_grad():
            m.gate_weight.copy_(self.get("gate.weight", (E, H)).float())
            bias = self.get("gate.e_score_correction_bias", (E,)).float()
            # grouped_topk reads the bias without checking its values (that would be a host
            # sync per call): a NaN or inf would silently exclude or force experts
            if not torch.isfinite(bias).all():
                raise ValueError(f"DeepseekV3MoE: {self.prefix}gate.e_score_correction_bias "
                                 f"has non-finite values")
            m.e_score_correction_bias.copy_(bias)
            if self.prefix + "experts.gate_up_proj" in self.sd:
                self._fused_experts(E, H, I)
            else:
                loaded = {}   # a replicated expert is read once
                for slot, e in enumerate(m.slot_experts):
                    if e not in loaded:
                        loaded[e] = self.mlp(f"experts.{e}", I)
                    self._put("w13", "w2", slot, loaded[e])
            if m.shared_intermediate:
                parts = self.mlp("shared_experts", m.shared_intermediate)
                if m.shared_stacked:
                    self._put("w13", "w2", E, parts)
                else:
                    self._put("shared_w13", "shared_w2", 0, parts)

    def unexpected(self) -> list[str]:
        """Keys under the prefix that no weight was read from (as load_state_dict reports),
        other ranks' experts aside."""
        n = len(self.prefix)
        return sorted(k for k in self.sd if k.startswith(self.prefix) and k not in self.used
                      and not self.layer.other_ranks_key(k[n:]))

    def _fused_experts(self, E, H, I):
        """transformers >= 5: experts.gate_up_proj (E, 2I, H), gate rows first, and
        experts.down_proj (E, H, I), float; quantized per slot's expert."""
        gate_up = self.get("experts.gate_up_proj", (E, 2 * I, H))
        down = self.get("experts.down_proj", (E, H, I))
        for key, t in (("experts.gate_up_proj", gate_up), ("experts.down_proj", down)):
            if not t.is_floating_point() or t.dtype == FP8:
                raise TypeError(f"DeepseekV3MoE: {self.prefix + key!r} must be a bf16/fp16/"
                                f"fp32 tensor (the fused layout has no FP8 scales), got {t.dtype}")
        for slot, e in enumerate(self.layer.slot_experts):
            w13, s13 = quantize_fp8_block(gate_up[e].float())
            w2, s2 = quantize_fp8_block(down[e].float())
            self._put("w13", "w2", slot, (w13, s13, w2, s2))

    def _put(self, n13, n2, e, parts):
        w13, s13, w2, s2 = parts
        m = self.layer
        getattr(m, n13)[e].copy_(w13)
        getattr(m, n13 + "_scale")[e].copy_(s13)
        getattr(m, n2)[e].copy_(w2)
        getattr(m, n2 + "_scale")[e].copy_(s2)
