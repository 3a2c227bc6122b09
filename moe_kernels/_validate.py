"""Argument checks shared by every op: each raises before any launch and names the argument.

They read only metadata (shape, dtype, device, strides), never tensor values, so they cost
no host synchronisation and trace cleanly under torch.compile.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad

from moe_kernels._common import FLOAT_DTYPES, FP8


STRIDED = torch.strided


def check_tensor(op: str, name: str, x, *, ndim: int | None = None, dtypes=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout is not STRIDED:
        # sparse and mkldnn tensors have no strides or data pointer to read: every kernel,
        # the reference's included, takes dense tensors
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout "
                        f"{x.layout}; call .to_dense() first")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {x.dtype}")


def all_strided(*tensors) -> bool:
    """Whether every tensor is dense: check_tensor's layout check, for the ops' fast
    predicates (~45 ns a tensor), ahead of any stride read (a CSR tensor raises on one)."""
    for t in tensors:
        if t.layout is not STRIDED:
            return False
    return True


def check_float_tensor(op: str, name: str, x, *, ndim: int | None = None) -> None:
    check_tensor(op, name, x, ndim=ndim)
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a float tensor, got {x.dtype}")


def check_same_device(op: str, name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}")


def check_last_dim_contiguous(op: str, name: str, x: torch.Tensor) -> None:
    if x.dim() >= 1 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"{op}: {name} must have a contiguous last dimension (stride 1), got strides "
            f"{tuple(x.stride())}; call .contiguous() first")


def check_bool(op: str, name: str, value) -> None:
    """A flag must be a bool: a string "false" or a tensor would be taken by its truth."""
    if type(value) is not bool:
        raise TypeError(f"{op}: {name} must be a bool, got {value!r}")


def check_int(op: str, name: str, value, *, low: int | None = None, high: int | None = None,
              high_name: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{op}: {name} must be >= {low}, got {value}")
    if high is not None and value > high:
        bound = f"{high_name} = {high}" if high_name else str(high)
        raise ValueError(f"{op}: {name} must be <= {bound}, got {value}")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {value!r}")


def check_fp8(op: str, name: str, x, ndim: int | None = None) -> None:
    check_tensor(op, name, x, ndim=ndim)
    if x.dtype != FP8:
        raise TypeError(f"{op}: {name} must be float8_e4m3fn, got {x.dtype}")


def check_scales(op: str, name: str, s, shape: tuple, ref_name: str, ref) -> None:
    """s: float32 of exactly `shape` (derived from ref's shape), on ref's device."""
    check_tensor(op, name, s, dtypes=(torch.float32,))
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} (from {ref_name}'s "
                         f"shape {tuple(ref.shape)}), got {tuple(s.shape)}")
    check_same_device(op, name, s, ref_name, ref)


# --- out= buffers -------------------------------------------------------------------------

def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses t's elements can touch (t has numel > 0)."""
    if t.is_contiguous():
        extent = t.numel()
    else:
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b can share a byte (conservative: interleaved views count as sharing)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    a0, a1 = _byte_range(a)
    b0, b1 = _byte_range(b)
    return a0 < b1 and b0 < a1


def check_out(op: str, name: str, out, shape: tuple, dtypes, ref_name: str, ref: torch.Tensor,
              inputs: dict) -> None:
    """An out= buffer: exactly `shape`, a dtype of `dtypes`, contiguous, on ref's device, no
    autograd, sharing no memory with any tensor of `inputs` ({name: tensor or None}). The
    kernels write every element, so its prior contents never matter (NaN included).
    The overlap test reads addresses, which torch.compile cannot trace: under compile,
    functionalization gives out= its copy semantics instead."""
    check_tensor(op, name, out, dtypes=dtypes)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    check_same_device(op, name, out, ref_name, ref)
    if not out.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got strides {tuple(out.stride())}")
    if out.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: {name} requires grad; out= buffers are not differentiable "
                         f"(as in torch: call without out= to get a differentiable result)")
    check_no_overlap(op, name, out, inputs)


def holds_no_data(t: torch.Tensor) -> bool:
    """Whether t's values and addresses cannot be read: a tensor traced by torch.compile, a
    meta tensor, or a FakeTensor (torch.export, FakeTensorMode: data_ptr throws, and its
    storage is null)."""
    return (torch.compiler.is_compiling() or t.is_meta
            or (type(t) is not torch.Tensor and torch._subclasses.fake_tensor.is_fake(t)))


def check_elements_apart(op: str, name: str, out: torch.Tensor) -> None:
    """ValueError when two elements of the buffer `out` share memory (an expanded tensor,
    stride 0), by a rule exact for every slice, view or permutation of one buffer: its
    dimensions of size > 1, taken by increasing stride, each pass the last element the
    smaller ones reach. Only for buffers that may have any strides (MLA's outputs); the
    others must be contiguous."""
    reach = 0
    for stride, size in sorted((out.stride(d), out.shape[d]) for d in range(out.dim())
                               if out.shape[d] > 1):
        if stride <= reach:
            raise ValueError(f"{op}: {name} has elements that share memory (strides "
                             f"{tuple(out.stride())}): an output needs a place for each value")
        reach += stride * (size - 1)


