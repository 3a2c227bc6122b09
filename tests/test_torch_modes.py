"""Every op and the layer under torch's global modes and defaults give what they give without them,
bit for bit, on every backend.

Autocast: it runs every matmul it meets in its dtype and moves other torch ops to
float32 or the widest dtype. Inference scripts and training loops (Megatron, HF Trainer)
wrap whole models in it; without a guard the float32 reference's GEMMs and the layer's
float32 router would run in bf16 (another routing than the contract's, a reference that
is no longer float32). The kernels are opaque ops, which autocast does not touch, but
the torch code around them is not.

Deterministic algorithms (`torch.use_deterministic_algorithms(True)`, as reproducible
training sets it): a torch op between our kernels with only a nondeterministic CUDA
implementation would raise there, and torch.empty outputs are filled (NaN) first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings

import pytest
import torch

import moe_kernels
from moe_kernels import _library, testing
from moe_kernels.ops import gating as gating_ops

from helpers import device_backend_params, outcome
from properties import _map_tensors, on
from test_cuda_graphs import assert_same_bits, tensors_of
from test_layer import (LAYER_PARAMS, as_fp8_checkpoint, make_config, make_fp8_layer,
                        make_hidden, make_weights)

AUTOCAST_DTYPES = {"cpu": (torch.bfloat16,), "cuda": (torch.bfloat16, torch.float16)}


@contextlib.contextmanager
def torch_setting(get, set_, value):
    """A global torch setting at `value` within, restored after."""
    saved = get()
    set_(value)
    try:
        yield
    finally:
        set_(saved)


def deterministic_algorithms():
    return torch_setting(torch.are_deterministic_algorithms_enabled,
                         torch.use_deterministic_algorithms, True)


def default_dtype(dtype):
    return torch_setting(torch.get_default_dtype, torch.set_default_dtype, dtype)


def matmul_precision(precision: str):
    return torch_setting(torch.get_float32_matmul_precision,
                         torch.set_float32_matmul_precision, precision)


def _modes(device: str) -> dict:
    """name: a function making the mode's context. The default device "meta" stands for
    any other device than the tensors' (torch.set_default_device("cuda") in a script that
    also runs ops on the CPU): a tensor made without a device lands there and fails."""
    modes = {f"autocast {dtype}": functools.partial(torch.autocast, device, dtype=dtype)
             for dtype in AUTOCAST_DTYPES[device]}
    modes["deterministic"] = deterministic_algorithms
    modes.update({f"default dtype {d}": functools.partial(default_dtype, d)
                  for d in (torch.float64, torch.bfloat16)})
    modes["default device meta"] = lambda: torch.device("meta")
    return modes


def _modes_together(modes: dict) -> dict:
    """The modes entered at once, in two groups (the two default dtypes exclude each other):
    a third of the calls. Under Triton's interpreter each call of the GEMM ops' edge cases
    takes seconds (grouped_gemm_fp8 23 s, fused_moe_fp8 21 s for the modes one by one)."""
    def together(names):
        def enter():
            stack = contextlib.ExitStack()
            for name in names:
                stack.enter_context(modes[name]())
            return stack
        return enter
    bf16 = "default dtype torch.bfloat16"
    return {"every mode but " + bf16: together([n for n in modes if n != bf16]),
            bf16: modes[bf16]}


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("op", testing.ops())
def test_op_ignores_global_modes(device, backend, op):
    if backend not in _library.OPS[op].backends:
        pytest.skip(f"{op} has no {backend} backend")
    public = getattr(moe_kernels, op)
    modes = _modes(device)
    if backend == "triton" and device == "cpu":
        modes = _modes_together(modes)
    ran = 0
    for case in testing.cases(op, "edge", device=device):
        args, kwargs = testing.run(op, lambda *a, **k: (a, k), case)
        call = lambda: public(*args, backend=backend, **kwargs)
        want, want_error = outcome(call)
        for name, mode in modes.items():
            with mode():
                got, got_error = outcome(call)
            assert got_error == want_error, f"{case.name} under {name}: {got_error}"
            if want_error is None:
                assert_same_bits(got, want, f"{op} {case.name} under {name}")
                ran += 1
    assert ran, f"{op}: every edge case raised"


@pytest.mark.parametrize("device,backend", LAYER_PARAMS)
def test_layer_ignores_global_modes(device, backend):
    """The layer's router is float32 inside autocast too (HF's float32 router GEMM)."""
    layer, cfg = make_fp8_layer(device, backend)
    for name, mode in _modes(device).items():
        for hidden_dtype in (torch.bfloat16, torch.float32):
            hidden = make_hidden(9, cfg, dtype=hidden_dtype, device=device)
            want = layer(hidden)
            with mode():
                got = layer(hidden)
                routed = layer.route(hidden)
            assert_same_bits(got, want, f"{name}, hidden {hidden_dtype}")
            assert_same_bits(routed, layer.route(hidden), f"route: {name}, {hidden_dtype}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_compiled_layer_ignores_autocast(device):
    """The same under torch.compile(fullgraph=True), the device's default backend: the
    guard traces (autocast read as a constant, its region entered in the graph)."""
    layer, cfg = make_fp8_layer(device)
    hidden = make_hidden(9, cfg, device=device)
    want = layer(hidden)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = compiled(hidden)
    assert_same_bits(got, want, "compiled under autocast")


@pytest.mark.parametrize("mode", ["default dtype torch.float64", "default dtype torch.bfloat16",
                                  "default device meta"])
def test_layer_built_under_defaults(mode):
    """The layer built (from_hf, device="cpu") under another default dtype or device holds
    the same buffers and gives the same output: its buffers and checks name their dtypes
    and devices (a routing check's probe made in the default dtype would be float64, and
    refused)."""
    cfg = make_config()
    checkpoint = as_fp8_checkpoint(make_weights(cfg))
    want_layer = moe_kernels.DeepseekV3MoE.from_hf(cfg, checkpoint, device="cpu")
    with _modes("cpu")[mode]():
        layer = moe_kernels.DeepseekV3MoE.from_hf(cfg, checkpoint, device="cpu")
    assert {k: (v.dtype, v.device) for k, v in layer.state_dict().items()} == \
        {k: (v.dtype, v.device) for k, v in want_layer.state_dict().items()}
    hidden = make_hidden(5, cfg)
    assert_same_bits(layer(hidden), want_layer(hidden), mode)


@pytest.mark.parametrize("mode", ["default dtype torch.float64", "default device meta"])
def test_eplb_under_defaults(mode):
    """EPLB computes on the host (its outputs are CPU tensors) whatever the defaults."""
    weight = torch.rand(3, 16, generator=torch.Generator().manual_seed(0)) * 100
    want = moe_kernels.eplb.rebalance_experts(weight, 20, 4, 2, 4)
    with _modes("cpu")[mode]():
        got = moe_kernels.eplb.rebalance_experts(weight, 20, 4, 2, 4)
        packs = moe_kernels.eplb.balanced_packing(weight, 4)
        replicas = moe_kernels.eplb.replicate_experts(weight, 20)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(torch.equal(g, w) for g, w in zip(packs, moe_kernels.eplb.balanced_packing(weight, 4)))
    assert all(torch.equal(g, w)
               for g, w in zip(replicas, moe_kernels.eplb.replicate_experts(weight, 20)))


# torch.func.vmap over a stack of one case's first input: ops that return new tensors run
# per sample through torch's batching fallback (the eager path hands the registered op to
# the transform: a bare kernel would take the batched tensors for plain ones and fail on
# their data pointers); ops that write into buffers (MLA) or only make integer indexes
# (moe_align_block_size) have no fallback, and torch says so.
VMAP_RUNS = ("quantize_fp8_per_token_group", "silu_and_mul_quant_fp8", "quantize_fp8_block",
             "grouped_topk", "unpermute", "grouped_gemm_fp8", "fused_moe_fp8")
VMAP_REFUSED = ("mla_decompress_kv", "moe_align_block_size")


@pytest.mark.parametrize("device,backend", device_backend_params(("cpu", "triton", "cuda")))
@pytest.mark.parametrize("op", VMAP_RUNS + VMAP_REFUSED)
def test_vmap(device, backend, op):
    if backend not in _library.OPS[op].backends:
        pytest.skip(f"{op} has no {backend} backend")
    public = getattr(moe_kernels, op)
    case = next(c for c in testing.cases(op, "edge", device=device)
                if not any(k.startswith("out") for k in c.inputs)
                and next(iter(c.inputs.values())).numel() > 0)
    args, kwargs = testing.run(op, lambda *a, **k: (a, k), case)
    first, rest = args[0], args[1:]
    call = lambda x: public(x, *rest, backend=backend, **kwargs)
    stacked = torch.stack([first, first.flip(0)])
    if op in VMAP_REFUSED:
        with pytest.raises(RuntimeError, match="Batching rule not implemented"):
            torch.func.vmap(call)(stacked)
        return
    got = torch.func.vmap(call)(stacked)
    for i in range(2):
        assert_same_bits([t[i] for t in tensors_of(got)], call(stacked[i]), f"{op} sample {i}")


def test_check_warns_when_float32_matmuls_are_reduced():
    """moe_kernels.testing judges with the float32 reference, whose GEMMs follow torch's
    float32 matmul precision: a check under "high" / "medium" says so."""
    impl = functools.partial(moe_kernels.quantize_fp8_per_token_group, backend="reference")
    with matmul_precision("medium"), pytest.warns(UserWarning, match="float32_matmul_precision"):
        testing.check("quantize_fp8_per_token_group", impl)
    with matmul_precision("highest"), warnings.catch_warnings():
        warnings.simplefilter("error")
        testing.check("quantize_fp8_per_token_group", impl)


# The paths that are torch float32 matmuls follow torch.set_float32_matmul_precision as
# every torch matmul does (docs/api.md); the kernels do not. "medium" lets oneDNN run
# float32 matmuls in bf16 on CPUs with AMX, where the difference shows.
PRECISION_FREE = ("grouped_gemm_fp8", "grouped_gemm_fp8_masked", "fused_moe_fp8")


# (Triton on the GPU only: its interpreter multiplies with numpy, whatever torch's setting)
@pytest.mark.parametrize("device,backend", device_backend_params(("cpu",)) + device_backend_params(
    ("triton", "cuda"), devices=("cuda",)))
@pytest.mark.parametrize("op", PRECISION_FREE)
def test_kernels_ignore_matmul_precision(device, backend, op):
    if backend not in _library.OPS[op].backends:
        pytest.skip(f"{op} has no {backend} backend")
    public = getattr(moe_kernels, op)
    for case in testing.cases(op, "edge", device=device):
        args, kwargs = testing.run(op, lambda *a, **k: (a, k), case)
        want, want_error = outcome(lambda: public(*args, backend=backend, **kwargs))
        if want_error is not None:
            continue
        for precision in ("high", "medium"):
            with matmul_precision(precision):
                got = public(*args, backend=backend, **kwargs)
            assert_same_bits(got, want, f"{op} {case.name} at {precision}")


@pytest.mark.parametrize("op", testing.ops())
def test_meta_tensors_infer_shapes(op):
    """Meta tensors (shape planning, modules built on the meta device) run the reference
    backend, the default for a device without kernels: the outputs' shapes and dtypes of a
    real call, no data read. The CPU's call first memoises its backend choice, which must
    not answer for meta tensors too (its C++ kernel would read their null data: a
    segfault). A kernel backend named explicitly is refused."""
    public = getattr(moe_kernels, op)
    ran = 0
    for case in testing.cases(op, "edge"):
        want, error = outcome(lambda: testing.run(op, public, case))  # memoises the CPU's choice
        if error is not None:
            continue
        meta = dataclasses.replace(case, inputs=on("meta", case.inputs))
        got, want = tensors_of(testing.run(op, public, meta)), tensors_of(want)
        assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want], case.name
        assert all(t.is_meta for t in got), case.name
        ran += 1
    assert ran
    with pytest.raises(_library.BackendUnavailableError, match="cpu"):
        testing.run(op, functools.partial(public, backend="cpu"), meta)


def test_layer_on_the_meta_device():
    """A layer built on the meta device (memory planning before loading) runs a meta
    forward: the output's shape and dtype."""
    cfg = make_config()
    make_fp8_layer("cpu")[0](make_hidden(2, cfg))        # the CPU's backend choice memoised
    layer = moe_kernels.DeepseekV3MoE.from_config(cfg, device="meta")
    out = layer(make_hidden(5, cfg).to("meta"))
    assert out.is_meta and out.shape == (5, cfg.hidden_size) and out.dtype == torch.bfloat16


