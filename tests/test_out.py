"""out= buffers of every op that takes one (the GEMMs, permute, unpermute, the quantizers,
fused_moe_fp8): one contract, tested here for all of them (docs/api.md, "out= buffers").

- the result is written into the caller's buffers and those very tensors are returned;
- every element is written: the buffers are poisoned (NaN) first and the result must equal
  the functional call's bit for bit, on every backend;
- a buffer that shares memory with any input, has the wrong shape or dtype, is not
  contiguous, or needs autograd is refused with an error naming it, before any launch;
  the exception, fused_moe_fp8's hidden, which it reads whole before it writes, gives the
  functional result in place;
- the registered `<op>_out` ops pass opcheck and trace under torch.compile(fullgraph=True).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch

import moe_kernels
from moe_kernels.reference import fp8 as ref_fp8
from moe_kernels.reference import permute as ref_permute

from helpers import FP8_INPUT_OPCHECKS, bits, device_backend_params

ALL = ("triton", "cpu", "reference")


class Case(NamedTuple):
    fn: Callable            # the public function
    make: Callable          # (device, seed) -> (args, kwargs)
    outputs: Callable       # functional result -> the tensors out= replaces
    out_kwargs: Callable    # those buffers -> the out= keyword arguments
    in_place: tuple = ()    # positions of the inputs the out= buffer may be (read first)


def _gemm_inputs(device, seed, masked=False):
    g = torch.Generator().manual_seed(seed)
    E, N, K = 3, 160, 200                       # N, K: partial 128-blocks
    b, bs = ref_fp8.quantize_fp8_block(torch.randn(E, N, K, generator=g) / K ** 0.5)
    if masked:
        a, a_s = ref_fp8.quantize_fp8_per_token_group(torch.randn(E * 5, K, generator=g))
        a, a_s = a.view(E, 5, K), a_s.view(E, 5, -1)
        index = torch.tensor([2, 0, 5], dtype=torch.int32)     # an empty and a full group
    else:
        a, a_s = ref_fp8.quantize_fp8_per_token_group(torch.randn(9, K, generator=g))
        index = torch.tensor([0, 0, -1, 2, 2, 2, -1, 1, 7], dtype=torch.int32)  # -1, >= E
    args = [t.to(device) for t in (a, a_s, b, bs, index)]
    return args, {"out_dtype": torch.float32}


def _fused_inputs(device, seed):
    """fused_moe_fp8 at T=5, H=I=128, E=3, top-2, a skipped pair: float32 hidden, so that
    a float32 out= buffer may require grad (the refusal test)."""
    g = torch.Generator().manual_seed(seed)
    E, H, inter = 3, 128, 128
    w13, s13 = ref_fp8.quantize_fp8_block(torch.randn(E, 2 * inter, H, generator=g) / H ** 0.5)
    w2, s2 = ref_fp8.quantize_fp8_block(torch.randn(E, H, inter, generator=g) / inter ** 0.5)
    ids, hidden, _, _ = _routing(device, seed, T=5, K=2, E=E)
    hidden = torch.randn(5, H, generator=g).to(device)
    w = torch.rand(ids.shape, generator=g).to(device)
    return [hidden, *(t.to(device) for t in (w13, s13, w2, s2)), w, ids], {}


def _quant_inputs(device, seed, width=300, **kw):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(7, width, generator=g) * 3).to(device)], kw


def _masked_silu_inputs(device, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 4, 2 * 150, generator=g) * 3).to(device)
    return [x], {"masked_m": torch.tensor([4, 0, 2], dtype=torch.int32, device=device)}


def _routing(device, seed, T=5, K=2, E=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
    ids[1, 1] = -1                                                 # a skipped pair
    hidden = torch.randn(T, 24, generator=g)
    scales = torch.rand(T, 2, generator=g)
    return ids.to(device), hidden.to(device), scales.to(device), E


def _permute_inputs(device, seed):
    ids, hidden, scales, E = _routing(device, seed)
    return [hidden, ids, E], {"align": 4, "scales": scales}


def _permute_masked_inputs(device, seed):
    ids, hidden, scales, E = _routing(device, seed)
    return [hidden, ids, E, 2], {"scales": scales}       # M=2: some pairs dropped


def _unpermute_inputs(device, seed):
    ids, hidden, _, E = _routing(device, seed)
    rows, _, index = ref_permute.permute(hidden, ids, E, 4, None)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.rand(ids.shape, generator=g).to(device)
    return [rows.contiguous(), moe_kernels.PermuteLayout(*index), w], {}


_single = (lambda r: (r,), lambda bufs: {"out": bufs[0]})
_pair = (lambda r: tuple(r), lambda bufs: {"out": tuple(bufs)})
_rows = (lambda r: (r[0], r[1].scales),
         lambda bufs: {"out": bufs[0], "out_scales": bufs[1]})

CASES = {
    "grouped_gemm_fp8": Case(moe_kernels.grouped_gemm_fp8, _gemm_inputs, *_single),
    "grouped_gemm_fp8_masked": Case(moe_kernels.grouped_gemm_fp8_masked,
                                    lambda d, s: _gemm_inputs(d, s, masked=True), *_single),
    "quantize_fp8_per_token_group": Case(moe_kernels.quantize_fp8_per_token_group,
                                         _quant_inputs, *_pair),
    "quantize_fp8_per_token_group column-major": Case(
        moe_kernels.quantize_fp8_per_token_group,
        lambda d, s: _quant_inputs(d, s, column_major_scales=True), *_pair),
    "silu_and_mul_quant_fp8": Case(moe_kernels.silu_and_mul_quant_fp8,
                                   lambda d, s: _quant_inputs(d, s, width=2 * 150), *_pair),
    "silu_and_mul_quant_fp8 masked": Case(moe_kernels.silu_and_mul_quant_fp8,
                                          _masked_silu_inputs, *_pair),
    "permute": Case(moe_kernels.permute, _permute_inputs, *_rows),
    "permute_masked": Case(moe_kernels.permute_masked, _permute_masked_inputs, *_rows),
    "unpermute": Case(moe_kernels.unpermute, _unpermute_inputs, *_single),
    "fused_moe_fp8": Case(moe_kernels.fused_moe_fp8, _fused_inputs, *_single, in_place=(0,)),
}


def _poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A buffer of t's shape, dtype and layout (strides), every byte of it NaN-like."""
    buf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    if t.dtype == torch.float8_e4m3fn:
        buf.view(torch.uint8).fill_(0x7F)                # e4m3fn NaN
    else:
        buf.fill_(float("nan"))
    return buf


