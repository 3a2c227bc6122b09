"""grouped_topk: cases and rule. The rule compares each row's chosen experts as a set (the
order inside a row is the implementation's: vLLM and SGLang return torch.topk's or their
kernel's order) and the weights matched by expert id; which experts a tie chooses is not
free: equal scores go to the lower index (docs/api.md, grouped_topk rule 6). Where the
reference scores two candidates of different inputs within NEAR_TIE of each other, either
order passes (`acceptable_rows`), with the weights the reference gives the chosen ids."""

from __future__ import annotations

import itertools

import torch

from moe_kernels.reference import gating as reference
from moe_kernels.testing import rules
from moe_kernels.testing.core import Case, OpSpec, register
from moe_kernels.testing.inputs import pick, row_strided, small


def _case(name, why, logits, top_k, *, groups=1, topk_group=1, bias=None, scoring="sigmoid",
          group_scoring=None, renormalize=True, scale=1.0):
    return Case("grouped_topk", name, dict(
        logits=logits, top_k=top_k, num_expert_group=groups, topk_group=topk_group,
        scoring_func=scoring, correction_bias=bias, group_scoring=group_scoring,
        renormalize=renormalize, routed_scaling_factor=scale), why)


def _edge(g, dev):
    E = 16
    rnd = lambda T, E=E: torch.randn(T, E, generator=g).to(dev)
    bias = (torch.rand(E, generator=g) * 0.1).to(dev)
    ds = dict(groups=4, topk_group=2, bias=bias, scale=2.5)   # DeepSeek-V3's rules, E = 16
    special = rnd(6)
    special[0] = float("nan")                         # a row of NaN: ids still valid, distinct
    special[1, ::3] = float("nan")
    special[2, 5] = float("inf")
    special[3, :] = float("-inf")                      # sigmoid 0 everywhere: zero weight sum
    special[4, 2:9] = float("inf")
    strong = torch.zeros(E, device=dev)
    strong[[1, 6, 11, 14]] = 5.0                       # selects these whatever the scores
    return [
        _case("empty", "T = 0: shapes (0, K), no launch over nothing", rnd(0), 4, **ds),
        _case("one_token", "T = 1, the decode step", rnd(1), 4, **ds),
        _case("all_ties", "every score equal: the lowest indices (and groups) win",
              torch.zeros(5, E, device=dev), 4, groups=4, topk_group=2),
        _case("ties_in_groups", "integer logits: ties inside and between groups",
              torch.randint(-2, 3, (9, E), generator=g).float().to(dev), 4, **ds),
        _case("bias_selects_only", "a bias that decides the choice must not enter the "
              "weights", rnd(7), 4, groups=4, topk_group=2, bias=strong, scale=2.5),
        _case("nan_inf_rows", "NaN counts as -inf, +-inf scores, an all -inf row",
              special, 4, **ds),
        _case("softmax_inf", "softmax with +inf entries sharing the mass, an all -inf row",
              special, 3, groups=4, topk_group=2, scoring="softmax"),
        _case("experts_not_power_of_two", "E = 12 in 3 groups of 4", rnd(6, 12), 3, groups=3,
              topk_group=2, bias=(torch.rand(12, generator=g) * 0.1).to(dev)),
        _case("row_strided_logits", "logits a column slice of a wider tensor (row stride "
              "!= E)", row_strided(rnd(5, 24), 16), 4, **ds),
        _case("bf16_logits", "bfloat16 logits, scores in float32", rnd(8).bfloat16(), 4, **ds),
        _case("no_renormalize_max_groups", "renormalize=False, groups scored by their max",
              rnd(6), 4, groups=4, topk_group=3, group_scoring="max", scale=1.5),
        _case("top_k_equals_E", "every expert chosen: weights in id order", rnd(3, 8), 8),
    ]


def _deepseek_v3(g, dev):
    big = 4096 if dev.type == "cuda" else 256
    bias = (torch.rand(256, generator=g) * 0.1).to(dev)
    out = []
    for T in (1, 64, big):
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(T, 256, generator=g).to(dtype).to(dev)
            out.append(_case(f"T{T}_{str(dtype)[6:]}", "DeepSeek-V3: E=256, top-8, 8 groups "
                             "/ 4, bias, scale 2.5", logits, 8, groups=8, topk_group=4,
                             bias=bias, scale=2.5))
    return out