def check_no_overlap(op: str, name: str, out: torch.Tensor, inputs: dict) -> None:
    """ValueError when the buffer `out` shares memory with a tensor of `inputs`; nothing to
    compare for tensors without data (torch.compile's functionalisation gives out= copy
    semantics there)."""
    if holds_no_data(out):
        return
    for input_name, x in inputs.items():
        if x is not None and may_overlap(out, x):
            raise ValueError(f"{op}: {name} shares memory with {input_name}; an out= buffer "
                             f"must not overlap an input")


def _first_requiring_grad(inputs: dict) -> str | None:
    """The name of the first tensor of `inputs` that autograd would record a use of."""
    if torch.is_grad_enabled():
        for name, x in inputs.items():
            if isinstance(x, torch.Tensor) and x.requires_grad:
                return name
    return None


def check_no_grad_inputs(op: str, **inputs) -> None:
    """out= results are not recorded by autograd (as in torch), so no input may need one."""
    name = _first_requiring_grad(inputs)
    if name is not None:
        raise ValueError(f"{op}: out= does not support autograd, but {name} requires grad; "
                         f"call without out= or under torch.no_grad()")


def _jvp_transform_active() -> bool:
    """Whether a torch.func.jvp (or jacfwd, hessian) transform is on the functorch stack."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    jvp = torch._C._functorch.TransformType.Jvp
    return any(i.key() == jvp for i in retrieve_all_functorch_interpreters())


def forward_ad_possible() -> bool:
    """Whether forward-mode AD may be tracking a tensor: a `torch.autograd.forward_ad`
    dual level is open, or a torch.func transform is active (~0.06 us when neither)."""
    return _fwad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def autodiff_possible() -> bool:
    """Whether reverse- or forward-mode AD may record a call: the forward-only ops' checks
    run only then (forward-mode AD runs under torch.no_grad() too)."""
    return torch.is_grad_enabled() or forward_ad_possible()


# what check_no_forward_ad adds for the differentiable ops and for the forward-only ones
_FORWARD_AD_DIFFERENTIABLE = ("; reverse mode is (backward, torch.func.grad / vjp / jacrev),"
                              " and backend='reference' implements both")
_FORWARD_AD_FORWARD_ONLY = " (forward only, on every backend)"


def check_no_forward_ad(op: str, inputs: dict, hint: str) -> None:
    """NotImplementedError when forward-mode AD (torch.func.jvp / jacfwd, or a dual tensor
    of torch.autograd.forward_ad) would follow one of `inputs` ({name: tensor}) through a
    kernel without a forward-mode formula: the registered op gave a zero tangent without
    a word (torch.func.jvp of grouped_topk on the cpu backend: tangent 0)."""
    if _fwad._current_level >= 0:
        for name, x in inputs.items():
            if isinstance(x, torch.Tensor) and _fwad.unpack_dual(x).tangent is not None:
                raise NotImplementedError(f"{op}: {name} is a dual tensor of forward-mode AD, "
                                          f"which {op} does not implement{hint}")
    if torch._C._are_functorch_transforms_active() and _jvp_transform_active():
        raise NotImplementedError(f"{op}: torch.func.jvp / jacfwd (forward-mode AD) is not "
                                  f"implemented by {op}{hint}")


def check_differentiable_kernel(op: str, backend: str, inputs: dict) -> None:
    """A differentiable op's kernels have a backward, not a forward-mode formula: on a
    kernel backend, forward-mode AD through `inputs` is refused (check_no_forward_ad);
    the reference's torch ops give the tangent."""
    if backend != "reference" and forward_ad_possible():
        check_no_forward_ad(op, inputs, _FORWARD_AD_DIFFERENTIABLE)


def check_forward_only(op: str, **inputs) -> None:
    """ValueError when an input requires grad (grad mode on) of an op with no backward whose
    result depends smoothly on it (GEMMs, MLA, fused_moe_fp8, expert parallelism): its
    gradient would be missing without a word, which in fine-tuning trains the layers
    before it wrongly. Under torch.no_grad() / torch.inference_mode(), or with detached
    inputs, the op runs. Forward-mode AD is refused likewise (check_no_forward_ad), on
    every backend. Callers test autodiff_possible() first, so that an inference call does
    not pay for building the keywords."""
    name = _first_requiring_grad(inputs)
    if name is not None:
        raise ValueError(f"{op}: {name} requires grad, but {op} has no backward (forward "
                         f"only); call it under torch.no_grad() or torch.inference_mode(), "
                         f"or pass {name}.detach()")
    if forward_ad_possible():
        check_no_forward_ad(op, inputs, _FORWARD_AD_FORWARD_ONLY)
