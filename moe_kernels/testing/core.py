"""The checking machinery of `moe_kernels.testing`: cases, the reference, comparison,
`check` and its report. The per-op knowledge (input generators, which rule each output
gets) lives in the op modules beside this one (gating.py, permute.py, ...), each
registering its ops in OPS.
"""

from __future__ import annotations

import functools
import json
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from moe_kernels.testing.rules import Verdict

PRESETS = ("edge", "deepseek_v3", "random")


class Unsupported(Exception):
    """Raised by an adapter for a case its convention cannot express (e.g. a group scoring
    vLLM does not offer): the case is reported as skipped, not failed."""


@dataclass
class Case:
    """One input of an op, by the op's argument names (docs/api.md). `why`: the failure
    mode it is there to catch."""
    op: str
    name: str
    inputs: dict
    why: str = ""


@dataclass(frozen=True)
class OpSpec:
    """positional: the arguments passed by position (the rest by keyword);
    make_cases(preset, generator, device) -> [Case]; outputs(result) -> {name: tensor};
    compare(got, want, case) -> [Verdict] on the outputs dicts."""
    name: str
    positional: tuple
    make_cases: Callable
    outputs: Callable
    compare: Callable


OPS: dict[str, OpSpec] = {}


def register(*specs: OpSpec) -> None:
    for spec in specs:
        OPS[spec.name] = spec


def _spec(op: str) -> OpSpec:
    _load_ops()
    if op not in OPS:
        raise ValueError(f"moe_kernels.testing: unknown op {op!r}; known: {', '.join(sorted(OPS))}")
    return OPS[op]


@functools.lru_cache(maxsize=None)
def _load_ops() -> None:
    from moe_kernels.testing import fp8, fused_moe, gating, grouped_gemm, mla, permute  # noqa: F401


def ops() -> list[str]:
    """The ops that have cases and rules."""
    _load_ops()
    return sorted(OPS)


def reference(op: str) -> Callable:
    """The float32 reference of `op` with its public signature: our op on the reference
    backend (the oracle our own backends are tested against)."""
    _spec(op)
    import moe_kernels
    return functools.partial(getattr(moe_kernels, op), backend="reference")


def cases(op: str, preset: str = "edge", seed: int = 0, device="cpu") -> list[Case]:
    """The inputs of `op` for a preset: "edge" (named failure modes, each with why it is
    there), "deepseek_v3" (DeepSeek-V3's shapes; scaled down on the CPU) or "random"
    (sizes, dtypes and layouts drawn from `seed`)."""
    spec = _spec(op)
    if preset not in PRESETS:
        raise ValueError(f"moe_kernels.testing: preset must be one of {PRESETS}, got {preset!r}")
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    return spec.make_cases(preset, g, device)


def _split(spec: OpSpec, inputs: dict):
    args = tuple(inputs[n] for n in spec.positional if n in inputs)
    kwargs = {k: v for k, v in inputs.items() if k not in spec.positional}
    return args, kwargs


def run(op: str, fn: Callable, case: Case):
    """fn called with the case's inputs (positional arguments first, the rest by name)."""
    args, kwargs = _split(_spec(op), case.inputs)
    return fn(*args, **kwargs)


@dataclass
class Comparison:
    """The verdicts of one call's outputs; `passed` when all pass."""
    verdicts: list

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    @property
    def failures(self) -> list:
        return [v for v in self.verdicts if not v.passed]

    def __str__(self) -> str:
        return "\n".join(str(v) for v in self.verdicts)


def compare(op: str, got, want, case: Case | None = None) -> Comparison:
    """Compares an implementation's result with the reference's, output by output, with
    the op's rules (docs/testing.md). Rules that depend on an input read it from `case`
    (moe_align_block_size's block_size, which it requires; whether quantizer scales were
    asked column-major)."""
    spec = _spec(op)
    try:
        got_out = spec.outputs(got)
    except Exception as exc:   # a result of the wrong structure is a failed comparison
        return Comparison([Verdict("result", "structure", False, float("inf"), None,
                                   f"cannot read the outputs: {type(exc).__name__}: {exc}")])
    return Comparison(spec.compare(got_out, spec.outputs(want), case))


@dataclass
class CaseResult:
    case: Case
    comparison: Comparison | None = None
    error: str | None = None
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        return self.skipped is not None or (self.error is None and self.comparison.passed)

    def worst(self) -> Verdict | None:
        """The failing verdict with the largest error (each in its rule's unit), or the
        largest of all when none fails."""
        if self.comparison is None:
            return None
        candidates = self.comparison.failures or self.comparison.verdicts
        return max(candidates, key=lambda v: v.worst) if candidates else None