def _random(g, dev):
    out = []
    for i in range(8):
        groups, per = pick(g, [1, 2, 4, 8]), pick(g, [2, 3, 4, 8, 32])
        E = groups * per
        topk_group = int(torch.randint(1, groups + 1, (1,), generator=g))
        K = int(torch.randint(1, topk_group * per + 1, (1,), generator=g))
        T = small(g, 40)
        logits = torch.randn(T, E, generator=g) * pick(g, [0.1, 1.0, 10.0])
        if pick(g, [False, True]):
            logits = torch.round(logits)                       # ties
        logits = logits.to(pick(g, [torch.float32, torch.bfloat16, torch.float16])).to(dev)
        bias = (torch.rand(E, generator=g) * 0.2).to(dev) if pick(g, [False, True]) else None
        out.append(_case(f"random_{i}", f"T={T} E={E} groups={groups}/{topk_group} K={K}",
                         logits, K, groups=groups, topk_group=topk_group, bias=bias,
                         scoring=pick(g, ["sigmoid", "softmax"]),
                         renormalize=pick(g, [True, False]),
                         scale=pick(g, [1.0, 2.5])))
    return out


def _cases(preset, g, dev):
    return {"edge": _edge, "deepseek_v3": _deepseek_v3, "random": _random}[preset](g, dev)


def by_id(weights: torch.Tensor, ids: torch.Tensor):
    """Each row's (ids, weights) sorted by id: the order a row is returned in is free."""
    ids = ids.detach().cpu()
    order = ids.long().argsort(dim=-1, stable=True)
    return weights.detach().cpu().gather(-1, order), ids.gather(-1, order)


# Two candidates (experts, or groups) of different inputs that the reference scores this
# close (relative to the larger magnitude, at least absolute) may come in either order:
# each backend's exp differs from torch's by an ulp, and two groups' top-two sums of other
# terms round apart (a drawn case: s(-2) + 0.5 + s(2) formed in two orders, equal in the
# reference's float32, an ulp apart in the cpu kernel's, which kept the other group).
NEAR_TIE = 1e-5


def _near(u: float, v: float) -> bool:
    return u == v or abs(u - v) <= NEAR_TIE * max(1.0, abs(u), abs(v))


def acceptable_rows(ids: torch.Tensor, logits: torch.Tensor, top_k: int, *,
                    num_expert_group: int = 1, topk_group: int = 1,
                    scoring_func: str = "sigmoid", correction_bias=None, group_scoring=None,
                    ordered: bool = True, **_) -> torch.Tensor:
    """(T,) bool: whether each row of ids (T, top_k) is a choice the contract allows for
    these grouped_topk arguments: the reference's, or one that orders candidates of
    different inputs the other way where the reference scores them within NEAR_TIE of each
    other (experts by selection score, groups by group score). Candidates of the same
    inputs (an expert's logit and bias; a group's top-two (logit, bias) pairs) score the
    same on every backend, so they follow the lower-index rule exactly. ordered: the order
    within a row counts (descending score); else each row is a set. grouped_topk's other
    keyword arguments are taken and ignored (a case's inputs pass as they are)."""
    if group_scoring is None:
        group_scoring = "top2_sum" if correction_bias is not None else "max"
    logits = logits.detach().cpu()
    bias = None if correction_bias is None else correction_bias.detach().cpu()
    _, want = reference.select_experts(logits, top_k, num_expert_group, topk_group,
                                       scoring_func, bias, group_scoring)
    ids = ids.detach().cpu().long()
    if ids.shape != want.shape:
        return torch.zeros(ids.shape[0], dtype=torch.bool)
    same = (ids == want) if ordered else (ids.sort(-1).values == want.sort(-1).values)
    ok = same.all(-1) if ids.numel() else torch.ones(ids.shape[0], dtype=torch.bool)
    if bool(ok.all()):
        return ok
    _, b = reference.selection_scores(logits, scoring_func, bias)
    gs = reference.group_scores(b, num_expert_group, group_scoring)
    x = reference.clean_logits(logits)
    terms = torch.stack([x, torch.zeros_like(x) if bias is None else
                         bias.float().expand_as(x)], -1)
    for t in (~ok).nonzero().flatten().tolist():
        row = _Row(b[t].tolist(), gs[t].tolist(), [tuple(p) for p in terms[t].tolist()],
                   num_expert_group, topk_group, group_scoring)
        ok[t] = row.allows(ids[t].tolist(), ordered)
    return ok


