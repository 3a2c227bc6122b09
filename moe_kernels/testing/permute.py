"""Permutation ops: moe_align_block_size, permute, permute_masked, unpermute. Row copies
and index tensors compare exactly; unpermute's weighted sums by the per-dtype rule.

moe_align_block_size is compared as its consumers (vLLM's fused_moe kernel) read it: the
first num_tokens_post_padded entries, each expert's block run as a multiset of pair
indices (padding = T*K included), expert_ids over the used blocks. The order inside an
expert's run and the entries past the end are the implementation's (vLLM's kernel writes
them in atomics order); ours are ascending, which tests/test_permute.py holds us to."""

from __future__ import annotations

import torch

from moe_kernels.testing import rules
from moe_kernels.testing.core import Case, OpSpec, register
from moe_kernels.testing.inputs import (expanded_rows, fp8_rows, pick, row_strided, small,
                                        topk_ids)

FP8 = torch.float8_e4m3fn


FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def _random_routings(g, dev, n=6):
    """(name, why, topk_ids, E) of drawn T, K, E, with a fifth of the pairs skipped."""
    out = []
    for i in range(n):
        T, K = small(g, 30), pick(g, [1, 2, 4])
        E = K + small(g, 12)
        out.append((f"random_{i}", f"T={T} K={K} E={E}",
                    topk_ids(g, T, K, E, skipped=0.2, device=dev), E))
    return out


def _one_expert(T, K, e, dev):
    """Every pair on expert e (each token's other slots skipped)."""
    ids = torch.full((T, K), -1, dtype=torch.int32, device=dev)
    ids[:, 0] = e
    return ids


def _id_cases(g, dev, make):
    """The routing failure modes every permutation op meets, as (name, why, ids, E)."""
    strided = torch.stack([torch.randperm(10, generator=g)[:6] for _ in range(5)]).int()
    wrong = topk_ids(g, 6, 3, 9, device=dev)
    wrong[0, 1], wrong[2, 0], wrong[4, 2] = -1, 9, 40   # skipped: -1 and ids >= E
    return [make(*c) for c in (
        ("empty", "T = 0", topk_ids(g, 0, 2, 8, device=dev), 8),
        ("one_token", "T = 1", topk_ids(g, 1, 4, 8, device=dev), 8),
        ("all_on_one_expert", "one expert has every pair, the others none",
         _one_expert(9, 2, 3, dev), 5),
        ("skipped_ids", "-1 and ids >= E are skipped everywhere", wrong, 9),
        ("experts_not_power_of_two", "E = 7, uneven loads",
         topk_ids(g, 11, 3, 7, device=dev), 7),
        ("fewer_pairs_than_experts", "T*K < E: most experts empty",
         topk_ids(g, 2, 2, 16, device=dev), 16),
        ("int64_strided_ids", "int64 ids, a column slice (row stride 6)",
         row_strided(strided.long().to(dev), 3), 10),
        ("no_pairs", "K = 0: no pair at all, every row padding",
         torch.zeros(4, 0, dtype=torch.int32, device=dev), 8),
    )]


# --- moe_align_block_size ----------------------------------------------------------------

def _align_cases(preset, g, dev):
    mk = lambda name, why, ids, E, block=4: Case(
        "moe_align_block_size", name, dict(topk_ids=ids, num_experts=E, block_size=block), why)
    if preset == "edge":
        return _id_cases(g, dev, mk) + [
            mk("partial_blocks_block16", "segments padded to 16 from odd counts",
               topk_ids(g, 13, 3, 6, device=dev), 6, 16),
            mk("block_size_1", "block 1: no padding at all", topk_ids(g, 7, 2, 5, device=dev),
               5, 1)]
    if preset == "deepseek_v3":
        T = 4096 if dev.type == "cuda" else 256
        return [mk(f"T{t}", "E=256, top-8, block 128 (fused_moe's BLOCK_M)",
                   topk_ids(g, t, 8, 256, device=dev), 256, 128) for t in (1, 64, T)]
    return [mk(f"random_{i}", "drawn T, K, E, block", topk_ids(g, T, K, E, skipped=0.1,
                                                             device=dev), E, block)
            for i, (T, K, E, block) in enumerate(
                (small(g, 50), K, K + small(g, 20), pick(g, [1, 2, 16, 64]))
                for K in [pick(g, [1, 2, 4, 8]) for _ in range(6)])]


