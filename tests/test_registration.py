"""The op namespace: schemas in C++ and Python agree, the package imports and works
without the compiled extension (reference + Triton, one warning), and fakes exist."""

import subprocess
import sys
import textwrap

import pytest
import torch

import moe_kernels
from moe_kernels import _library


@pytest.mark.parametrize("name", sorted(_library.SCHEMAS))
def test_cpp_schema_matches_python_mirror(name):
    """csrc/registration.cpp and _library.SCHEMAS must define the same schema; the Python
    copy is what extension-less imports register."""
    if not moe_kernels.extension_loaded():
        pytest.skip("moe_kernels._C not built: nothing to compare with")
    op = getattr(torch.ops.moe_kernels, name).default
    expected = torch._C.parse_schema(f"moe_kernels::{_library.SCHEMAS[name]}")
    assert str(op._schema) == str(expected)


def test_every_schema_has_a_fake():
    for name in _library.SCHEMAS:
        op = getattr(torch.ops.moe_kernels, name).default
        fake = torch._library.simple_registry.singleton.find(op.name()).fake_impl.kernel
        assert fake is not None, f"{name} has no fake (register_fake) implementation"


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
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "moe_kernels._C is not loaded" in line]
    assert len(warnings) == 1, r.stderr[-3000:]
