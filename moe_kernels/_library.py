"""The `moe_kernels` op namespace: every schema, the soft load of `moe_kernels._C`, the
backends, and `Op`, the one declaration each op makes.

Schemas are defined here in Python, once per op (`Op(name, signature, ...)` in the op's
module), and nowhere else: the package must import and trace (fakes, torch.compile)
without the compiled extension, and the Triton kernels, which exist only in Python, need
the schemas anyway. The C++ kernels are registered here too, per dispatch key, as a
Python function that runs the entry point's C++ check (`_C.<op>_<backend>_check`, which
reports instead of throwing), raises its error, and then calls the entry point
`_C.<op>_<backend>`: no argument of a direct torch.ops call makes C++ code throw
(csrc/checks.h says why). C++ programs that use the `.so` without Python do not see the
ops (the schemas are Python's).

Backends of every op: "reference" (pure PyTorch, float32 math, the oracle), "triton"
(GPU; CPU under TRITON_INTERPRET=1), "cpu" (C++), "cuda" (C++/CUDA).
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

NAMESPACE = "moe_kernels"
BACKENDS = ("reference", "triton", "cpu", "cuda")

# The DEF library of the namespace: every schema is defined on it (see Op).
_LIB = torch.library.Library(NAMESPACE, "DEF")


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here (never a silent fallback)."""


def _load_extension():
    if os.environ.get("MOE_KERNELS_NO_EXT") == "1":
        return None, "disabled by MOE_KERNELS_NO_EXT=1"
    try:
        from moe_kernels import _C  # noqa: F401
    except ImportError as exc:
        return None, str(exc)
    return _C, None


_C, _C_ERROR = _load_extension()
if _C is None:
    warnings.warn(
        "moe_kernels: the compiled extension moe_kernels._C is not loaded "
        f"({_C_ERROR}); backends 'cpu' and 'cuda' are unavailable, 'reference' and "
        "'triton' work. Build it with `make build` (or `pip install -e .`).",
        RuntimeWarning,
        stacklevel=2,
    )


def _warn_if_cpu_isa_not_taken() -> None:
    """MOE_KERNELS_CPU_ISA names a build this CPU does not run, or none at all (a typo):
    the C++ side then takes the widest build, which a benchmark or a bisection meant to
    run on another would measure without a word."""
    forced = os.environ.get("MOE_KERNELS_CPU_ISA")
    if _C is not None and forced and _C.cpu_isa() != forced:
        warnings.warn(
            f"moe_kernels: MOE_KERNELS_CPU_ISA={forced!r} is not one of 'amx', 'avx512bf16', "
            f"'avx512', 'avx2', 'generic' that this CPU runs; the cpu backend runs "
            f"{_C.cpu_isa()!r}",
            RuntimeWarning, stacklevel=2)


_warn_if_cpu_isa_not_taken()


def extension_loaded() -> bool:
    return _C is not None


# Read once: a pybind call inside a traced function would break torch.compile's graph.
_C_WITH_CUDA = _C is not None and bool(_C.with_cuda())


def extension_has_cuda() -> bool:
    return _C_WITH_CUDA


