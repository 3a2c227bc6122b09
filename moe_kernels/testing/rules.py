"""The comparison rules of `moe_kernels.testing`, one function per rule; our own test suite
uses the same ones (tests/helpers.py), so a kernel checked here is held to what our
backends are held to.

Each rule takes (output name, got, want) and returns a `Verdict`: passed or not, the
worst error in the rule's own unit, where it is (an index tuple), and a sentence for the
report. Tensors are compared on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn

# Float comparison rule, written once: (rtol, atol) per dtype the math ran in. Kernels do
# their arithmetic in float32 when the output is float32, so those get float32 bounds.
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-7, 1e-9),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}
# DeepGEMM's acceptance bound for its FP8 GEMMs (its tests use calc_diff < 0.001; ours,
# with float32 promotion every 128 of K, hold 1e-5)
GEMM_CALC_DIFF = 1e-5
# fused_moe_fp8's contract: relative Frobenius error against the reference chain
FUSED_REL_ERR = 2e-2


@dataclass
class Verdict:
    output: str
    rule: str
    passed: bool
    worst: float = 0.0
    where: tuple | None = None
    detail: str = ""

    def __str__(self) -> str:
        at = f" at {list(self.where)}" if self.where is not None else ""
        state = "ok" if self.passed else "FAIL"
        return f"{self.output}: {state} ({self.rule}) worst {self.worst:.3g}{at}. {self.detail}"


def _first(mask: torch.Tensor) -> tuple | None:
    idx = mask.nonzero()
    return tuple(idx[0].tolist()) if idx.numel() else None


def _shape_dtype(name, rule, got, want, *, dtype=True) -> Verdict | None:
    if not isinstance(got, torch.Tensor):
        return Verdict(name, rule, False, float("inf"), None,
                       f"expected a tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        return Verdict(name, rule, False, float("inf"), None,
                       f"shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if dtype and got.dtype != want.dtype:
        return Verdict(name, rule, False, float("inf"), None,
                       f"dtype {got.dtype}, expected {want.dtype}")
    return None


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Elements as integers (floats by their bit pattern: NaN == NaN, -0.0 != 0.0)."""
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                       8: torch.int64}[t.element_size()])
    return t


def exact(name: str, got, want: torch.Tensor) -> Verdict:
    """Integers equal; floats equal bit for bit (copies: permutation outputs)."""
    bad = _shape_dtype(name, "exact", got, want)
    if bad:
        return bad
    g, w = _bits(got), _bits(want)
    if want.is_floating_point():   # -0.0 and +0.0 are the same value for a copy's purpose
        zero = (got.detach().cpu().float() == 0) & (want.detach().cpu().float() == 0)
        diff = (g != w) & ~zero
    else:
        diff = g != w
    n = int(diff.sum())
    if not n:
        return Verdict(name, "exact", True)
    where = _first(diff)
    return Verdict(name, "exact", False, float(n), where,
                   f"{n} of {diff.numel()} elements differ; first: got "
                   f"{got.detach().cpu()[where].item()}, expected {want.cpu()[where].item()}")


def close(name: str, got, want: torch.Tensor, dtype: torch.dtype | None = None, *,
          any_non_finite: bool = False, atol: float | torch.Tensor | None = None) -> Verdict:
    """|got - want| <= atol + rtol |want| with (rtol, atol) of `dtype` (default: want's;
    `atol` given: that one, or one per element, broadcast to want's shape), NaN exactly
    where want has NaN, +-inf where want has it (any_non_finite: NaN and +-inf as one
    class, non-finite exactly where want is, for outputs whose contract leaves the kind
    open). worst: the largest |got - want| / (atol + rtol |want|) (<= 1 passes)."""
    rule = "close"
    bad = _shape_dtype(name, rule, got, want)
    if bad:
        return bad
    rtol, dtype_atol = TOLERANCES[dtype or want.dtype]
    atol = dtype_atol if atol is None else atol
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    if any_non_finite:
        bad = _non_finite_apart(name, rule, g, w)
        if bad:
            return bad
        g, w = _zero_where_non_finite(g, w)
    g_nan, w_nan = g.isnan(), w.isnan()
    if not torch.equal(g_nan, w_nan):
        where = _first(g_nan != w_nan)
        return Verdict(name, rule, False, float("inf"), where,
                       f"NaN where {'none is' if bool(g_nan[where]) else 'one is'} expected: "
                       f"got {g[where].item()}, expected {w[where].item()}")
    inf = w.isinf() | g.isinf()
    if not torch.equal(g[inf & ~w_nan], w[inf & ~w_nan]):
        where = _first((g != w) & inf)
        return Verdict(name, rule, False, float("inf"), where,
                       f"got {g[where].item()}, expected {w[where].item()}")
    finite = ~(w_nan | inf)
    ratio = torch.where(finite, (g - w).abs() / (atol + rtol * w.abs()), 0.0)
    worst = float(ratio.max()) if ratio.numel() else 0.0
    where = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), ratio.shape)) \
        if ratio.numel() else None
    if isinstance(atol, torch.Tensor):   # the bound where it is worst
        atol = float(atol.expand(w.shape)[where]) if where is not None else 0.0
    detail = (f"rtol {rtol:g}, atol {atol:g} ({dtype or want.dtype})" if worst <= 1 else
              f"got {g[where].item():.6g}, expected {w[where].item():.6g} "
              f"(rtol {rtol:g}, atol {atol:g} for {dtype or want.dtype})")
    return Verdict(name, rule, worst <= 1, worst, where if worst > 1 else None, detail)


