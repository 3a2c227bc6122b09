"""What the property-test modules (tests/test_<op>_properties.py) share: drawing a memory
layout for every tensor argument, and the layout rule every op obeys.

The layout rule (docs/api.md): an argument that must have a contiguous last dimension is
refused with a ValueError saying so when it has not; every other layout (padded rows,
every other element, column-major, a storage offset, stride 0) is accepted and gives
exactly, bit for bit, what the same values laid out contiguously give.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_kernels import _library

from helpers import bits, device_backend_params


def _contiguous(t):
    return t


def _junk(shape, like: torch.Tensor) -> torch.Tensor:
    """A buffer whose elements outside the view read as something a kernel must never
    use: bytes 0x7F for floats (NaN in fp8, ~3.4e38 in bf16 / float32), 1 for ints (a
    plausible but wrong index)."""
    if like.is_floating_point():
        n = like.element_size()
        return torch.full((*shape[:-1], shape[-1] * n), 0x7F, dtype=torch.uint8,
                          device=like.device).view(like.dtype)
    return torch.ones(shape, dtype=like.dtype, device=like.device)


def _padded_rows(t):
    view = _junk((*t.shape[:-1], t.shape[-1] + 5), t)[..., :t.shape[-1]]
    view.copy_(t)
    return view


def _every_other(t):
    view = _junk((*t.shape[:-1], 2 * t.shape[-1]), t)[..., 1::2]
    view.copy_(t)
    return view


def _column_major(t):
    """Last two dimensions transposed in memory (a (1, M) stride for 2-D)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t


def _offset(t):
    """Same values at a non-zero storage offset (a slice of a larger flat buffer)."""
    view = _junk((t.numel() + 3,), t)[3:].view(t.shape)
    view.copy_(t)
    return view


def _expanded(t):
    """The first slice along dim 0 repeated with stride 0: other values, same shape."""
    return t[:1].expand(t.shape) if t.shape[0] > 0 else t


LAYOUTS = {"padded rows": _padded_rows, "every other": _every_other,
           "column-major": _column_major, "offset": _offset, "expanded": _expanded}
# Layouts that keep the last dimension contiguous (what a `rows` argument takes).
ROW_LAYOUTS = ("padded rows", "offset", "expanded")


def layouts_for(t: torch.Tensor, *, rows=False, keep_values=False) -> list[str]:
    """The layouts worth drawing for t, each of which differs from t's contiguous layout.
    For a `rows` argument, the accepted layouts come three times as often as the refused
    ones (a refused example checks one thing; an accepted one checks the result)."""
    if t.dim() == 0:
        return ["offset"]
    names = [n for n in LAYOUTS if not (t.dim() == 1 and n in ("column-major", "padded rows"))
             and not (keep_values and n == "expanded")]
    if rows:
        names = [n for n in names if n in ROW_LAYOUTS] * 3 + \
            [n for n in names if n not in ROW_LAYOUTS]
    return names


def draw_layouts(data, inputs: dict, *, rows=(), keep_values=()) -> tuple[dict, dict]:
    """`inputs` with every tensor (and every tensor field of a PermuteLayout / MaskedLayout)
    in a drawn non-contiguous layout; returns (inputs, {argument: layout}). `rows`: the
    arguments that need a contiguous last dimension. Arguments in `keep_values` are never
    expanded (stride 0 changes the values; some, e.g. a permute layout's fields, must keep
    theirs to stay valid)."""
    out, chosen = {}, {}
    for name, v in inputs.items():
        if isinstance(v, torch.Tensor):
            out[name], chosen[name] = _draw(data, name, v, name in rows, name in keep_values)
        elif isinstance(v, tuple) and hasattr(v, "_fields"):
            fields = {}
            for f in v._fields:
                t = getattr(v, f)
                if isinstance(t, torch.Tensor):
                    fields[f], chosen[f"{name}.{f}"] = _draw(data, f"{name}.{f}", t, False, True)
            out[name] = v._replace(**fields)
        else:
            out[name] = v
    return out, chosen


def _draw(data, label, t, rows, keep_values):
    layout = data.draw(st.sampled_from(layouts_for(t, rows=rows, keep_values=keep_values)),
                       label=f"layout of {label}")
    return LAYOUTS[layout](t), layout


def _map_tensors(fn, inputs: dict) -> dict:
    def one(v):
        if isinstance(v, torch.Tensor):
            return fn(v)
        if isinstance(v, tuple):
            items = [one(x) for x in v]
            return type(v)(*items) if hasattr(v, "_fields") else tuple(items)
        return v
    return {k: one(v) for k, v in inputs.items()}


def contiguous_copy(inputs: dict) -> dict:
    """The same values, every tensor contiguous."""
    return _map_tensors(torch.Tensor.contiguous, inputs)


def on(device, inputs: dict) -> dict:
    """inputs with every tensor moved to `device`."""
    return _map_tensors(lambda t: t.to(device), inputs)


def flat(result):
    """The tensors of a result (tuples and layouts unrolled, None left out)."""
    if isinstance(result, torch.Tensor):
        return [result]
    out = []
    for r in result:
        if isinstance(r, torch.Tensor):
            out.append(r)
        elif isinstance(r, tuple):
            out += flat(r)
    return out


def call(fn, inputs: dict, backend: str, *, rows=()):
    """fn(**inputs, backend=backend) under the layout rule. `rows`: the arguments that need
    a contiguous last dimension. Returns the result, or None when the op (rightly) refused
    the layout."""
    refused = [n for n in rows if _needs_refusal(inputs.get(n))]
    if refused:
        try:
            fn(**inputs, backend=backend)
        except ValueError as exc:
            assert "contiguous last dimension" in str(exc) and any(n in str(exc) for n in refused), \
                f"refused for another reason: {exc}"
            return None
        raise AssertionError(f"{refused} without a contiguous last dimension were accepted")
    got = fn(**inputs, backend=backend)
    want = fn(**contiguous_copy(inputs), backend=backend)
    got_t, want_t = flat(got), flat(want)
    assert len(got_t) == len(want_t)
    for i, (a, b) in enumerate(zip(got_t, want_t)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"output {i}: {a.shape} vs {b.shape}"
        assert torch.equal(bits(a), bits(b)), f"output {i} depends on the inputs' layout"
    return got


def _needs_refusal(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] > 1 and t.stride(-1) != 1


def backend_params(op: str):
    """(device, backend) params over every backend that implements `op`."""
    return device_backend_params(_library.OPS[op].backends)


def property_test(op: str, max_examples: int = 25):
    """A hypothesis test `fn(device, backend, data)` run on every backend of `op`."""
    def wrap(fn):
        fn = given(data=st.data())(settings(max_examples=max_examples)(fn))
        return pytest.mark.parametrize("device,backend", backend_params(op))(fn)
    return wrap


def interpreting(device: str, backend: str) -> bool:
    """Triton under the interpreter (numpy, ~1000x slower): draw small sizes."""
    return backend == "triton" and device == "cpu"


def reference(fn, inputs: dict):
    """fn on the reference backend, on the CPU, with inputs' values laid out contiguously."""
    return fn(**contiguous_copy(on("cpu", inputs)), backend="reference")