def _functional_and_buffers(case, device, backend, seed=0):
    args, kwargs = case.make(device, seed)
    want = case.outputs(case.fn(*args, **kwargs, backend=backend))
    return args, kwargs, want, [_poisoned_like(w) for w in want]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("device,backend", device_backend_params(ALL))
def test_out_written_and_returned(name, device, backend):
    """Every element written (poisoned buffers), equal to the functional result bit for bit,
    the buffers themselves returned; a second call into the same buffers too."""
    case = CASES[name]
    for seed in (0, 1):
        args, kwargs, want, bufs = _functional_and_buffers(case, device, backend, seed)
        got = case.outputs(case.fn(*args, **kwargs, **case.out_kwargs(bufs), backend=backend))
        for i, (g, w, b) in enumerate(zip(got, want, bufs)):
            assert g is b, f"{name}: output {i} is not the out= buffer"
            assert torch.equal(bits(g), bits(w)), f"{name} {backend}: output {i} differs"


def _aliased(x: torch.Tensor, buf: torch.Tensor):
    """x's values and a view shaped like buf, both in one storage starting at byte 0."""
    nbytes = lambda t: t.numel() * t.element_size()
    raw = torch.empty(max(nbytes(x), nbytes(buf)) + 16, dtype=torch.uint8, device=x.device)
    x2 = raw[:nbytes(x)].view(x.dtype).view(x.shape)
    x2.copy_(x)
    return x2, raw[:nbytes(buf)].view(buf.dtype).view(buf.shape)