@functools.lru_cache(maxsize=None)
def triton_interpreting() -> bool:
    """Whether Triton kernels run under its interpreter. Read once, at the first use:
    Triton itself decides when it decorates our kernels (their modules load on first use
    too), and reading the environment costs ~1 us per eager call."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_RESOLVED: dict[tuple[str | None, str], str] = {}


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON_OK = _triton_importable()


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend == "triton":
        if not _TRITON_OK:
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return (f"the triton backend runs on CUDA tensors, or on CPU tensors only under "
                f"TRITON_INTERPRET=1 (set before triton is imported); got {device.type}")
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend takes CPU tensors, got {device.type}"
        if _C is None:
            return f"moe_kernels._C is not loaded ({_C_ERROR})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend takes CUDA tensors, got {device.type}"
        if _C is None:
            return f"moe_kernels._C is not loaded ({_C_ERROR})"
        if not _C_WITH_CUDA:
            return "moe_kernels._C was built without CUDA kernels"
        return None
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


# Which backend `backend=None` picks, best first, per device type. On the GPU "triton"
# leads: its kernel measured faster than "cuda" on an H100 at every token count
# (docs/gating.md, benchmarks/results/).
_DEFAULT_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


def resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """The backend to run: `backend` if it can run on `device`, or the best one for None.
    Memoised per (backend, device type): this runs on every eager call."""
    hit = _RESOLVED.get((backend, device.type)) if backend is None or type(backend) is str else None
    if hit is not None:
        return hit
    return _resolve_backend_uncached(backend, device, op)


def resolve_backend_of(backend: str | None, x: torch.Tensor, op: str,
                       supported: tuple[str, ...] = BACKENDS) -> str:
    """The backend to run on x's device among the backends op implements (`supported`):
    `backend` if it can run, or the best one for None. Op.resolve memoises it."""
    if backend is not None and backend in BACKENDS and backend not in supported:
        raise BackendUnavailableError(f"{op}: backend {backend!r} is not implemented for this "
                                      f"op (it has {supported})")
    device = x.device
    if backend is None:
        return next((c for c in _DEFAULT_ORDER.get(device.type, ("reference",))
                     if c in supported and backend_unavailable_reason(c, device) is None),
                    "reference")
    return resolve_backend(backend, device, op)


def _resolve_backend_uncached(backend: str | None, device: torch.device, op: str) -> str:
    if backend is None:
        resolved = next((c for c in _DEFAULT_ORDER.get(device.type, ("reference",))
                         if backend_unavailable_reason(c, device) is None), "reference")
    else:
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be None or one of {BACKENDS}, got {backend!r}")
        reason = backend_unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run: {reason}")
        resolved = backend
    if not _is_compiling():    # a mutated global is a side effect strict export warns of
        _RESOLVED[(backend, device.type)] = resolved
    return resolved


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on `device` (a torch.device or its name, "cpu",
    "cuda:0"), in the order of BACKENDS."""
    device = torch.device(device)
    return [b for b in BACKENDS if backend_unavailable_reason(b, device) is None]


# Bounds of the C++ kernels, read from `_C` (the constants live once, in csrc/): e.g.
# "gating_cuda_max_experts". Empty without the extension, whose backends are then
# unavailable anyway.
_C_LIMITS: dict[str, int] = dict(_C.limits()) if _C is not None else {}


# Triton caps a tile's elements (triton.language.TRITON_MAX_TENSOR_NUMEL). The gating and
# permutation-index kernels hold every expert of a row in one tile; the FP8 kernels a group
# or a weight block.
TRITON_MAX_TILE = 1 << 20
TRITON_MAX_EXPERTS = TRITON_MAX_TILE


def check_expert_limit(op: str, backend: str, cuda_limit: str, name: str, value: int) -> None:
    """ValueError when the number of experts `value` (argument `name`) exceeds what
    `backend`'s kernel takes: TRITON_MAX_EXPERTS for triton, the `_C.limits()` entry
    `cuda_limit` for cuda; the same error on every device, before any launch."""
    bound = (TRITON_MAX_EXPERTS if backend == "triton" else
             _C_LIMITS.get(cuda_limit) if backend == "cuda" else None)
    if bound is not None and value > bound:
        other = "backend='triton'" if backend == "cuda" else "backend='cpu' or 'reference'"
        raise ValueError(f"{op}: the {backend} backend takes {name} <= {bound}, got {value}; "
                         f"use {other}")


_is_compiling = torch.compiler.is_compiling
_transforms_active = torch._C._are_functorch_transforms_active   # ~0.05 us
_dispatch_modes = torch._C._len_torch_dispatch_stack             # ~0.03 us
_jit_tracing = torch._C._is_tracing                              # ~0.03 us
_profiling = torch._C._autograd._profiler_enabled                # ~0.03 us


_PYTHON_KEY = torch._C.DispatchKey.Python


