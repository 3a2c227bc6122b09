"""What each op does with inputs that require grad, identical on every backend and through
every path (eager, torch.ops, torch.compile) (docs/api.md, "Autograd"):

- differentiable (gating, permutation): outputs require grad as the reference's do, and
  backward runs (each op's own test checks the gradient's values);
- no gradient by nature (the FP8 quantizers, dequantize): outputs never require grad;
- forward only (the GEMMs, fused_moe_fp8, MLA, expert parallelism, the layer): an input
  that requires grad is a ValueError naming it while grad mode is on (a missing gradient
  would otherwise go unnoticed), and the op runs under torch.no_grad().

Why: the kernels are called directly on the eager path, so without a rule their outputs
would be detached, while the reference's carried a gradient and the registered ops' got
torch's deprecated not-implemented fallback (requires grad, gradient dropped with a
warning at backward): three behaviours for one call.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moe_kernels
from moe_kernels import _library, testing

from helpers import device_backend_params
from properties import flat
from test_layer import LAYER_PARAMS, make_fp8_layer, make_hidden

DIFFERENTIABLE = ("grouped_topk", "permute", "permute_masked", "unpermute")
NO_GRADIENT = ("quantize_fp8_per_token_group", "silu_and_mul_quant_fp8",
               "quantize_fp8_block", "dequantize_fp8_block")
FORWARD_ONLY = ("grouped_gemm_fp8", "grouped_gemm_fp8_masked", "fused_moe_fp8",
                "mla_decompress_kv", "mla_decompress_kv_paged")


INTEGER_ONLY = ("moe_align_block_size",)     # no float input


def test_every_op_has_a_rule():
    assert sorted(DIFFERENTIABLE + NO_GRADIENT + FORWARD_ONLY + INTEGER_ONLY) == testing.ops()


def _with_grad(case):
    """(args, kwargs) of the case with every float input (not fp8, not an out= buffer)
    requiring grad, and the names of those inputs."""
    names = [k for k, x in case.inputs.items()
             if isinstance(x, torch.Tensor) and x.is_floating_point() and x.element_size() > 1
             and not k.startswith("out")]
    inputs = {k: x.detach().clone().requires_grad_(True) if k in names else x
              for k, x in case.inputs.items()}
    args, kwargs = testing.run(case.op, lambda *a, **k: (a, k),
                               dataclasses.replace(case, inputs=inputs))
    return args, kwargs, names


def _grad_cases(op, device):
    return [c for c in testing.cases(op, "edge", device=device)
            if not any(k.startswith("out") for k in c.inputs)]


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("op", testing.ops())
def test_inputs_that_require_grad(device, backend, op):
    if backend not in _library.OPS[op].backends:
        pytest.skip(f"{op} has no {backend} backend")
    if op in INTEGER_ONLY:
        pytest.skip(f"{op} takes no float input")
    public = getattr(moe_kernels, op)
    checked = 0
    for case in _grad_cases(op, device):
        args, kwargs, names = _with_grad(case)
        if not names:
            continue
        try:
            want = public(*args, backend="reference", **kwargs)
        except ValueError as exc:
            if op in FORWARD_ONLY and "requires grad" in str(exc):
                with pytest.raises(ValueError, match=f"{op}: .* requires grad"):
                    public(*args, backend=backend, **kwargs)
                assert any(f"{n} requires grad" in str(exc) for n in names), str(exc)
                with torch.no_grad():
                    public(*args, backend=backend, **kwargs)
                checked += 1
            continue   # the case is refused for another reason, on every backend alike
        assert op not in FORWARD_ONLY, f"{case.name}: ran with {names} requiring grad"
        got = public(*args, backend=backend, **kwargs)
        got_flags = [t.requires_grad for t in flat(got)]
        if op in NO_GRADIENT:
            assert not any(got_flags), f"{case.name}: {got_flags}"
        else:
            assert got_flags == [t.requires_grad for t in flat(want)], case.name
            assert any(got_flags), case.name
            sum(t.float().sum() for t in flat(got) if t.requires_grad).backward()
        checked += 1
    assert checked, f"{op}: no edge case took an input that requires grad"


def _registered_calls():
    """(op, registered call) with float inputs that require grad, by the schemas' order.
    (MLA's registered ops write into buffers: they have no output to mark.)"""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=g, requires_grad=True)
    q, s = moe_kernels.quantize_fp8_block(torch.randn(256, 256, generator=g))
    s = s.clone().requires_grad_(True)
    ops = torch.ops.moe_kernels
    return {
        "quantize_fp8_per_token_group":
            lambda: ops.quantize_fp8_per_token_group(x, 128, 1e-10, False, False),
        "silu_and_mul_quant_fp8": lambda: ops.silu_and_mul_quant_fp8(x, 128, 1e-10),
        "dequantize_fp8_block": lambda: ops.dequantize_fp8_block(q, s, 128, 128, torch.float32),
        "grouped_gemm_fp8": lambda: ops.grouped_gemm_fp8(
            q, torch.rand(256, 2, generator=g, requires_grad=True), q[None], s[None],
            torch.zeros(256, dtype=torch.int32), torch.float32),
    }


@pytest.mark.parametrize("op", list(_registered_calls()))
def test_registered_op_outputs_never_require_grad(op):
    """Through torch.ops (the dispatcher, what compiled graphs call; direct calls skip the
    public checks), the ops without a backward give outputs that do not require grad,
    where torch's fallback would mark them and drop the gradient at backward with only a
    warning."""
    outputs = flat(_registered_calls()[op]())
    assert outputs and not any(t.requires_grad for t in outputs)


@pytest.mark.parametrize("device,backend", LAYER_PARAMS)
def test_layer_is_forward_only(device, backend):
    layer, cfg = make_fp8_layer(device, backend)
    hidden = make_hidden(3, cfg, device=device).requires_grad_(True)
    with pytest.raises(ValueError, match="DeepseekV3MoE: hidden requires grad"):
        layer(hidden)
    with torch.no_grad():
        want = layer(hidden)
    assert torch.equal(layer(hidden.detach()), want)
    weights, _ = layer.route(hidden)                 # the router alone is differentiable
    weights.sum().backward()
    assert hidden.grad is not None
    primal = hidden.detach()
    with torch.no_grad(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(layer, (primal,), (torch.ones_like(primal),))


def test_expert_parallel_ops_are_forward_only():
    """Refused before anything else is checked (no process group is needed to see it)."""
    hidden = torch.randn(3, 128, requires_grad=True)
    ids = torch.zeros(3, 2, dtype=torch.int32)
    placement = moe_kernels.ExpertPlacement.uniform(4, 1)
    with pytest.raises(ValueError, match="ep_dispatch: hidden requires grad"):
        moe_kernels.ep_dispatch(hidden, ids, torch.rand(3, 2), placement)
    with pytest.raises(ValueError, match="ep_dispatch: topk_weights requires grad"):
        moe_kernels.ep_dispatch(hidden.detach(), ids, torch.rand(3, 2, requires_grad=True),
                                placement)


@pytest.mark.parametrize("op", ["quantize_fp8_per_token_group", "mla_decompress_kv"])
def test_compiled_calls_follow_the_rules(op):
    """Under torch.compile(fullgraph=True) the rules hold as in eager: a quantizer's outputs
    do not require grad, a forward-only op refuses (the check traces)."""
    torch._dynamo.reset()
    x = torch.randn(4, 256, requires_grad=True)
    if op == "quantize_fp8_per_token_group":
        q, s = torch.compile(moe_kernels.quantize_fp8_per_token_group, fullgraph=True)(x)
        assert not q.requires_grad and not s.requires_grad
        return
    w = torch.randn(2 * 256, 256)
    fn = torch.compile(lambda c, pe: moe_kernels.mla_decompress_kv(c, pe, w, num_heads=2),
                       fullgraph=True)
    with pytest.raises(Exception, match="kv_c requires grad"):
        fn(x, torch.randn(4, 64))


def _float_call(op, public, case, backend):
    """(f, primals): f(*float inputs) -> the op's float outputs, the case's other inputs
    fixed; primals: those float inputs (not fp8, not out= buffers), or None without one."""
    names = [k for k, x in case.inputs.items()
             if isinstance(x, torch.Tensor) and x.is_floating_point() and x.element_size() > 1
             and x.numel() > 0 and not k.startswith("out")]
    if not names:
        return None, None

    def f(*xs):
        inputs = {**case.inputs, **dict(zip(names, xs))}
        result = testing.run(op, lambda *a, **k: public(*a, backend=backend, **k),
                             dataclasses.replace(case, inputs=inputs))
        return tuple(t for t in flat(result) if t.is_floating_point())

    # dense copies (a stride-0 edge case cannot carry a tangent); the differentiable ops
    # in float32, so that the dot-product test below sees no bf16 rounding
    dtype = torch.float32 if op in DIFFERENTIABLE else None
    return f, tuple(case.inputs[k].to(dtype=dtype).clone(memory_format=torch.contiguous_format)
                    for k in names)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("op", DIFFERENTIABLE + FORWARD_ONLY)
def test_forward_mode_ad(device, backend, op):
    """Forward-mode AD (torch.func.jvp, jacfwd, dual tensors) has no formula in the
    kernels: they refuse it (NotImplementedError), where the registered op gave a zero
    tangent without a word. The differentiable ops' reference gives the tangent, which
    the dot-product test holds to reverse mode: <u, J t> = <J^T u, t>. Forward-only ops
    refuse it on every backend, under torch.no_grad() too (which leaves forward AD on)."""
    if backend not in _library.OPS[op].backends:
        pytest.skip(f"{op} has no {backend} backend")
    public = getattr(moe_kernels, op)
    g = torch.Generator().manual_seed(0)
    checked = 0
    for case in _grad_cases(op, device):
        f, primals = _float_call(op, public, case, backend)
        if f is None or not all(t.numel() for t in f(*primals)):
            continue
        tangents = tuple(torch.randn(p.shape, generator=g).to(p) for p in primals)
        if op in FORWARD_ONLY or backend != "reference":
            with pytest.raises(NotImplementedError, match=f"{op}: .*forward-mode AD"):
                torch.func.jvp(f, primals, tangents)
            if op in FORWARD_ONLY:
                with torch.no_grad(), pytest.raises(NotImplementedError, match="forward-mode"):
                    torch.func.jvp(f, primals, tangents)
        else:
            outputs, jt = torch.func.jvp(f, primals, tangents)
            us = tuple(torch.randn(o.shape, generator=g).to(o) for o in outputs)
            jtu = torch.func.vjp(f, *primals)[1](us)
            lhs = sum((u.double() * t.double()).sum() for u, t in zip(us, jt))
            rhs = sum((a.double() * t.double()).sum() for a, t in zip(jtu, tangents))
            torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked, f"{op}: no case with float inputs and outputs"


def _differentiable_call(op, device, backend, dtype):
    """(f, inputs): the op as a function of its float inputs (dtype), on inputs whose
    routing no finite-difference step of gradcheck flips (scores 0.05 apart): one
    skipped pair, expert 2 past the masked layout's capacity."""
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([[0, 2], [2, -1], [1, 2], [2, 0]], dtype=torch.int32, device=device)
    hidden = torch.randn(4, 3, generator=g, dtype=dtype).to(device)
    if op == "grouped_topk":
        logits = (torch.randperm(32, generator=g).view(4, 8) * 0.05).to(dtype).to(device)
        return (lambda x: moe_kernels.grouped_topk(x, 2, num_expert_group=2, topk_group=1,
                                                   backend=backend)[0]), (logits,)
    if op == "permute":
        return (lambda h: moe_kernels.permute(h, ids, 4, align=2, backend=backend)[0]), (hidden,)
    if op == "permute_masked":
        return (lambda h: moe_kernels.permute_masked(h, ids, 4, 2, backend=backend)[0]), (hidden,)
    _, layout = moe_kernels.permute(hidden, ids, 4, align=2, backend=backend)
    expert_out = torch.randn(layout.m_indices.shape[0], 3, generator=g, dtype=dtype).to(device)
    w = torch.rand(4, 2, generator=g, dtype=dtype).to(device)
    return (lambda e, wt: moe_kernels.unpermute(e, layout, wt, backend=backend)), (expert_out, w)


@pytest.mark.filterwarnings("ignore:Input #[0-9]+ requires gradient and is not a double")
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("op", DIFFERENTIABLE)
def test_double_backward(device, backend, op):
    """The backward of each differentiable op is differentiable again (create_graph=True:
    gradient penalties, Hessian-vector products): gradgradcheck in float32, whose steps
    and tolerance fit float32 (these functions are linear, bilinear or smooth here)."""
    if backend not in _library.OPS[op].backends:
        pytest.skip(f"{op} has no {backend} backend")
    if op == "grouped_topk" and backend == "triton" and device == "cpu":
        pytest.skip("grouped_topk's backward is the same torch code on every kernel backend "
                    "(the cpu case runs it); under the interpreter it took 4.7 s")
    f, inputs = _differentiable_call(op, device, backend, torch.float32)
    inputs = tuple(x.requires_grad_(True) for x in inputs)
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-2, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("op", ("permute", "permute_masked"))
def test_float64_gradcheck(device, backend, op):
    """permute and permute_masked copy rows of any dtype, float64 too, which is what
    torch.autograd.gradcheck runs: their gradient and its gradient match finite
    differences on every backend. (The kernels' unpermute, which sums the gradient's rows
    for float dtypes, takes float32 / bf16 / fp16 only.)"""
    if backend not in _library.OPS[op].backends:
        pytest.skip(f"{op} has no {backend} backend")
    f, (hidden,) = _differentiable_call(op, device, backend, torch.float64)
    hidden.requires_grad_(True)
    assert torch.autograd.gradcheck(f, (hidden,))
    assert torch.autograd.gradgradcheck(f, (hidden,))
