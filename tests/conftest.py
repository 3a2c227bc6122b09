"""Test set-up shared by every test module.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before triton is first imported, which is why it is set here, at collection start.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# Interpreter runs are slow and vary in time: no per-example deadline.
settings.register_profile("default", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")


class CppCheckReached(BaseException):
    """A public function called a C++ entry point with arguments its C++ check refuses:
    the Python checks missed a precondition, and on a platform where C++ exceptions kill
    the process (csrc/checks.h) that call would have. A BaseException, so that no
    `pytest.raises(ValueError)` around the call can take it for the expected error."""


def _checked_first(name: str, backend: str, entry):
    from moe_kernels import _library
    check = getattr(_library._C, f"{name}_{backend}_check")

    def call(*args):
        kind, message = check(*args)
        if kind:
            raise CppCheckReached(f"{name}_{backend} reached with arguments its check refuses: "
                                  f"{message}")
        return entry(*args)

    return call


def pytest_sessionstart(session):
    """Every C++ entry point the eager path calls (`Op._eager`) runs its check first, for the
    whole session: any test input that passes the public checks but not the C++ ones
    fails its test (CppCheckReached)."""
    from moe_kernels import _library
    if not _library.extension_loaded():
        return
    for name, op in _library.OPS.items():
        for backend in op.native:
            if _library.backend_unavailable_reason(backend, torch.device(backend)) is None:
                op._eager[backend] = _checked_first(name, backend, op._bare(backend))
