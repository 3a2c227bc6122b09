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