def _align_outputs(r):
    return {"sorted_token_ids": r[0], "expert_ids": r[1], "num_tokens_post_padded": r[2]}


def compare_align(got: dict, want: dict, case=None) -> list:
    n_v = rules.exact("num_tokens_post_padded", got["num_tokens_post_padded"],
                      want["num_tokens_post_padded"])
    if not n_v.passed:
        return [n_v]
    if case is None:   # the outputs do not determine the block size
        raise ValueError("compare('moe_align_block_size', ...) needs the case (its block_size)")
    n, block = int(want["num_tokens_post_padded"][0]), case.inputs["block_size"]
    verdicts = [n_v]
    s_g, e_g = got["sorted_token_ids"], got["expert_ids"]
    s_w, e_w = want["sorted_token_ids"], want["expert_ids"]
    blocks = -(-n // block)
    for name, t, need in (("sorted_token_ids", s_g, n), ("expert_ids", e_g, blocks)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() < need:
            verdicts.append(rules.Verdict(name, "length", False, float("inf"), None,
                                          f"needs at least {need} entries"))
    if len(verdicts) > 1:
        return verdicts
    verdicts.append(rules.exact("expert_ids (used blocks)", e_g[:blocks].cpu().to(e_w.dtype),
                                e_w[:blocks].cpu()))
    expert_of = e_w.cpu().long().repeat_interleave(block)[:n]
    span = int(s_w.numel()) + 1
    key = lambda s: torch.sort(expert_of * span + s[:n].cpu().long())[0]
    verdicts.append(rules.exact("sorted_token_ids (per-expert multiset)", key(s_g), key(s_w)))
    return verdicts


# --- permute / permute_masked --------------------------------------------------------------

def _layout_outputs(r):
    rows, layout = r
    out = {"permuted": rows}
    for name in layout._fields:
        value = getattr(layout, name)
        if value is not None:
            out[f"layout.{name}"] = value
    return out


def _compare_exact(got: dict, want: dict, case=None) -> list:
    missing = [k for k in want if k not in got]
    return [rules.Verdict(k, "exact", False, float("inf"), None, "missing") for k in missing] \
        + [rules.exact(k, got[k], want[k]) for k in want if k in got]


def _hidden(g, T, H, dev, dtype=torch.bfloat16):
    return torch.randn(T, H, generator=g).to(dtype).to(dev)


def _permute_cases(op, extra: dict):
    def make_cases(preset, g, dev):
        H = 48
        def mk(name, why, ids, E, **kw):
            T = ids.shape[0]
            inputs = dict(hidden=_hidden(g, T, H, dev), topk_ids=ids, num_experts=E)
            inputs.update(extra)
            inputs.update(kw)
            return Case(op, name, inputs, why)
        if preset == "edge":
            ids = topk_ids(g, 10, 2, 6, device=dev)
            q, s = fp8_rows(g, 10, 256, dev)
            return _id_cases(g, dev, mk) + [
                mk("row_strided_hidden", "hidden a column slice (row stride > H)", ids, 6,
                   hidden=row_strided(_hidden(g, 10, 2 * H, dev), H)),
                mk("expanded_hidden", "hidden one row expanded (row stride 0)", ids, 6,
                   hidden=expanded_rows(_hidden(g, 1, H, dev), 10)),
                mk("fp8_rows_with_scales", "FP8 rows copied bit for bit, scales alongside",
                   ids, 6, hidden=q, scales=s),
                mk("nan_rows", "NaN and inf values are copied, not computed on", ids, 6,
                   hidden=_hidden(g, 10, H, dev).index_fill_(1, torch.tensor([3], device=dev),
                                                             float("nan"))),
                mk("zero_width_rows", "H = 0: rows of no element", ids, 6,
                   hidden=_hidden(g, 10, 0, dev)),
            ]
        if preset == "deepseek_v3":
            H = 7168 if dev.type == "cuda" else 1024
            T = 4096 if dev.type == "cuda" else 128
            cases = []
            for t in (1, T):
                q, s = fp8_rows(g, t, H, dev)
                cases.append(mk(f"T{t}_fp8", "E=256, top-8, FP8 rows with 1x128 scales",
                                topk_ids(g, t, 8, 256, device=dev), 256, hidden=q, scales=s))
            return cases
        return [mk(name, why, ids, E, hidden=_hidden(g, ids.shape[0], pick(g, [1, 16, 200]), dev,
                                              pick(g, FLOATS)))
                for name, why, ids, E in _random_routings(g, dev)]
    return make_cases




# --- unpermute -------------------------------------------------------------------------

def _unpermute_case(g, dev, name, why, ids, E, *, H=40, dtype=torch.bfloat16, masked=False,
                    weights_dtype=torch.float32):
    import moe_kernels
    T, K = ids.shape
    hidden = _hidden(g, T, H, dev, dtype)
    if masked:
        rows, layout = moe_kernels.permute_masked(hidden, ids, E, 3, backend="reference")
    else:
        rows, layout = moe_kernels.permute(hidden, ids, E, align=4, backend="reference")
    expert_out = torch.randn(rows.shape, generator=g).to(dtype).to(dev)
    # rows no pair reads hold NaN: a skipped pair that reads its (clamped) row and multiplies
    # by zero leaks NaN into the output
    unread = torch.ones(expert_out.shape[:-1].numel(), dtype=torch.bool, device=dev)
    read = layout.row_of_pair.reshape(-1).long()
    unread[read[read >= 0]] = False
    expert_out.flatten(0, -2)[unread] = float("nan")
    weights = torch.rand(T, K, generator=g).to(weights_dtype).to(dev)
    return Case("unpermute", name, dict(expert_out=expert_out, layout=layout,
                                        topk_weights=weights), why)


def _unpermute_cases(preset, g, dev):
    mk = lambda name, why, ids, E, **kw: _unpermute_case(g, dev, name, why, ids, E, **kw)
    if preset == "edge":
        ids = topk_ids(g, 8, 3, 6, skipped=0.3, device=dev)
        return _id_cases(g, dev, mk) + [
            mk("masked_layout_overflow", "a MaskedLayout whose experts overflowed M = 3",
               topk_ids(g, 12, 2, 4, device=dev), 4, masked=True),
            mk("float16_out_bf16_weights", "fp16 rows, bf16 weights", ids, 6,
               dtype=torch.float16, weights_dtype=torch.bfloat16),
            mk("float32_rows", "float32 rows: float32 bounds", ids, 6, dtype=torch.float32),
            mk("zero_width_rows", "H = 0: rows of no element", ids, 6, H=0),
        ]
    if preset == "deepseek_v3":
        H = 7168 if dev.type == "cuda" else 1024
        T = 4096 if dev.type == "cuda" else 128
        return [mk(f"T{t}", "E=256, top-8, bf16 rows", topk_ids(g, t, 8, 256, device=dev), 256,
                   H=H) for t in (1, T)]
    return [mk(name, why, ids, E, H=pick(g, [1, 16, 130]), dtype=pick(g, FLOATS),
               masked=pick(g, [False, True])) for name, why, ids, E in _random_routings(g, dev)]


def compare_unpermute(got: dict, want: dict, case=None) -> list:
    return [rules.close("out", got["out"], want["out"])]


register(
    OpSpec("moe_align_block_size", ("topk_ids", "num_experts", "block_size"), _align_cases,
           _align_outputs, compare_align),
    OpSpec("permute", ("hidden", "topk_ids", "num_experts"),
           _permute_cases("permute", dict(align=4)), _layout_outputs, _compare_exact),
    OpSpec("permute_masked", ("hidden", "topk_ids", "num_experts", "max_tokens_per_expert"),
           _permute_cases("permute_masked", dict(max_tokens_per_expert=3)), _layout_outputs, _compare_exact),
    OpSpec("unpermute", ("expert_out", "layout", "topk_weights"), _unpermute_cases,
           lambda r: {"out": r}, compare_unpermute),
)
