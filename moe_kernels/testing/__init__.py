"""Numerical-equivalence checking of MoE kernels against moe_kernels' references, for any
codebase's CI (docs/testing.md).

    from moe_kernels import testing
    testing.check("grouped_topk", my_grouped_topk)                  # raises on a mismatch
    testing.check("grouped_topk", vllm_grouped_topk, adapter="vllm_grouped_topk")
    for case in testing.cases("permute", preset="edge"): ...
    testing.compare("grouped_gemm_fp8", got, want)                  # -> Comparison

Presets: "edge" (named failure modes), "deepseek_v3" (real shapes, scaled down on CPU),
"random" (seeded draws). Rules per output: moe_kernels.testing.rules. The `moe-check`
command runs `check` from the shell.
"""

from moe_kernels.testing.core import (PRESETS, Case, CaseResult, Comparison, Report, cases,
                                      Unsupported, check, compare, ops, reference, run)
from moe_kernels.testing.rules import TOLERANCES, Verdict, calc_diff

__all__ = ["PRESETS", "Case", "CaseResult", "Comparison", "Report", "TOLERANCES", "Verdict",
           "Unsupported", "calc_diff", "cases", "check", "compare", "ops", "reference", "run"]
