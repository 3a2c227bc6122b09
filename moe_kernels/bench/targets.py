"""`moe-bench --targets RESULTS.json`: a results file judged against the speed goals
(docs/benchmarks.md, "Goals"): for each goal the cases it judges, our fastest correct
backend there and its figure, the goal, met or not, and the strongest torch row of the
case in the same unit. A goal with no row in the file says so instead of passing.

Ours: every backend not named `torch-*` (triton and its tile variants, cuda, cpu), rows
that disagree with the reference left out. The goals are the H100's: a file from another
device is judged all the same, its device named above the table.
"""

from __future__ import annotations

import dataclasses
import json
import re

from moe_kernels.bench.common import EAGER_CASE, is_peer


@dataclasses.dataclass(frozen=True)
class Goal:
    name: str
    op: str | None          # None: every op (the eager-call rows)
    case: str               # regex searched in the row's case
    metric: str             # a key of METRICS
    bound: float
    at_most: bool           # the figure must be <= bound (else >= bound)
    cases: str = "each"     # "each" matching case, or the one of the "largest" T
    min_tokens: int = 0     # cases of fewer tokens (T=...) are not judged
    peer: str | None = None  # metric "over_peer": the row ours is timed against


def _tokens(case: str) -> int | None:
    m = re.search(r"\bT=(\d+)", case)
    return int(m.group(1)) if m else None


def _eager_extra_us(row: dict) -> float | None:
    """The eager-call row's host time above its kernel calls made directly (its note)."""
    m = re.search(r"kernel calls alone \(\d+\) [\d.]+ us: \+(-?[\d.]+) us", row["note"])
    return float(m.group(1)) if m else None


# figure of a row (None: the row cannot say), and its unit
METRICS = {
    "us": (lambda r: r["time_us"], "us"),
    "tflops": (lambda r: r["tflops"], "TFLOPS"),
    "gbps": (lambda r: r["gbps"], "GB/s"),
    "copy_pct": (lambda r: 100.0 * r["gbps"] / r["copy_gbps"] if r.get("copy_gbps") else None,
                 "% of copy"),
    "ns_per_token": (lambda r: r["time_us"] * 1e3 / _tokens(r["case"]) if _tokens(r["case"])
                     else None, "ns/token"),
    "eager_extra_us": (_eager_extra_us, "us above its kernels"),
    "over_floor": (lambda r: 100.0 / r["roofline_pct"] if r.get("roofline_pct") else None,
                   "x its floor"),
    "over_peer": (None, "x the peer"),
}

# docs/benchmarks.md, "Goals" (DeepSeek-V3 shapes, H100)
GOALS = (
    Goal("grouped_topk at 4096 tokens", "grouped_topk", r"^T=4096 E=256 ", "us", 8.0, True),
    Goal("grouped_topk at decode (1-64 tokens)", "grouped_topk", r"^T=(1|16|64) E=256 ", "us",
         4.0, True),
    Goal("moe_align_block_size, 4096 tokens top-8", "moe_align_block_size",
         r"^align T=4096 K=8 E=256 ", "us", 15.0, True),
    Goal("permute, 4096 tokens, H=7168", "permute", r"^permute T=4096 K=8 E=256 H=7168 ",
         "copy_pct", 85.0, False),
    Goal("unpermute, 4096 tokens, H=7168", "unpermute", r"^unpermute T=4096 K=8 H=7168 ",
         "copy_pct", 85.0, False),
    Goal("grouped_gemm_fp8 N=4096 K=7168", "grouped_gemm_fp8", r"N=4096 K=7168$", "tflops",
         1150.0, False),
    Goal("grouped_gemm_fp8 N=7168 K=2048", "grouped_gemm_fp8", r"N=7168 K=2048$", "tflops",
         1050.0, False),
    Goal("grouped_gemm_fp8 over cuBLAS block-scaled _scaled_mm", "grouped_gemm_fp8",
         r"N=\d+ K=\d+$", "over_peer", 1.0, False, peer="torch-scaled_mm"),
    Goal("grouped_gemm_fp8_masked at decode", "grouped_gemm_fp8_masked", r"^masked ", "gbps",
         2800.0, False),
    Goal("quantize_fp8_per_token_group, most rows", "quantize_fp8_per_token_group",
         r"^quant 1x128 T=", "gbps", 2900.0, False, cases="largest"),
    Goal("silu_and_mul_quant_fp8, most rows", "silu_and_mul_quant_fp8", r"^silu_mul_quant T=",
         "gbps", 2900.0, False, cases="largest"),
    Goal("mla_decompress_kv, T >= 8192", "mla_decompress_kv", r"^contiguous T=", "ns_per_token",
         50.0, True, min_tokens=8192),
    Goal("fused_moe_fp8 decode, bs=1", "fused_moe_fp8", r"^fused T=1 ", "us", 125.0, True),
    Goal("DeepseekV3MoE decode, 1 token", "DeepseekV3MoE", r"^DeepseekV3MoE T=1 ", "over_floor",
         1.3, True),
    Goal("eager call above its kernels", None, "^" + re.escape(EAGER_CASE) + "$",
         "eager_extra_us", 10.0, True),
)


