"""The op namespace: each schema defined once (Python), the C++ kernels registered on it
behind their checks, every variant with a fake; the package imports and works without the
compiled extension (reference + Triton, one warning)."""

import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import moe_kernels
from moe_kernels import _library

VARIANTS = sorted(v for op in _library.OPS.values() for v in op.variants)
NATIVE = sorted((name, b) for name, op in _library.OPS.items() for b in op.native)


def test_every_public_op_is_registered():
    """The public ops that users of torch.ops look for, composites included."""
    for name in ("grouped_topk", "permute", "permute_masked", "unpermute",
                 "moe_align_block_size", "quantize_fp8_per_token_group", "quantize_fp8_block",
                 "dequantize_fp8_block", "silu_and_mul_quant_fp8", "grouped_gemm_fp8",
                 "grouped_gemm_fp8_masked", "fused_moe_fp8", "mla_decompress_kv",
                 "mla_decompress_kv_paged"):
        assert name in _library.OPS, name
        assert hasattr(torch.ops.moe_kernels, name), name


@pytest.mark.parametrize("name,backend", NATIVE)
def test_cpp_kernels_registered_on_the_python_schema(name, backend):
    """`<name>` has a kernel for the backend's dispatch key (the checked Python kernel of
    _library.Op), and `_C` has the entry point `<name>_<backend>` and its check."""
    if backend == "cuda" and not moe_kernels.extension_has_cuda():
        pytest.skip("moe_kernels._C built without CUDA kernels")
    if not moe_kernels.extension_loaded():
        pytest.skip("moe_kernels._C not built")
    qualname = f"moe_kernels::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, backend.upper())
    assert callable(getattr(_library._C, f"{name}_{backend}"))
    assert callable(getattr(_library._C, f"{name}_{backend}_check"))


def test_schema_is_written_once():
    """The triton variant's schema is derived from the op's: same arguments and returns."""
    for name, op in _library.OPS.items():
        for variant in op.variants:
            schema = str(getattr(torch.ops.moe_kernels, variant).default._schema)
            assert schema.replace(f"::{variant}(", f"::{name}(") == f"moe_kernels::{op.schema}"


def test_cuda_limits_come_from_the_extension():
    if not moe_kernels.extension_loaded():
        pytest.skip("moe_kernels._C not built")
    assert _library._C_LIMITS == {"gating_cuda_max_experts": 1024,
                                  "permute_cuda_max_experts": 1024}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_has_a_fake(variant):
    op = getattr(torch.ops.moe_kernels, variant).default
    fake = torch._library.simple_registry.singleton.find(op.name()).fake_impl.kernel
    assert fake is not None, f"{variant} has no fake (register_fake) implementation"


