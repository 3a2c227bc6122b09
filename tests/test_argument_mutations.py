"""Every public op's valid call with one argument changed in each way its type allows:
another dtype, a dimension more or fewer, a row more or fewer, strides, a broadcast, None,
a Python list, an index out of range, a wrong Python type. Whatever the change, every
backend that runs here must do what the reference does: refuse it with the same error,
word for word, a ValueError or TypeError naming the op and an argument (docs/api.md: bad
input is refused before any launch), or accept it and return what the reference returns,
judged by the op's rules of moe_kernels.testing.

test_preconditions.py lists the documented checks one by one; this sweep finds the calls
nobody listed: a reference raising IndexError for a layout row past `expert_out` where
the kernels skip the pair, a check of `quantize_fp8_block` on the C++ backend only, torch's
NotImplementedError from `update_correction_bias_` on an fp8 bias (docs/testing.md).

Not here: non-finite and near-overflow values (test_non_finite.py; near float32's limit
the sums overflow in one order and not in another), another device (an explicitly named
backend refuses it with BackendUnavailableError by contract; test_preconditions.py's
"another device" cases), and the GPU (the same checks run before any launch there).
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels
from moe_kernels import _library, testing
from moe_kernels.testing.core import Case

import test_out as out_test
from helpers import bits

FP8 = torch.float8_e4m3fn
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, FP8, torch.int32,
          torch.int64, torch.uint8, torch.bool)
REFUSALS = (ValueError, TypeError)


def _first_set(t: torch.Tensor, value) -> torch.Tensor:
    u = t.clone()                  # strides kept: a column-major input stays one
    if u.numel():
        u[(0,) * u.dim()] = value
    return u


def _tensor_changes(t: torch.Tensor) -> dict:
    out = {f"dtype {str(d).split('.')[-1]}": (lambda d=d: t.to(d))
           for d in DTYPES if d != t.dtype}
    out |= {
        "None": lambda: None,
        "a Python list": lambda: t.tolist(),
        "a leading dimension": lambda: t[None],
        "0-d": lambda: t.flatten()[0] if t.numel() else t.sum(),
    }
    if t.dim() >= 1:
        out |= {
            "last dimension one shorter": lambda: t[..., :-1],
            "last dimension one longer": lambda: torch.cat([t, t[..., :1]], -1),
            "no rows": lambda: t[:0],
            "a row more": lambda: torch.cat([t, t[:1]], 0),
            "a row fewer": lambda: t[:-1],
            "flattened": lambda: t.flatten(),
            "strided last dimension": lambda: torch.cat([t, t], -1)[..., ::2],
            "rows broadcast (stride 0)": lambda: t[:1].expand_as(t),
        }
    if t.dim() >= 2:
        out |= {
            "transposed": lambda: t.transpose(0, 1),
            "transposed, contiguous": lambda: t.transpose(0, 1).contiguous(),
            "strided rows": lambda: torch.cat([t, t], 0)[::2],
        }
    if t.dtype in (torch.int32, torch.int64):
        for v in (-1, -2, 100, 2**31 - 1, -2**31):
            out[f"an element {v}"] = lambda v=v: _first_set(t, v)
    return out


def _scalar_changes(v) -> dict:
    out = {"None": None}
    if isinstance(v, bool):
        out |= {"the int 1": 1, "the string 'false'": "false"}
    elif isinstance(v, int):
        out |= {"0": 0, "-1": -1, "1": 1, "2**31": 2**31, "2**40": 2**40, "a float": v + 0.5,
                "an integral float": float(v), "True": True, "a string": str(v),
                "a tensor": torch.tensor(v)}
    elif isinstance(v, float):
        out |= {"0.0": 0.0, "negated": -v, "an int": int(v), "a string": str(v),
                "a tensor": torch.tensor(v), "True": True}
    elif isinstance(v, str):
        out |= {"empty": "", "upper case": v.upper(), "unknown": "xyz"}
    elif isinstance(v, tuple) and not hasattr(v, "_fields"):
        out |= {"one element": v[:1], "a list": list(v), "an element 0": (0, *v[1:])}
    return {k: (lambda x=x: x) for k, x in out.items()}


def changes(value) -> dict:
    """{description: () -> the changed value} for one argument."""
    if isinstance(value, torch.Tensor):
        return _tensor_changes(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):    # PermuteLayout, MaskedLayout
        out = {}
        for field in value._fields:
            sub = getattr(value, field)
            if isinstance(sub, torch.Tensor):
                for what, make in _tensor_changes(sub).items():
                    out[f"{field}: {what}"] = lambda f=field, m=make: value._replace(**{f: m()})
        return out
    return _scalar_changes(value)


def _base(op: str) -> Case:
    """Of the op's drawn cases (small sizes, run by the interpreter in seconds), the first
    with the most arguments given (grouped_topk's correction_bias); permute's with scales."""
    drawn = testing.cases(op, "random", seed=1)
    given = lambda c: sum(v is not None for v in c.inputs.values())
    case = max(drawn, key=given)     # the first of the most
    if op in ("permute", "permute_masked"):
        T = case.inputs["hidden"].shape[0]
        g = torch.Generator().manual_seed(2)
        case = Case(op, case.name, {**case.inputs, "scales": torch.rand(T, 3, generator=g)})
    return case


def _backends(op: str) -> list[str]:
    here = _library.available_backends("cpu")
    return [b for b in _library.OPS[op].backends if b in here and b != "reference"]


def _outcome(op: str, fn, case: Case):
    """(result, None), or (None, the exception): a reference's other than a ValueError /
    TypeError is a failure, and a backend's must be of the reference's type."""
    try:
        return testing.run(op, fn, case), None
    except REFUSALS as exc:
        return None, exc
    except Exception as exc:    # noqa: BLE001 - reported, not swallowed
        return None, exc


def _names_op_and_argument(op: str, arguments, exc: Exception) -> bool:
    """A refusal says which op and which argument (test_preconditions.py checks the very
    argument for the documented cases; any argument of the op here)."""
    text = str(exc)
    return op in text and any(a in text for a in (*arguments, "layout", "backend", "out"))


def _said(exc) -> str:
    return "accepts" if exc is None else f"{type(exc).__name__}: {exc}"


def _cannot_allocate(exc) -> bool:
    """A valid call whose output this machine cannot hold (mla_decompress_kv_paged's
    num_tokens = 2**31: 412 GB): not a question of checks."""
    return isinstance(exc, (RuntimeError, MemoryError)) and "allocate" in str(exc)


PARAMS = [(op, name) for op in testing.ops() for name in _base(op).inputs]


@pytest.mark.parametrize("op,name", PARAMS, ids=[f"{op}-{name}" for op, name in PARAMS])
def test_every_backend_does_what_the_reference_does(op, name):
    backends = _backends(op)
    assert backends, f"{op}: no backend besides the reference runs here"
    failures, counts = [], {"refused": 0, "accepted": 0, "too big to run": 0}
    arguments = list(_base(op).inputs)
    for what, make in changes(_base(op).inputs[name]).items():
        def case():   # fresh inputs for each call: an op may write into its arguments
            base = _base(op)
            inputs = dict(base.inputs)
            inputs[name] = changes(inputs[name])[what]()
            return Case(op, f"{base.name} {name}: {what}", inputs)
        want, want_exc = _outcome(op, testing.reference(op), case())
        if _cannot_allocate(want_exc):
            counts["too big to run"] += 1
            continue
        if want_exc is not None and not isinstance(want_exc, REFUSALS):
            failures.append(f"{name} {what}: reference: {type(want_exc).__name__}: {want_exc}")
            continue
        counts["accepted" if want_exc is None else "refused"] += 1
        if want_exc is not None and not _names_op_and_argument(op, arguments, want_exc):
            failures.append(f"{name} {what}: the reference's refusal names neither {op} nor "
                            f"one of its arguments: {want_exc}")
        for backend in backends:
            got, got_exc = _outcome(op, lambda *a, **k: getattr(moe_kernels, op)(
                *a, **k, backend=backend), case())
            if type(got_exc) is not type(want_exc) or str(got_exc) != str(want_exc):
                failures.append(f"{name} {what}: reference {_said(want_exc)}, "
                                f"{backend} {_said(got_exc)}")
            elif want_exc is None:
                comparison = testing.compare(op, got, want, case())
                if not comparison.passed:
                    failures.append(f"{name} {what}: {backend} differs from the reference:\n"
                                    f"{comparison}")
    assert not failures, f"{op}: {len(failures)} changes of {name}:\n" + "\n".join(failures)
    assert counts["refused"] + counts["accepted"] > 0, f"{op} {name}: no change was tried"


def _bias_update_call():
    return dict(correction_bias=torch.linspace(-1, 1, 6),
                tokens_per_expert=torch.tensor([3, 9, 0, 4, 4, 7]), rate=1e-2)


@pytest.mark.parametrize("name", list(_bias_update_call()))
def test_update_correction_bias_refuses_or_updates(name):
    """update_correction_bias_ has no backends (torch ops on the bias's device): a change
    is refused with a ValueError / TypeError, or the bias is updated in place by the
    documented step (computed here in float64)."""
    failures, tried = [], 0
    for what, make in changes(_bias_update_call()[name]).items():
        kw = _bias_update_call()
        kw[name] = make()
        bias = kw["correction_bias"]
        before = bias.clone() if isinstance(bias, torch.Tensor) else None
        tried += 1
        try:
            out = moe_kernels.update_correction_bias_(**kw)
        except REFUSALS:
            continue
        except Exception as exc:    # noqa: BLE001 - reported, not swallowed
            failures.append(f"{name} {what}: {type(exc).__name__}: {exc}")
            continue
        counts = kw["tokens_per_expert"].double()
        step = torch.sign(counts.mean() - counts) * float(kw["rate"])
        want = (before.double() + step).to(before.dtype)
        if out is not bias or not torch.equal(bias, want):
            failures.append(f"{name} {what}: got {bias}, want {want} in place")
    assert not failures, "\n".join(failures)
    assert tried


def _buffers(case, backend):
    """(args, kwargs, the functional result's tensors that out= replaces) on the CPU."""
    args, kwargs = case.make("cpu", 0)
    return args, kwargs, case.outputs(case.fn(*args, **kwargs, backend=backend))


OUT_PARAMS = [(name, i) for name, case in out_test.CASES.items()
              for i in range(len(_buffers(case, "reference")[2]))]


@pytest.mark.parametrize("name,index", OUT_PARAMS, ids=[f"{n}-out{i}" for n, i in OUT_PARAMS])
def test_out_buffer_changes(name, index):
    """out= buffers (test_out.py's cases) with one buffer changed: every backend refuses it
    as the reference does, or writes the functional result into it and returns it (a None
    buffer: the functional result, allocated by the op)."""
    case = out_test.CASES[name]
    backends = ["reference", *_backends(case.fn.__name__)]
    failures, tried = [], 0
    for what in changes(_buffers(case, "reference")[2][index]):
        outcomes = {}
        for backend in backends:
            args, kwargs, want = _buffers(case, backend)
            bufs = [torch.empty_like(w) for w in want]
            bufs[index] = changes(want[index])[what]()
            try:
                got = case.outputs(case.fn(*args, **kwargs, **case.out_kwargs(bufs),
                                           backend=backend))
            except REFUSALS as exc:
                outcomes[backend] = type(exc).__name__
                continue
            except Exception as exc:    # noqa: BLE001 - reported, not swallowed
                outcomes[backend] = f"{type(exc).__name__}: {exc}"
                continue
            same = all((b is None or g is b) and g.shape == w.shape
                       and torch.equal(bits(g), bits(w)) for g, b, w in zip(got, bufs, want))
            outcomes[backend] = "written" if same else "accepted, not the functional result"
        tried += 1
        if len(set(outcomes.values())) > 1 or not set(outcomes.values()) <= {
                "written", "ValueError", "TypeError"}:
            failures.append(f"out{index} {what}: {outcomes}")
    assert not failures, f"{name}:\n" + "\n".join(failures)
    assert tried


def _allocates_its_size(what: str) -> bool:
    """A size of 2^31 or 2^40 for a function that allocates tables or weights of that size
    before anything could refuse it (as torch.nn.Linear does): the allocation may
    succeed and exhaust the machine."""
    return what.startswith("2**")


def _eplb_call():
    return dict(weight=torch.arange(16, dtype=torch.float32).view(2, 8) % 5 * 10,
                num_replicas=12, num_groups=4, num_nodes=2, num_gpus=4)


@pytest.mark.parametrize("name", list(_eplb_call()))
def test_eplb_refuses_or_gives_tables_a_placement_takes(name):
    """eplb.rebalance_experts: a change is refused with a ValueError / TypeError, or its
    tables make a valid ExpertPlacement for every layer (from_eplb checks them)."""
    failures, tried = [], 0
    for what, make in changes(_eplb_call()[name]).items():
        if _allocates_its_size(what):
            continue
        kw = _eplb_call()
        kw[name] = make()
        tried += 1
        try:
            phy2log, log2phy, logcnt = moe_kernels.eplb.rebalance_experts(**kw)
            for layer in range(phy2log.shape[0]):
                moe_kernels.ExpertPlacement.from_eplb(phy2log[layer], log2phy[layer],
                                                      logcnt[layer], kw["num_gpus"])
        except REFUSALS:
            continue
        except Exception as exc:    # noqa: BLE001 - reported, not swallowed
            failures.append(f"{name} {what}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
    assert tried


LAYER = dict(hidden_size=128, moe_intermediate_size=128, n_routed_experts=8,
             num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
             routed_scaling_factor=2.5, norm_topk_prob=True, backend="cpu")


def _random_weights(layer):
    """The layer with drawn weights (a constructed layer's are zeros: every output 0):
    FP8 codes of |w| ~ 32 with block scales 2^-9, a router of std 0.05, a bias in [0, 0.1)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, buf in layer.named_buffers():
            if buf.dtype == FP8:
                buf.copy_((torch.randn(buf.shape, generator=g) * 32).to(FP8))
            elif name.endswith("_scale"):
                buf.fill_(2.0 ** -9)
            elif name == "gate_weight":
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.05)
            elif name == "e_score_correction_bias":
                buf.copy_(torch.rand(buf.shape, generator=g) * 0.1)
    return layer


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not built")
@pytest.mark.parametrize("name", list(LAYER))
def test_layer_refuses_or_runs(name):
    """DeepseekV3MoE: a changed constructor argument is refused with a ValueError /
    TypeError, or the layer runs a forward of the right shape."""
    failures, tried = [], 0
    for what, make in changes(LAYER[name]).items():
        if _allocates_its_size(what):
            continue
        kw = dict(LAYER, **{name: make()})
        tried += 1
        try:
            layer = _random_weights(moe_kernels.DeepseekV3MoE(**kw))
        except REFUSALS:
            continue
        except Exception as exc:    # noqa: BLE001 - reported, not swallowed
            failures.append(f"{name} {what}: constructor {type(exc).__name__}: {exc}")
            continue
        x = torch.randn(3, kw["hidden_size"], generator=torch.Generator().manual_seed(0))
        try:
            out = layer(x)
            if out.shape != x.shape or not torch.isfinite(out).all() or not out.any():
                failures.append(f"{name} {what}: forward gave {tuple(out.shape)}, finite: "
                                f"{bool(torch.isfinite(out).all())}, nonzero: {bool(out.any())}")
        except Exception as exc:    # noqa: BLE001 - a built layer must run
            failures.append(f"{name} {what}: forward {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
    assert tried


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not built")
def test_layer_forward_refuses_or_runs():
    """DeepseekV3MoE.forward with its hidden states changed: refused with a ValueError /
    TypeError, or an output of hidden's shape and dtype, equal to the forward of the same
    values in a contiguous tensor (strides and broadcasts change nothing)."""
    layer = _random_weights(moe_kernels.DeepseekV3MoE(**LAYER))
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    assert layer(x).abs().min() > 0          # every output element takes the weights
    failures = []
    for what, make in changes(x).items():
        h = make()
        try:
            out = layer(h)
        except REFUSALS:
            continue
        except Exception as exc:    # noqa: BLE001 - reported, not swallowed
            failures.append(f"{what}: {type(exc).__name__}: {exc}")
            continue
        want = layer(h.contiguous().clone())
        if out.shape != h.shape or out.dtype != h.dtype or not torch.equal(out, want):
            failures.append(f"{what}: output {tuple(out.shape)} {out.dtype} is not the "
                            f"forward of the same values, contiguous")
    assert not failures, "\n".join(failures)