def dot_products(name: str, got, want: torch.Tensor, *, any_non_finite: bool = False) -> Verdict:
    """`close` for outputs that are sums of products along their last dimension's rows
    (MLA's K and V: row (t, h) holds token t's R-term dot products with head h's weight
    rows). In float32 a value that cancels toward 0 keeps the rounding of its terms, which
    no order of summation avoids and the reference's own float32 result carries too (a
    drawn case: 1.25e-6 apart from the reference at a value of 0.0028, both within 2.1e-6
    of the float64 product), so there each value's absolute bound is at least rtol times
    the largest finite magnitude of its row. A float32 path that rounds to TF32 (~5e-4
    relative) or bf16 still fails; the other dtypes' bounds are close's."""
    atol = None
    if isinstance(want, torch.Tensor) and want.dtype == torch.float32 and want.dim():
        w = want.detach().cpu().double()
        rtol, atol_f32 = TOLERANCES[torch.float32]
        row_max = torch.where(w.isfinite(), w.abs(), 0.0).amax(-1, keepdim=True) \
            if w.numel() else w
        atol = (rtol * row_max).clamp(min=atol_f32)
    return close(name, got, want, any_non_finite=any_non_finite, atol=atol)


def _non_finite_apart(name: str, rule: str, g: torch.Tensor, w: torch.Tensor):
    """A failing Verdict where got is finite and want is not, or the reverse; else None."""
    g_fin, w_fin = g.isfinite(), w.isfinite()
    if torch.equal(g_fin, w_fin):
        return None
    where = _first(g_fin != w_fin)
    what = "finite where a non-finite value is" if bool(g_fin[where]) else \
        "non-finite where none is"
    return Verdict(name, rule, False, float("inf"), where,
                   f"{what} expected: got {g[where].item()}, expected {w[where].item()}")


def _zero_where_non_finite(g: torch.Tensor, w: torch.Tensor):
    """g and w with their (shared) non-finite elements set to 0: compared apart."""
    fin = w.isfinite()
    return torch.where(fin, g, 0.0), torch.where(fin, w, 0.0)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity measure 1 - 2 sum(xy) / sum(x^2 + y^2), in float64: 0 for
    equal tensors, about rel_err^2 / 2 for close ones."""
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0


# The smallest normal exponent and the mantissa bits of the 16-bit output dtypes
_HALF_FORMATS = {torch.bfloat16: (-126, 7), torch.float16: (-14, 10)}


def one_step_apart(g: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise: g and w (values of `dtype`, held in float64) differ by at most one
    spacing of `dtype` at the larger magnitude: the two roundings of two float32 results
    that straddle a rounding boundary of `dtype`. All False for other dtypes."""
    if dtype not in _HALF_FORMATS:
        return torch.zeros(g.shape, dtype=torch.bool)
    min_exp, mantissa = _HALF_FORMATS[dtype]
    _, e = torch.frexp(torch.maximum(g.abs(), w.abs()))      # |v| in [2^(e-1), 2^e)
    spacing = torch.ldexp(torch.ones_like(g), (e - 1).clamp(min=min_exp) - mantissa)
    return (g - w).abs() <= spacing


