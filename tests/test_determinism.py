"""docs/api.md, Determinism: every op gives bit-identical results run to run, on every
backend. Each op's cases are called twice on the same inputs and every output compared
bit for bit (NaN included), the DeepseekV3MoE layer's forward too.

On the CPU: each op's first two drawn cases (small; the interpreter runs Triton). On the
GPU (slow marker, the GPU run's slow stage): DeepSeek-V3's shapes, where a kernel has
many programs per output and any atomic whose order reached a result would show.
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels
from moe_kernels import _library, testing

from helpers import bits, device_backend_params, poison_allocator
from test_layer import LAYER_PARAMS, make_fp8_layer, make_hidden


def _output_bits(result) -> list:
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    out = []
    for t in tensors:
        if isinstance(t, tuple):                 # a layout: its tensor fields
            out += _output_bits(tuple(x for x in t if isinstance(x, torch.Tensor)))
        elif isinstance(t, torch.Tensor):
            out.append(bits(t))
    return out


def _cases(op: str, device: str) -> list:
    if device == "cuda":
        return testing.cases(op, "deepseek_v3", device=device)
    return testing.cases(op, "random", seed=3, device=device)[:2]


def _twice_the_same(op, backend, device):
    if backend not in _library.OPS[op].backends:
        pytest.skip(f"{op} has no {backend} backend")
    fn = lambda *a, **k: getattr(moe_kernels, op)(*a, **k, backend=backend)
    cases = _cases(op, device)
    assert cases
    for case in cases:
        runs = []
        for _ in range(2):
            poison_allocator(device)      # the second run's buffers are not the first's
            runs.append(_output_bits(testing.run(op, fn, case)))
        assert runs[0], f"{op} {case.name}: no output tensors"
        for i, (a, b) in enumerate(zip(*runs)):
            assert torch.equal(a, b), f"{op} {case.name} [{backend}]: output {i} differs run to run"


CPU_PARAMS = device_backend_params(("triton", "cpu", "reference"), devices=("cpu",))
# the reference on the GPU is torch's own ops at DeepSeek-V3's sizes: device time for
# torch's determinism, not ours
CUDA_PARAMS = device_backend_params(("triton", "cuda"), devices=("cuda",))


@pytest.mark.parametrize("op", testing.ops())
@pytest.mark.parametrize("device,backend", CPU_PARAMS)
def test_every_op_gives_the_same_bits_twice(op, device, backend):
    _twice_the_same(op, backend, device)


@pytest.mark.slow
@pytest.mark.parametrize("op", testing.ops())
@pytest.mark.parametrize("device,backend", CUDA_PARAMS)
def test_every_op_gives_the_same_bits_twice_on_the_gpu(op, device, backend):
    _twice_the_same(op, backend, device)


@pytest.mark.parametrize("device,backend", LAYER_PARAMS)
def test_layer_gives_the_same_bits_twice(device, backend):
    layer, cfg = make_fp8_layer(device, backend)
    hidden = make_hidden(37, cfg, device=device)
    runs = []
    for _ in range(2):
        poison_allocator(device)
        runs.append(_output_bits(layer(hidden)))
    assert torch.equal(runs[0][0], runs[1][0])