def _run_without_extension(code: str) -> subprocess.CompletedProcess:
    env = dict(__import__("os").environ, MOE_KERNELS_NO_EXT="1", TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-W", "always", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_import_without_extension():
    r = _run_without_extension("""
        import torch, moe_kernels
        from moe_kernels import BackendUnavailableError
        assert not moe_kernels.extension_loaded()
        x = torch.randn(5, 16)
        w, ids = moe_kernels.grouped_topk(x, 2, num_expert_group=4, topk_group=2)
        w_t, ids_t = moe_kernels.grouped_topk(x, 2, num_expert_group=4, topk_group=2,
                                              backend="triton")
        assert torch.equal(ids, ids_t)
        try:
            moe_kernels.grouped_topk(x, 2, backend="cpu")
        except BackendUnavailableError as e:
            assert "not loaded" in str(e)
        else:
            raise AssertionError("cpu backend ran without the extension")
        # schemas and fakes exist without the .so: torch.compile traces the triton op
        f = torch.compile(lambda t: moe_kernels.grouped_topk(t, 2, backend="triton"),
                          fullgraph=True, backend="eager")
        assert torch.equal(f(x)[1], moe_kernels.grouped_topk(x, 2, backend="triton")[1])
        # the composite permute op runs the default backend (reference here)
        out = torch.ops.moe_kernels.permute(x, ids, 16, 1, None)
        assert torch.equal(out[0], moe_kernels.permute(x, ids, 16)[0])
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "moe_kernels._C is not loaded" in line]
    assert len(warnings) == 1, r.stderr[-3000:]


# Direct torch.ops calls skip the Python checks: each degenerate size below would reach a
# C++ division by zero (SIGFPE) or an out-of-bounds read without the C++ checks.
# (description, call) pairs; each must raise an exception or return, never kill the process.
_DEGENERATE_CALLS = """
import torch
ops = torch.ops.moe_kernels
fp8 = lambda *s: torch.zeros(*s, dtype=torch.float8_e4m3fn)
i32 = lambda *s: torch.zeros(*s, dtype=torch.int32)
calls = [
    ("dequant block 0", lambda: ops.dequantize_fp8_block(fp8(4, 8), torch.ones(1, 1), 0, 8,
                                                         torch.float32)),
    ("dequant K 0", lambda: ops.dequantize_fp8_block(fp8(4, 0), torch.ones(1, 0), 128, 128,
                                                     torch.float32)),
    ("quant block 0", lambda: ops.quantize_fp8_block(torch.zeros(4, 8), 0, 0, 1e-10)),
    ("token group 0", lambda: ops.quantize_fp8_per_token_group(torch.zeros(2, 8), 0, 1e-10,
                                                               False, False)),
    ("silu group 0", lambda: ops.silu_and_mul_quant_fp8(torch.zeros(2, 8), 0, 1e-10)),
    ("paged page 0", lambda: ops.mla_decompress_kv_paged(
        torch.zeros(2, 0, 80), i32(1, 1), torch.ones(1, dtype=torch.int32),
        torch.zeros(64, 64), None, None, torch.empty(1, 2, 16), torch.empty(1, 2, 16))),
    ("align 0", lambda: ops.permute_index(i32(2, 2), 4, 0)),
    ("align 0 (triton)", lambda: ops.permute_index_triton(i32(2, 2), 4, 0)),
    ("block_size 0 (triton)", lambda: ops.moe_align_block_size_triton(i32(2, 2), 4, 0)),
    ("block_size 0", lambda: ops.moe_align_block_size(i32(2, 2), 4, 0)),
    ("groups 0", lambda: ops.grouped_topk(torch.zeros(2, 8), None, 2, 0, 1, "sigmoid", "max",
                                          True, 1.0, -1)),
    ("gather K 0", lambda: ops.gather_rows(torch.zeros(2, 4), i32(3) - 1, i32(2, 0))),
]
for name, call in calls:
    try:
        call()
    except Exception:
        pass
    print("survived", name, flush=True)
"""


@pytest.mark.skipif(not _library.extension_loaded(), reason="moe_kernels._C is not built")
def test_degenerate_sizes_through_torch_ops_never_kill_the_process():
    r = subprocess.run([sys.executable, "-c", _DEGENERATE_CALLS], capture_output=True,
                       text=True, timeout=300)
    survived = [line for line in r.stdout.splitlines() if line.startswith("survived")]
    assert r.returncode == 0 and len(survived) == 12, (
        f"killed (rc {r.returncode}) after: {survived}\n{r.stderr[-2000:]}")


def test_only_the_module_file_includes_torch_extension_h():
    """torch/extension.h tripled a file's compile time (csrc/registration.cpp says why):
    the kernels' files include ATen/ATen.h instead."""
    csrc = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    including = sorted(str(p.relative_to(csrc)) for p in csrc.rglob("*")
                       if p.suffix in (".cpp", ".cu", ".h", ".cuh", ".inc")
                       and "#include <torch/extension.h>" in p.read_text())
    assert including == ["registration.cpp"]


def test_host_integer_helpers_match_triton():
    """Host code computes grids and paddings with _common's cdiv / next_power_of_2 (a
    twentieth of triton's host cost): the same values as triton's."""
    import triton

    from moe_kernels._common import cdiv, next_power_of_2
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 5000))
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 600) for b in range(1, 70))