def gemm(name: str, got, want: torch.Tensor, bound: float = GEMM_CALC_DIFF) -> Verdict:
    """calc_diff(got, want) < bound over the whole output and over each row (so that one
    wrong row of many is not averaged away); non-finite exactly where want is, NaN and
    +-inf alike (docs/api.md: which of them a non-finite input gives is the
    implementation's; DeepGEMM-style promotion gives inf where dequantizing first gives
    NaN). A row (or the whole output) passes too where each value is within the noise of
    two correct computations: in a row of a few values, calc_diff weighs one value alone.
    That noise: one step of a bf16 / fp16 output (two float32 results on either side of a
    midpoint round apart: a drawn case, N = 1, 0.21386719 against 0.21484375, calc_diff
    1.04e-5), or float32's rtol times the output's largest magnitude (a sum that cancels
    keeps its terms' rounding: a drawn case, N = 1, K = 2, FP8 products 88 * 448 - 448 *
    88 = 0, -1.8e-8 against the reference's -3.0e-8 beside values of 1.35: calc_diff 0.125).
    worst: the largest calc_diff of what fails (else of all), where: its row."""
    rule = f"calc_diff < {bound:g}"
    bad = _shape_dtype(name, rule, got, want)
    if bad:
        return bad
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    bad = _non_finite_apart(name, rule, g, w)
    if bad:
        return bad
    g, w = _zero_where_non_finite(g, w)
    whole = calc_diff(g, w)
    if not g.numel():
        return Verdict(name, rule, True, 0.0, None, "empty")
    num = 2 * (g * w).sum(-1)                       # per row: (..., N) -> (...)
    den = (g * g + w * w).sum(-1)
    per_row = torch.where(den > 0, 1 - num / den.clamp_min(1e-300), 0.0)
    floor = TOLERANCES[torch.float32][0] * float(w.abs().max())
    noise = one_step_apart(g, w, want.dtype) | ((g - w).abs() <= floor)
    failing = (per_row >= bound) & ~noise.all(-1)
    whole_fails = whole >= bound and not bool(noise.all())
    passed = not whole_fails and not bool(failing.any())
    measured = per_row if passed else torch.where(failing, per_row, 0.0)
    worst = max(whole if whole_fails or passed else 0.0, float(measured.max()))
    where = tuple(int(i) for i in torch.unravel_index(measured.argmax(), measured.shape))
    return Verdict(name, rule, passed, worst, None if passed else where,
                   f"whole-tensor calc_diff {whole:.3g}")


def relative_error(name: str, got, want: torch.Tensor, bound: float = FUSED_REL_ERR) -> Verdict:
    """||got - want||_F / ||want||_F < bound (fused_moe_fp8's contract); where: the row
    with the largest error."""
    rule = f"rel. Frobenius error < {bound:g}"
    bad = _shape_dtype(name, rule, got, want)
    if bad:
        return bad
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    if not torch.equal(g.isnan(), w.isnan()):
        return Verdict(name, rule, False, float("inf"), _first(g.isnan() != w.isnan()),
                       "NaN where none is expected")
    g, w = torch.nan_to_num(g), torch.nan_to_num(w)
    err = float((g - w).norm() / w.norm().clamp_min(1e-30)) if w.numel() else 0.0
    rows = (g - w).reshape(-1, g.shape[-1]).norm(dim=-1) if g.numel() else torch.zeros(0)
    where = (int(rows.argmax()),) if rows.numel() and err >= bound else None
    return Verdict(name, rule, err < bound, err, where, "")


def fp8_ordinal(q: torch.Tensor) -> torch.Tensor:
    """e4m3fn bit patterns as signed steps from zero (adjacent values differ by 1)."""
    bits = q.detach().cpu().contiguous().view(torch.uint8).int()
    mag = bits & 0x7F
    return torch.where(bits >= 0x80, -mag, mag)


def fp8_steps(name: str, got, want: torch.Tensor, max_steps: int = 1) -> Verdict:
    """FP8 values within max_steps representable values (a scale's last-bit difference
    moves a value by at most one step); NaN exactly where want has NaN."""
    rule = f"fp8 within {max_steps} step(s)"
    bad = _shape_dtype(name, rule, got, want)
    if bad:
        return bad
    g_nan, w_nan = got.detach().cpu().float().isnan(), want.cpu().float().isnan()
    if not torch.equal(g_nan, w_nan):
        return Verdict(name, rule, False, float("inf"), _first(g_nan != w_nan),
                       "NaN positions differ")
    steps = torch.where(w_nan, 0, (fp8_ordinal(got) - fp8_ordinal(want)).abs())
    worst = int(steps.max()) if steps.numel() else 0
    where = tuple(int(i) for i in torch.unravel_index(steps.argmax(), steps.shape)) \
        if worst > max_steps else None
    detail = "" if where is None else (f"got {got.cpu()[where].float().item()}, expected "
                                       f"{want.cpu()[where].float().item()}")
    return Verdict(name, rule, worst <= max_steps, float(worst), where, detail)