@dataclasses.dataclass
class Verdict:
    goal: Goal
    case: str
    ours: str | None = None       # backend
    figure: float | None = None
    peer: str | None = None       # the strongest torch row of the case and its figure
    peer_figure: float | None = None
    why: str = ""                 # where there is no figure

    @property
    def met(self) -> bool | None:
        if self.figure is None:
            return None
        g = self.goal
        return self.figure <= g.bound if g.at_most else self.figure >= g.bound


def _fastest(rows: list[dict]) -> dict | None:
    timed = [r for r in rows if r["time_us"] > 0 and r.get("correct") is not False]
    return min(timed, key=lambda r: r["time_us"]) if timed else None


def _judge_case(goal: Goal, case: str, rows: list[dict]) -> list[Verdict]:
    ours = [r for r in rows if not is_peer(r["backend"])]
    peers = [r for r in rows if is_peer(r["backend"])]
    if goal.metric == "eager_extra_us":     # one verdict per backend: each is a user's path
        return [Verdict(goal, f"{r['op']} ({r['backend']})", r["backend"],
                        None if r.get("correct") is False else _eager_extra_us(r),
                        why="the call raised" if r.get("correct") is False
                        else "no kernel-alone figure in the row") for r in ours]
    best, peer = _fastest(ours), _fastest(peers)
    if best is None:
        return [Verdict(goal, case, why="no correct row of ours")]
    if goal.metric == "over_peer":
        against = _fastest([r for r in peers if r["backend"] == goal.peer])
        if against is None:
            return [Verdict(goal, case, best["backend"], why=f"no {goal.peer} row")]
        return [Verdict(goal, case, best["backend"], against["time_us"] / best["time_us"],
                        goal.peer, against["time_us"])]
    figure = METRICS[goal.metric][0]
    return [Verdict(goal, case, best["backend"], figure(best),
                    peer["backend"] if peer else None, figure(peer) if peer else None)]


def judge(results: list[dict]) -> list[Verdict]:
    """A verdict for each goal and case it judges (one saying why where it has none)."""
    verdicts = []
    for goal in GOALS:
        by_case: dict[str, list[dict]] = {}
        for r in results:
            if (goal.op is None or r["op"] == goal.op) and re.search(goal.case, r["case"]):
                key = r["case"] if goal.op is not None else r["op"]
                by_case.setdefault(key, []).append(r)
        if goal.min_tokens:
            by_case = {c: rs for c, rs in by_case.items()
                       if (_tokens(c) or 0) >= goal.min_tokens}
        if goal.cases == "largest" and by_case:
            largest = max(by_case, key=lambda c: _tokens(c) or 0)
            by_case = {largest: by_case[largest]}
        if not by_case:
            verdicts.append(Verdict(goal, "-", why="no row in the file"))
        for case, rows in by_case.items():
            verdicts += _judge_case(goal, case, rows)
    return verdicts


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def markdown(data: dict) -> str:
    """The verdicts of a results file (moe-bench --json) as a Markdown table."""
    meta = data.get("meta", {})
    verdicts = judge(data["results"])
    lines = [f"Goals judged on {meta.get('device', '?')} (commit {meta.get('commit', '?')})",
             "", "| goal | case | ours | figure | goal | met | strongest torch row |",
             "|---|---|---|---|---|---|---|"]
    for v in verdicts:
        unit = METRICS[v.goal.metric][1]
        bound = f"{'<=' if v.goal.at_most else '>='} {_number(v.goal.bound)} {unit}"
        met = {True: "yes", False: "**no**", None: v.why or "-"}[v.met]
        peer = (f"{v.peer} {_number(v.peer_figure)}"
                + (" us" if v.goal.metric == "over_peer" else f" {unit}") if v.peer else "-")
        lines.append(f"| {v.goal.name} | {v.case} | {v.ours or '-'} | {_number(v.figure)} | "
                     f"{bound} | {met} | {peer} |")
    judged = [v for v in verdicts if v.met is not None]
    lines += ["", f"{sum(v.met for v in judged)} of {len(judged)} judged cases meet their goal; "
                  f"{len(verdicts) - len(judged)} without a figure."]
    return "\n".join(lines)


def main(path: str) -> int:
    with open(path) as f:
        print(markdown(json.load(f)))
    return 0