@dataclass
class Report:
    op: str
    preset: str
    results: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list:
        return [r for r in self.results if not r.passed]

    @property
    def skipped(self) -> list:
        return [r for r in self.results if r.skipped is not None]

    def table(self) -> str:
        rows = [("case", "result", "worst", "rule")]
        for r in self.results:
            v = r.worst()
            if r.skipped is not None:
                rows.append((r.case.name, "skip", "-", r.skipped))
                continue
            rows.append((r.case.name, "pass" if r.passed else "FAIL",
                         "error" if r.error else (f"{v.worst:.3g}" if v else "-"),
                         "raised" if r.error else (f"{v.output}: {v.rule}" if v else "-")))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join(lines)

    def message(self) -> str:
        """What failed, case by case: the case and why it exists, then each failing output
        with its rule, worst error, index and values."""
        parts = [f"{self.op}: {len(self.failures)} of {len(self.results)} cases failed "
                 f"(preset {self.preset!r})"]
        for r in self.failures:
            parts.append(f"- case {r.case.name!r} ({r.case.why})")
            if r.error:
                parts.append("    raised: " + r.error.strip().splitlines()[-1])
            else:
                parts += [f"    {v}" for v in r.comparison.failures]
        return "\n".join(parts)

    def to_json(self) -> dict:
        return {"op": self.op, "preset": self.preset, "passed": self.passed,
                "cases": [dict(case=r.case.name, why=r.case.why, passed=r.passed,
                               error=r.error, skipped=r.skipped,
                               verdicts=[dict(output=v.output, rule=v.rule, passed=v.passed,
                                              worst=v.worst, where=list(v.where) if v.where
                                              else None, detail=v.detail)
                                         for v in (r.comparison.verdicts
                                                   if r.comparison else [])])
                          for r in self.results]}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, default=str)


def _snapshot(inputs: dict) -> dict:
    return {k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def _modified(inputs: dict, snapshot: dict) -> list[str]:
    from moe_kernels.testing.rules import exact
    return [k for k, v in snapshot.items() if not exact(k, inputs[k], v).passed]


def check_case(op: str, impl: Callable, case: Case) -> CaseResult:
    want = run(op, reference(op), case)
    snapshot = _snapshot(case.inputs)
    try:
        got = run(op, impl, case)
    except Unsupported as exc:
        return CaseResult(case, skipped=str(exc))
    except Exception:
        return CaseResult(case, error=traceback.format_exc(limit=4))
    comparison = compare(op, got, want, case)
    changed = _modified(case.inputs, snapshot)
    if changed:
        comparison.verdicts.append(Verdict("inputs", "unchanged", False, float(len(changed)),
                                           None, f"the call wrote into {', '.join(changed)}"))
    return CaseResult(case, comparison)


def warn_if_reduced_precision() -> None:
    """A UserWarning when torch's float32 matmuls may run at reduced precision: the
    reference's float32 GEMMs are torch matmuls and follow the setting ("high": TF32 on
    CUDA, "medium": also bf16 on CPUs with AMX), so the oracle would no longer be float32."""
    precision = torch.get_float32_matmul_precision()
    if precision != "highest":
        warnings.warn(f"moe_kernels.testing: torch.get_float32_matmul_precision() is "
                      f"{precision!r}, so the float32 reference's GEMMs may run in TF32 "
                      f"(CUDA) or bf16 (CPU) and judge with a less exact oracle; call "
                      f"torch.set_float32_matmul_precision('highest') first",
                      UserWarning, stacklevel=3)


def check(op: str, impl: Callable, *, preset: str = "edge", seed: int = 0, device="cpu",
          adapter: str | None = None, raise_on_failure: bool = True) -> Report:
    """Runs impl over the cases of a preset and compares each result with the reference.

    impl takes the op's arguments as docs/api.md names them, or another project's
    convention through `adapter` (moe_kernels.testing.adapters.ADAPTERS). Raises
    AssertionError naming each failing case, output, rule, worst error and index (unless
    raise_on_failure=False); returns the Report."""
    if adapter is not None:
        from moe_kernels.testing.adapters import adapt
        impl = adapt(adapter, impl, op)
    warn_if_reduced_precision()
    report = Report(op, preset)
    for case in cases(op, preset, seed, device):
        report.results.append(check_case(op, impl, case))
    if len(report.skipped) == len(report.results) and report.results:
        raise AssertionError(f"{op}: every case was skipped (the adapter's convention "
                             f"expresses none of them); nothing was checked")
    if raise_on_failure and not report.passed:
        raise AssertionError(report.message())
    return report