def check_kernel_readable(op: str, x: torch.Tensor) -> None:
    """TypeError for a tensor subclass dispatched in Python (a FakeTensor outside its
    mode): a launch would take its address, where it holds no data (on the GPU an illegal
    address, which ends the CUDA context). What the C++ checks report for such a tensor
    (readable_problem, csrc/checks.h). Under a mode Op.kernel sends calls to the
    registered op, which the subclass answers."""
    if isinstance(x, torch.Tensor) and torch._C._dispatch_keys(x).has(_PYTHON_KEY):
        raise TypeError(f"{op}: a {type(x).__name__} is a tensor subclass dispatched in "
                        f"Python, whose memory a kernel cannot read: pass plain tensors "
                        f"(DTensor.to_local()), or FakeTensors under their FakeTensorMode")


def on_tensors_device(launcher):
    """launcher(x, ...) run with x's CUDA device current, as a torch op runs on its
    tensors' device whatever the current one is. A Triton launch takes the current
    device's context and stream: a tensor on cuda:1 launched while cuda:0 is current is
    refused by Triton's pointer check ("cannot be accessed from Triton (cpu tensor?)",
    triton-lang/triton#2441), and any workspace or device property a launcher reads
    would be the other device's. What a process with one model spread over several GPUs
    meets (HF `device_map="auto"`). The C++ CUDA kernels take a `CUDAGuard` for the same
    reason (csrc/cuda/). x: the schema's first argument, a tensor in every op (checked
    when the op is declared); every tensor argument is on its device (check_one_device /
    the public checks). On one device it costs a tensor's device and the current device
    read per launch; the context is entered only when they differ. A subclass dispatched
    in Python (a FakeTensor) is refused first (check_kernel_readable)."""
    name = getattr(launcher, "__name__", "launch")

    def run(x, *rest):
        if type(x) is not torch.Tensor:     # nn.Parameter, or a subclass: 0.03 us otherwise
            check_kernel_readable(name, x)
        if x.is_cuda:
            index = x.get_device()
            if index != torch.cuda.current_device():
                with torch.cuda.device(index):
                    return launcher(x, *rest)
        return launcher(x, *rest)

    run.__name__ = name
    run.__wrapped__ = launcher
    return run

# The dispatch key of each C++ backend's kernels.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def check_one_device(op: str, args) -> None:
    """ValueError unless every tensor among `args` is on one device."""
    device = None
    for a in args:
        if isinstance(a, torch.Tensor):
            if device is None:
                device = a.device
            elif a.device != device:
                raise ValueError(f"{op}: every tensor argument must be on one device, got "
                                 f"{device} and {a.device}")


def raise_reported(op: str, kind: int, message: str) -> None:
    """Raises what a C++ check reported as (kind, message): 1 ValueError, 2 TypeError
    (csrc/checks.h)."""
    raise (TypeError if kind == 2 else ValueError)(f"{op}: {message}")


def no_output(*args) -> None:
    """The fake of an op that only writes into its `Tensor(a!)` arguments (`-> ()`)."""
    return None

# Every Op of the namespace by name (filled as the op modules are imported).
OPS: dict[str, "Op"] = {}