def _tensor_inputs(args, kwargs):
    """(where, name, tensor) of every tensor argument, layout fields included."""
    found = [("arg", i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    found += [("kw", k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    for i, a in enumerate(args):
        if isinstance(a, moe_kernels.PermuteLayout):
            found.append(("layout", i, a.row_of_pair))
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_out_overlapping_an_input_is_refused(name):
    """Each tensor input in turn shares its memory with the out= buffer: ValueError (but
    for an input the op reads whole before it writes: test_in_place)."""
    case = CASES[name]
    args, kwargs, want, bufs = _functional_and_buffers(case, "cpu", "cpu")
    inputs = [i for i in _tensor_inputs(args, kwargs)
              if not (i[0] == "arg" and i[1] in case.in_place)]
    assert inputs
    for where, key, x in inputs:
        a, kw = list(args), dict(kwargs)
        x2, alias = _aliased(x, bufs[0])
        if where == "arg":
            a[key] = x2
        elif where == "kw":
            kw[key] = x2
        else:
            a[key] = a[key]._replace(row_of_pair=x2)
        out = case.out_kwargs([alias, *bufs[1:]])
        with pytest.raises(ValueError, match="shares memory with"):
            case.fn(*a, **kw, **out, backend="cpu")
    assert all(torch.isnan(b.float()).all() for b in bufs if b.dtype != torch.float8_e4m3fn)


IN_PLACE = [(name, pos) for name, case in CASES.items() for pos in case.in_place]


@pytest.mark.parametrize("name,pos", IN_PLACE)
@pytest.mark.parametrize("device,backend", device_backend_params(ALL))
def test_in_place(name, pos, device, backend):
    """out= the input itself (vLLM's inplace=True), and out= a buffer overlapping it shifted
    by one row (written rows the op has not read yet, if it interleaved reads and writes):
    both give the functional result bit for bit."""
    case = CASES[name]
    args, kwargs, want, _ = _functional_and_buffers(case, device, backend)
    x = args[pos]
    a = list(args)
    a[pos] = x.clone()
    got = case.fn(*a, **kwargs, **case.out_kwargs([a[pos]]), backend=backend)
    assert got is a[pos]
    assert torch.equal(bits(got), bits(want[0])), f"{name} {backend}: out=input"
    storage = torch.full((x.shape[0] + 1, *x.shape[1:]), float("nan"), dtype=x.dtype,
                         device=device)
    a[pos] = storage[:-1].copy_(x)
    got = case.fn(*a, **kwargs, **case.out_kwargs([storage[1:]]), backend=backend)
    assert torch.equal(bits(got), bits(want[0])), f"{name} {backend}: shifted overlap"


@pytest.mark.parametrize("name", list(CASES))
def test_out_bad_buffers_are_refused(name):
    """Wrong shape or dtype, a non-contiguous view, a buffer needing grad: each refused
    with the buffer named, and nothing written."""
    case = CASES[name]
    args, kwargs, want, bufs = _functional_and_buffers(case, "cpu", "cpu")
    first = bufs[0]
    wrong_dtype = torch.float16 if first.dtype != torch.float16 else torch.float32
    bad = {
        "shape": (ValueError, "shape", first.new_empty((first.shape[0] + 1, *first.shape[1:]))),
        "dtype": (TypeError, "dtype", first.new_empty(first.shape, dtype=wrong_dtype)),
        "strided": (ValueError, "contiguous",
                    first.new_empty((*first.shape[:-1], 2 * first.shape[-1]))[..., ::2]),
        "grad": (ValueError, "grad", first.new_empty(first.shape, dtype=torch.float32)
                 .requires_grad_() if first.dtype == torch.float32 else None),
    }
    for what, (exc, words, buf) in bad.items():
        if buf is None:
            continue
        with pytest.raises(exc, match=words):
            case.fn(*args, **kwargs, **case.out_kwargs([buf, *bufs[1:]]), backend="cpu")


def test_out_refuses_inputs_that_need_grad():
    """out= results are not recorded by autograd (as in torch): inputs needing grad are
    refused rather than silently detached."""
    args, kwargs = _unpermute_inputs("cpu", 0)
    eo = args[0].requires_grad_()
    with pytest.raises(ValueError, match="expert_out requires grad"):
        moe_kernels.unpermute(eo, args[1], args[2], out=torch.empty(5, 24))
    with torch.no_grad():
        moe_kernels.unpermute(eo, args[1], args[2], out=torch.empty(5, 24))
    hidden = torch.randn(5, 24, requires_grad=True)
    ids = torch.zeros(5, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="hidden requires grad"):
        moe_kernels.permute(hidden, ids, 4, out=torch.empty(10, 24))


def test_out_dtype_must_agree_with_out():
    args, _ = _gemm_inputs("cpu", 0)
    out = torch.empty(9, 160, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="out_dtype is torch.float32 but out is torch.bfloat16"):
        moe_kernels.grouped_gemm_fp8(*args, out_dtype=torch.float32, out=out)
    assert moe_kernels.grouped_gemm_fp8(*args, out=out).dtype == torch.bfloat16


def test_out_scales_needs_scales():
    ids, hidden, _, E = _routing("cpu", 0)
    with pytest.raises(ValueError, match="out_scales is given but scales is not"):
        moe_kernels.permute(hidden, ids, E, out_scales=torch.empty(10, 2))


def test_quant_out_scales_layout_must_match_flag():
    (x,), _ = _quant_inputs("cpu", 0)
    q = torch.empty(7, 300, dtype=torch.float8_e4m3fn)
    row_major = torch.empty(7, 3)
    with pytest.raises(ValueError, match="column_major_scales"):
        moe_kernels.quantize_fp8_per_token_group(x, out=(q, row_major), column_major_scales=True)
    with pytest.raises(TypeError, match="pair"):
        moe_kernels.quantize_fp8_per_token_group(x, out=q)


# --- the registered out= ops ---------------------------------------------------------------

def _out_op_args(name):
    """(registered op, its arguments) of a few out= ops on CPU inputs."""
    ids, hidden, _, E = _routing("cpu", 0)
    offsets, counts, m_idx, row_of_pair, pair_of_row = ref_permute.permute_index(ids, E, 4)
    rows = ref_permute.gather_rows(hidden, pair_of_row, ids.shape[1])
    w = torch.rand(ids.shape)
    ops = torch.ops.moe_kernels
    if name == "unpermute_out":
        return ops.unpermute_out, (rows, row_of_pair, w, torch.empty(5, 24))
    if name == "gather_rows_out":
        return ops.gather_rows_out, (hidden, pair_of_row, row_of_pair, torch.empty_like(rows))
    if name == "grouped_gemm_fp8_masked_out":
        (a, a_s, b, b_s, masked_m), _ = _gemm_inputs("cpu", 0, masked=True)
        return (ops.grouped_gemm_fp8_masked_out,
                (a, a_s, b, b_s, masked_m, False, torch.zeros(3, 5, 160)))
    if name == "fused_moe_fp8_out":
        args, _ = _fused_inputs("cpu", 0)
        return ops.fused_moe_fp8_out, (*args, torch.empty_like(args[0]))
    (x,), _ = _quant_inputs("cpu", 0)
    return (ops.quantize_fp8_per_token_group_out,
            (x, 128, 1e-10, False, torch.empty(7, 300, dtype=torch.float8_e4m3fn),
             torch.empty(7, 3)))


@pytest.mark.parametrize("name", ["unpermute_out", "gather_rows_out",
                                  "quantize_fp8_per_token_group_out", "fused_moe_fp8_out",
                                  "grouped_gemm_fp8_masked_out"])
def test_opcheck_out_ops(name):
    """The schemas declare the mutation (Tensor(a!)) and the fakes match."""
    op, args = _out_op_args(name)
    fp8_io = name.startswith(("quantize", "fused", "grouped"))
    utils = FP8_INPUT_OPCHECKS if fp8_io else None
    torch.library.opcheck(op, args, test_utils=utils or
                          ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_out_under_torch_compile(backend):
    """out= inside a fullgraph-compiled function: the buffers hold the eager results."""
    args, _ = _unpermute_inputs("cpu", 0)
    gargs, _ = _gemm_inputs("cpu", 0)

    def step(expert_out, layout, w, y, a, a_s, b, bs, m, c):
        moe_kernels.unpermute(expert_out, layout, w, out=y, backend=backend)
        moe_kernels.grouped_gemm_fp8(a, a_s, b, bs, m, out=c, backend=backend)
        return y.sum() + c.sum()

    y, c = torch.full((5, 24), float("nan")), torch.full((9, 160), float("nan"))
    total = torch.compile(step, fullgraph=True, backend="aot_eager")(*args, y, *gargs, c)
    want_y = moe_kernels.unpermute(*args, backend=backend)
    want_c = moe_kernels.grouped_gemm_fp8(*gargs, out_dtype=torch.float32, backend=backend)
    assert torch.equal(y, want_y) and torch.equal(c, want_c)
    assert torch.allclose(total, want_y.sum() + want_c.sum())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_in_place_under_torch_compile(backend):
    """fused_moe_fp8(hidden, ..., out=hidden) inside a fullgraph-compiled function: hidden
    holds the eager result."""
    args, _ = _fused_inputs("cpu", 0)
    want = moe_kernels.fused_moe_fp8(*args, backend=backend)

    def step(hidden, *rest):
        moe_kernels.fused_moe_fp8(hidden, *rest, out=hidden, backend=backend)
        return hidden.sum()

    hidden = args[0].clone()
    total = torch.compile(step, fullgraph=True, backend="aot_eager")(hidden, *args[1:])
    assert torch.equal(hidden, want)
    assert torch.allclose(total, want.sum())
