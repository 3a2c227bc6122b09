"""No host synchronisation on the ops' paths (docs/api.md), checked in every CI run without a
GPU: each op's eager call on each backend runs on CPU tensors under a TorchFunctionMode
that records every call that reads tensor values on the host. On CUDA each such call
waits for the device (microseconds per op at decode) and makes CUDA-graph capture fail;
test_cuda_graphs.py checks capture itself, but only on a GPU machine.

Triton kernels run under the interpreter with their launches replaced by no-ops, so only
the host code runs and an output fed back to the host would be read here too. The one
allowed read (tests/host_reads.py): mla_decompress_kv_paged's value checks, which a CUDA
call skips when given num_tokens or out_k. Branches taken only for CUDA tensors are out
of reach here; the GPU run's graph tests cover them. Expert parallelism: its low-latency
mode is checked the same way in test_expert_parallel.py's ranks.
"""

from __future__ import annotations

import os

import pytest
import torch

import moe_kernels
from moe_kernels import _library, testing

from host_reads import HostReads


@pytest.fixture
def unlaunched(monkeypatch):
    """Triton launches as no-ops (interpreter only; elsewhere the triton backend does not
    take CPU tensors and its cases skip)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        import triton.runtime.interpreter as interpreter
        monkeypatch.setattr(interpreter.InterpretedFunction, "__getitem__",
                            lambda self, grid: lambda *args, **kwargs: None)


def _reads_of(call) -> list[str]:
    with HostReads() as mode:
        call()
    return mode.reads


BACKENDS = ("triton", "cpu", "reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", testing.ops())
def test_op_reads_nothing_on_the_host(op, backend, unlaunched):
    public = getattr(moe_kernels, op)
    ran, reads = 0, {}
    for case in testing.cases(op, "edge"):
        args, kwargs = testing.run(op, lambda *a, **k: (a, k), case)
        try:
            found = _reads_of(lambda: public(*args, backend=backend, **kwargs))
        except _library.BackendUnavailableError as exc:
            pytest.skip(f"{op} on {backend}: {exc}")
        if found:
            reads[case.name] = found
        ran += 1
    assert ran, f"{op}: no edge case"
    assert not reads, f"{op} [{backend}] reads tensor values on the host: {reads}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_forward_and_balancing_read_nothing_on_the_host(backend, unlaunched):
    from test_layer import make_config, make_hidden, make_weights
    cfg = make_config()
    try:
        layer = moe_kernels.DeepseekV3MoE.from_hf(cfg, make_weights(cfg), backend=backend)
        layer(make_hidden(1, cfg))
    except _library.BackendUnavailableError as exc:
        pytest.skip(f"{backend}: {exc}")
    for T_ in (1, 6, 64):
        hidden = make_hidden(T_, cfg)
        assert not _reads_of(lambda: layer(hidden)), f"T={T_}"
    bias = torch.zeros(cfg.n_routed_experts)
    counts = torch.arange(cfg.n_routed_experts, dtype=torch.int32)
    assert not _reads_of(lambda: moe_kernels.update_correction_bias_(bias, counts, 1e-3))


def test_host_reads_are_seen(unlaunched):
    """The mode sees each kind of read it looks for, also inside torch code."""
    x = torch.tensor([0.0, 1.0, 2.0])
    mask = x > 0
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(mask.any()),
                 lambda: x[mask], lambda: torch.nonzero(x), lambda: torch.where(mask),
                 lambda: x.repeat_interleave(torch.tensor([1, 2, 0])), lambda: x.cpu(),
                 lambda: int(x[0]), lambda: range(x.long()[1])):
        assert _reads_of(read), read
    for fine in (lambda: x.repeat_interleave(2), lambda: torch.where(mask, x, 0.0),
                 lambda: x[torch.tensor([2, 0])], lambda: x.max(),
                 lambda: x.repeat_interleave(torch.tensor([1, 2, 0]), output_size=3)):
        assert not _reads_of(fine), fine