class _Row:
    """One row's candidates: selection scores b (E), group scores gs (G) and each
    expert's inputs (logit, bias), for `acceptable_rows`."""

    def __init__(self, b, gs, terms, G, topk_group, group_scoring):
        self.b, self.gs, self.terms, self.G, self.tg = b, gs, terms, G, topk_group
        self.size = len(b) // G
        top = 2 if group_scoring == "top2_sum" else 1
        self.group_terms = [sorted(terms[i] for i in sorted(
            range(g * self.size, (g + 1) * self.size), key=lambda i: (-b[i], i))[:top])
            for g in range(G)]

    def allows(self, ids: list, ordered: bool) -> bool:
        if len(set(ids)) != len(ids) or not all(0 <= i < len(self.b) for i in ids):
            return False
        return any(self._choice_within(ids, kept, ordered) for kept in self._kept_groups())

    def _kept_groups(self):
        """The sets of kept groups the near-tie rule allows (all groups where none is
        dropped; the combinations are few at the sizes tested, C(8, 4) = 70)."""
        if self.tg >= self.G:
            yield set(range(self.G))
            return
        for kept in itertools.combinations(range(self.G), self.tg):
            if all(self._may_precede(self.gs, self.group_terms, g, h)
                   for g in kept for h in range(self.G) if h not in kept):
                yield set(kept)

    @staticmethod
    def _may_precede(score, terms, i, j) -> bool:
        """Candidate i may come before j: it ranks above j (larger score, or equal and a
        lower index), or the two are near-tied candidates of different inputs."""
        above = score[i] > score[j] or (score[i] == score[j] and i < j)
        return above or (terms[i] != terms[j] and _near(score[i], score[j]))

    def _choice_within(self, ids, kept, ordered) -> bool:
        if any(i // self.size not in kept for i in ids):
            return False
        chosen = set(ids)
        rest = [j for j in range(len(self.b)) if j // self.size in kept and j not in chosen]
        if not all(self._may_precede(self.b, self.terms, i, j) for i in ids for j in rest):
            return False
        return not ordered or all(self._may_precede(self.b, self.terms, ids[p], ids[q])
                                  for p in range(len(ids)) for q in range(p + 1, len(ids)))


def compare_topk(got: dict, want: dict, case=None) -> list:
    w_g, i_g = got["topk_weights"], got["topk_ids"]
    w_w, i_w = want["topk_weights"], want["topk_ids"]
    shape = [rules.exact("topk_ids", i_g, i_w)]   # shape / dtype first, in the given order
    if not isinstance(i_g, torch.Tensor) or tuple(i_g.shape) != tuple(i_w.shape) or \
            not isinstance(w_g, torch.Tensor) or tuple(w_g.shape) != tuple(w_w.shape):
        return shape + [rules.close("topk_weights", w_g, w_w)]
    if case is not None and i_g.dim() == 2:
        i_w, w_w = _accepted_choice(i_g, i_w, w_w, case.inputs)
    sw_g, si_g = by_id(w_g, i_g)
    sw_w, si_w = by_id(w_w, i_w)
    ids = rules.exact("topk_ids (as a set per row)", si_g.to(si_w.dtype), si_w)
    if i_g.dtype != i_w.dtype:
        ids = rules.Verdict("topk_ids", "exact", False, float("inf"), None,
                            f"dtype {i_g.dtype}, expected {i_w.dtype}")
    return [ids, rules.close("topk_weights (by expert id)", sw_g, sw_w, torch.float32)]


def _accepted_choice(i_g, i_w, w_w, inputs: dict):
    """(ids, weights) to hold got to: in rows where got chose other experts than the
    reference, but a choice acceptable_rows allows (as sets), those ids with the weights
    the reference gives them; the reference's elsewhere."""
    i_g, i_w = i_g.detach().cpu(), i_w.detach().cpu()
    differ = (i_g.long().sort(-1).values != i_w.long().sort(-1).values).any(-1)
    if not bool(differ.any()):
        return i_w, w_w
    ok = differ & acceptable_rows(i_g, **{**inputs, "ordered": False})
    if not bool(ok.any()):
        return i_w, w_w
    s = reference.scores(reference.clean_logits(inputs["logits"].detach().cpu()),
                         inputs["scoring_func"])
    w_ok = reference.weights_of(s, i_g.clamp(0, s.shape[1] - 1), inputs["renormalize"],
                                inputs["routed_scaling_factor"])
    rows = ok[:, None]
    return (torch.where(rows, i_g.to(i_w.dtype), i_w),
            torch.where(rows, w_ok, w_w.detach().cpu()))


register(OpSpec("grouped_topk", ("logits", "top_k"), _cases,
                lambda r: {"topk_weights": r[0], "topk_ids": r[1]}, compare_topk))