FAKE_PARAMS = device_backend_params(("cpu", "triton", "cuda", "reference"))


@pytest.mark.parametrize("device,backend", FAKE_PARAMS)
@pytest.mark.parametrize("op", testing.ops())
def test_fake_tensors_infer_shapes(device, backend, op):
    """Under FakeTensorMode (torch.export, shape inference, memory planning) every op, on
    every backend, gives the outputs' shapes and dtypes of a real call, no data read: the
    kernel backends run through the dispatcher, whose fakes answer. A bare kernel threw on
    fake tensors ("data is not allocated yet", a C++ throw)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    if backend not in _library.OPS[op].backends and op in _library.OPS:
        pytest.skip(f"{op} has no {backend} backend")
    public = functools.partial(getattr(moe_kernels, op), backend=backend)
    reference = functools.partial(getattr(moe_kernels, op), backend="reference")
    ran = 0
    for case in testing.cases(op, "edge", device=device):
        # every backend's shapes and dtypes are the reference's (the interpreter is slow)
        want, error = outcome(lambda: testing.run(op, reference, case))
        if error is not None:
            continue
        mode = FakeTensorMode()
        fake = dataclasses.replace(case, inputs=_map_tensors(mode.from_tensor, case.inputs))
        with mode:
            got, error = outcome(lambda: tensors_of(testing.run(op, public, fake)))
        if error is not None:    # a case this backend refuses: so must its real call
            assert outcome(lambda: testing.run(op, public, case))[1] is error, case.name
            continue
        want = tensors_of(want)
        assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want], case.name
        assert all(isinstance(t, FakeTensor) for t in got), case.name
        ran += 1
    assert ran


def test_dispatch_modes_see_the_kernels():
    """A TorchDispatchMode (a user's logging or debugging mode) sees each kernel call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    logits = torch.randn(3, 16)
    want = moe_kernels.grouped_topk(logits, 4, num_expert_group=4, topk_group=2,
                                    backend="cpu")
    with Log() as log:
        got = moe_kernels.grouped_topk(logits, 4, num_expert_group=4, topk_group=2,
                                       backend="cpu")
    assert "moe_kernels.grouped_topk.default" in log.ops, log.ops
    assert_same_bits(got, want, "grouped_topk under a dispatch mode")


@pytest.mark.parametrize("device,backend", device_backend_params(("cpu", "triton", "cuda")))
@pytest.mark.parametrize("op", testing.ops())
def test_fake_tensors_outside_their_mode(device, backend, op):
    """FakeTensors passed outside their mode would reach the eager path's bare kernels,
    which would read where they hold no data (a C++ throw from the extension; on the GPU,
    an illegal address): each kernel backend refuses them with a TypeError before
    (Op.resolve), as the C++ checks and the Triton launchers would (conftest holds the
    public layer to refusing first). Under the mode they run the op's fake (above)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    if backend not in _library.OPS[op].backends and op in _library.OPS:
        pytest.skip(f"{op} has no {backend} backend")
    public = functools.partial(getattr(moe_kernels, op), backend=backend)
    refused = 0
    for case in testing.cases(op, "edge", device=device):
        mode = FakeTensorMode()
        fake = dataclasses.replace(case, inputs=_map_tensors(mode.from_tensor, case.inputs))
        try:
            got = testing.run(op, public, fake)
        except TypeError as exc:
            if "dispatched in Python" in str(exc):
                refused += 1
                continue
            raised = exc
        except ValueError as exc:
            raised = exc
        else:
            assert all(isinstance(t, FakeTensor) for t in tensors_of(got)), case.name
            continue
        # the argument checks refused the case: so must they with plain tensors
        assert outcome(lambda: testing.run(op, public, case))[1] is type(raised), \
            f"{case.name}: {raised!r}"
    assert refused, "no case reached a kernel"


def _exportable_case(op, device):
    """The first edge case of op whose tensors are all non-empty, without out= buffers."""
    return next(c for c in testing.cases(op, "edge", device=device)
                if not any(k.startswith("out") for k in c.inputs)
                and all(t.numel() > 0 for t in tensors_of(c.inputs)))


@pytest.mark.parametrize("device,backend", FAKE_PARAMS)
@pytest.mark.parametrize("op", testing.ops())
def test_export(device, backend, op):
    """torch.export (strict: dynamo traces our Python) of a module calling the op gives
    the eager call's result bit for bit, and a first call inside the trace warns of no
    side effect (the memoised backend choices are not written while tracing)."""
    if backend not in _library.OPS[op].backends and op in _library.OPS:
        pytest.skip(f"{op} has no {backend} backend")
    case = _exportable_case(op, device)
    public = functools.partial(getattr(moe_kernels, op), backend=backend)
    names = [k for k, v in case.inputs.items() if isinstance(v, torch.Tensor)]

    class Call(torch.nn.Module):
        def forward(self, *tensors):
            inputs = {**case.inputs, **dict(zip(names, tensors))}
            return testing.run(op, public, dataclasses.replace(case, inputs=inputs))

    args = tuple(case.inputs[k] for k in names)
    _library.OPS[op]._resolved.clear()           # the memos a first call writes
    _library._RESOLVED.clear()
    gating_ops._VALID_CONFIGS.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exported = torch.export.export(Call(), args, strict=True)
    side_effects = [str(w.message) for w in caught if "side effect" in str(w.message)]
    assert not side_effects, side_effects
    assert_same_bits(tensors_of(exported.module()(*args)), tensors_of(Call()(*args)), op)


@pytest.mark.parametrize("device,backend", LAYER_PARAMS)
def test_layer_under_fake_tensor_mode(device, backend):
    """A layer copied into FakeTensorMode (FakeCopyMode, as memory planners fake a whole
    model) runs a fake forward: the output's shape and dtype, no data read."""
    import copy

    from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensor, FakeTensorMode
    layer, cfg = make_fp8_layer(device, backend)
    hidden = make_hidden(5, cfg, device=device)
    want = layer(hidden)
    mode = FakeTensorMode()
    with FakeCopyMode(mode):
        fake_layer = copy.deepcopy(layer)
    with mode:
        got = fake_layer(mode.from_tensor(hidden))
    assert isinstance(got, FakeTensor) and (got.shape, got.dtype) == (want.shape, want.dtype)


@pytest.mark.parametrize("device,backend", device_backend_params(("cpu", "triton", "cuda")))
@pytest.mark.parametrize("op", testing.ops())
def test_jit_trace(device, backend, op):
    """torch.jit.trace (and the TorchScript ONNX export built on it) records dispatcher
    calls only: the trace of an op on a kernel backend replays the registered op, so the
    traced function on new values gives the eager result bit for bit. A bare kernel left
    only its output's `aten::empty` in the trace: garbage for every input. (The reference
    backend's bit views, `Tensor.view(dtype)`, hit torch's tracer bug pytorch#90365.)"""
    if backend not in _library.OPS[op].backends and op in _library.OPS:
        pytest.skip(f"{op} has no {backend} backend")
    case = _exportable_case(op, device)
    again = next(c for c in testing.cases(op, "edge", seed=1, device=device)
                 if c.name == case.name)
    public = functools.partial(getattr(moe_kernels, op), backend=backend)
    names = [k for k, v in case.inputs.items() if isinstance(v, torch.Tensor)]

    def call(*tensors):
        inputs = {**case.inputs, **dict(zip(names, tensors))}
        return tuple(tensors_of(testing.run(op, public, dataclasses.replace(case, inputs=inputs))))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # deprecation; size checks read as traced bools
        traced = torch.jit.trace(call, tuple(case.inputs[k] for k in names), check_trace=False)
    new = tuple(again.inputs[k] for k in names)
    assert not all(torch.equal(a, b) for a, b in zip(new, (case.inputs[k] for k in names)))
    assert_same_bits(list(traced(*new)), list(call(*new)), op)


@pytest.mark.parametrize("device,backend", device_backend_params(("cpu",)) + device_backend_params(
    ("triton",), devices=("cuda",)))
def test_layer_jit_trace(device, backend):
    """The layer traced by torch.jit.trace gives the eager forward on new tokens (on the
    kernel backends: the reference's bit views hit pytorch#90365)."""
    layer, cfg = make_fp8_layer(device, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(layer, (make_hidden(5, cfg, device=device),),
                                 check_trace=False)
    hidden = make_hidden(5, cfg, seed=7, device=device)
    assert_same_bits([traced(hidden)], [layer(hidden)], "traced layer")


@pytest.mark.parametrize("device,backend", device_backend_params(("cpu", "triton", "cuda")))
@pytest.mark.parametrize("op", testing.ops())
def test_profiler_sees_the_kernels(device, backend, op):
    """Under torch.profiler each kernel call is a range named as its registered op
    ("moe_kernels::<kernel>"), as torch's own ops are, where the eager path's bare kernels
    left no event (their host time attributed to nothing); results unchanged."""
    if backend not in _library.OPS[op].backends and op in _library.OPS:
        pytest.skip(f"{op} has no {backend} backend")
    case = _exportable_case(op, device)
    public = functools.partial(getattr(moe_kernels, op), backend=backend)
    want = testing.run(op, public, case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # kineto's notes on this machine's devices
        # the ranges are host events: no CUPTI session on the GPU machine
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = testing.run(op, public, case)
    ours = [e.name for e in prof.events() if e.name.startswith("moe_kernels::")]
    assert ours, [e.name for e in prof.events()]
    assert_same_bits(tensors_of(got), tensors_of(want), f"{op} under the profiler")