class Op:
    """One op of the namespace, declared once, with everything derived from it.

    name, signature: the schema `name(signature)`, e.g. "(Tensor x, int n) -> Tensor".
    fake: its fake (meta) implementation, registered for every variant.
    triton: module of `moe_kernels/triton/` whose function `name` is the Triton launcher;
      it gets its own op `<name>_triton` (same signature; one dispatch key holds one kernel,
      and the C++ kernels hold CPU and CUDA of `<name>`), or `<name>` itself when the op
      has no C++ kernel.
    native: backends with a C++ kernel, `_C.<name>_<backend>`, registered on `<name>` for
      the backend's dispatch key behind its check `_C.<name>_<backend>_check`.
    borrow: backends that run another backend's kernel, e.g. {"cuda": "triton"}.
    composite: a Python implementation over other ops, registered for every device
      (CompositeExplicitAutograd) on `<name>`; `backends` then says which it can run.
    triton_check: what only the Triton kernel cannot take, checked on the Triton
      variant's direct calls after the op's C++ check (schema arguments; raises).

    `kernel(backend)` is the one eager fast path of every op: the bare kernel (the checked
    C++ entry point or the Triton launcher; no dispatcher round trip, docs/index.md), or
    the registered op under torch.compile or when autograd must record the call.
    """

    def __init__(self, name: str, signature: str, *, fake, triton: str | None = None,
                 native: tuple[str, ...] = (), borrow: dict[str, str] | None = None,
                 composite=None, backends: tuple[str, ...] | None = None,
                 triton_check=None):
        self.name = name
        self.schema = name + signature
        if triton is not None and not signature.startswith("(Tensor "):
            raise ValueError(f"{name}: a Triton op's first argument must be a tensor (the "
                             f"launch runs on its device: on_tensors_device), got {signature}")
        self.triton_module = triton
        self.native = native
        self.borrow = dict(borrow or {})
        self._triton_check = triton_check
        _LIB.define(self.schema)
        OPS[name] = self
        self.variants = [name]
        self._triton_suffix = "_triton" if native else ""
        if triton is not None:
            triton_op = name + self._triton_suffix
            if native:
                _LIB.define(triton_op + signature)
                self.variants.append(triton_op)
            for key in ("CPU", "CUDA"):
                _LIB.impl(triton_op, self._triton_impl, key)
        if composite is not None:
            _LIB.impl(name, composite, "CompositeExplicitAutograd")
        # the C++ entry points `_C.<name>_<backend>` that can run here
        self.entries = {b: getattr(_C, f"{name}_{b}") for b in native
                        if backend_unavailable_reason(b, torch.device(b)) is None}
        # the op's C++ argument check, device-agnostic (csrc/checks.h), for the Triton variant
        self._arg_check = getattr(_C, f"{name}_cpu_check") if "cpu" in self.entries else None
        for backend in self.entries:
            _LIB.impl(name, self._checked_kernel(backend), _DISPATCH_KEYS[backend])
        for variant in self.variants:
            torch.library.register_fake(f"{NAMESPACE}::{variant}", lib=_LIB)(fake)
        self.backends = backends or tuple(
            b for b in BACKENDS
            if b == "reference" or (b == "triton" and triton) or b in native or b in self.borrow)
        self._eager: dict[str, object] = {}
        self._resolved: dict[tuple, str] = {}
        self.differentiable = False

    def _checked_kernel(self, backend: str):
        """The kernel of a C++ backend, for the dispatcher and the eager path alike: the
        entry point's C++ check (~0.3 us), its report raised here, then the entry point
        `self.entries[backend]`. No argument reaches a C++ throw (csrc/checks.h)."""
        check = getattr(_C, f"{self.name}_{backend}_check")
        name, entries = self.name, self.entries

        def kernel(*args):
            kind, message = check(*args)
            if kind:
                raise_reported(name, kind, message)
            return entries[backend](*args)

        kernel.__name__ = f"{name}_{backend}"
        return kernel

    def _triton_impl(self, *args):
        """The registered kernel of the Triton variant (direct torch.ops calls, compiled
        graphs): one device for every tensor, the op's C++ argument check where the
        extension has one (its CPU check, which reads no device), then the launcher. A
        launch with arguments the kernel cannot take would read or write out of bounds
        (on the GPU an illegal address, which ends the CUDA context)."""
        self.check_triton_args(*args)
        return self._bare("triton")(*args)

    def check_triton_args(self, *args) -> None:
        """The Triton variant's checks of the schema's arguments (_triton_impl)."""
        check_one_device(self.name, args)
        check = self._arg_check
        if check is not None:
            kind, message = check(*args)
            if kind:
                raise_reported(self.name, kind, message)
        if self._triton_check is not None:
            self._triton_check(*args)

    def _bare(self, backend: str):
        fn = self._eager.get(backend)
        if fn is None:
            source = self.borrow.get(backend, backend)
            if source == "triton":
                module = importlib.import_module(f"moe_kernels.triton.{self.triton_module}")
                fn = on_tensors_device(getattr(module, self.name))
            elif source in self.entries:
                fn = self._checked_kernel(source)
            else:
                raise BackendUnavailableError(f"{self.name}: no {backend!r} kernel here")
            self._eager[backend] = fn
        return fn

    def op(self, backend: str):
        """The registered op (OpOverload) that runs `backend`'s kernel."""
        triton = self.borrow.get(backend, backend) == "triton"
        return getattr(torch.ops.moe_kernels,
                       self.name + (self._triton_suffix if triton else "")).default

    def kernel(self, backend: str, needs_op: bool = False):
        """The callable running `backend`'s kernel with the schema's arguments: the
        registered op when torch.compile traces, autograd must record the call
        (`needs_op`), a torch.func transform (vmap, grad) wraps the tensors, which a
        bare kernel would take for plain ones (vmap: "Cannot access data pointer";
        through the dispatcher, torch's batching fallback runs the op per sample), or a
        TorchDispatchMode is active: FakeTensorMode (shape inference, torch.export), whose
        tensors hold no data (a bare kernel threw on reading them, or segfaulted), and
        which runs the op's fake; or a user's mode (logging, debugging), which sees the
        op's calls only through the dispatcher. Likewise under torch.jit.trace (and the
        TorchScript ONNX export built on it), which records dispatcher calls only: a bare
        kernel left the trace an `aten::empty`, whose garbage it returned for any input.
        Under torch.profiler the bare kernel runs in a range named as its op."""
        if (needs_op or _is_compiling() or _transforms_active() or _dispatch_modes()
                or _jit_tracing()):
            return self.op(backend)
        if _profiling():
            return self._profiled(backend)
        try:
            return self._eager[backend]
        except KeyError:
            return self._bare(backend)

    def _profiled(self, backend: str):
        """The bare kernel inside a torch.profiler range named as its registered op
        ("moe_kernels::grouped_topk"), as the dispatcher records torch's ops: a bare
        kernel was missing from profiles, its host time attributed to nothing. Not the
        registered op itself, whose dispatcher round trip (~30 us for the differentiable
        ops' Python autograd kernel) would show in the profile as our host cost."""
        bare = self._eager.get(backend) or self._bare(backend)
        label = self.op(backend).name()

        def run(*args):
            with torch.autograd.profiler.record_function(label):
                return bare(*args)

        return run

    def register_autograd(self, make) -> None:
        """make(backend) -> (backward, setup_context) for the variant running `backend`
        ("triton" for `<name>_triton`, None for `<name>`)."""
        for variant in self.variants:
            backend = "triton" if variant.endswith("_triton") or not self.native else None
            backward, setup = make(backend)
            torch.library.register_autograd(f"{NAMESPACE}::{variant}", backward,
                                            setup_context=setup, lib=_LIB)
        self.differentiable = True

    def resolve(self, backend: str | None, x: torch.Tensor) -> str:
        """resolve_backend_of among this op's backends, memoised per (backend, device type):
        this runs on every eager call. A kernel backend refuses a tensor subclass
        dispatched in Python outside a dispatch mode (check_kernel_readable)."""
        # is_cpu as well: a tensor on neither (meta, another accelerator) must not find
        # the CPU's entry, whose bare C++ kernel would read a meta tensor's null data
        key = (backend, x.is_cuda, x.is_cpu)
        hit = self._resolved.get(key) if backend is None or type(backend) is str else None
        if hit is None:
            hit = resolve_backend_of(backend, x, self.name, self.backends)
            # not while torch.compile / export trace: a mutated global is a side effect
            # that strict export warns of
            if (x.is_cuda or x.is_cpu) and not _is_compiling():
                self._resolved[key] = hit
        if type(x) is not torch.Tensor and hit != "reference" and not _dispatch_modes():
            check_kernel_readable(self.name, x)    # the public op's error, before any kernel
        return hit


def _no_gradient(ctx, *grads):
    raise RuntimeError("unreachable: the outputs are marked non-differentiable")


def _outputs_non_differentiable(ctx, inputs, output):
    ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))


def register_non_differentiable() -> None:
    """Every op without a backward (register_autograd) gets outputs that never require
    grad through the dispatcher too (torch.ops calls, compiled graphs), as on the eager
    path, which calls the kernels directly; without it torch's fallback would mark them
    requiring grad and drop the gradient with a deprecation warning at backward. Ops that
    only write into buffers (`-> ()`) have no output to mark. Called once, after every op
    module is imported."""
    for op in OPS.values():
        if op.differentiable or op.schema.endswith("-> ()"):
            continue
        for variant in op.variants:
            torch.library.register_autograd(f"{NAMESPACE}::{variant}", _no_gradient,
                                            setup_context=_outputs_non_differentiable,
                                            lib=_LIB)
