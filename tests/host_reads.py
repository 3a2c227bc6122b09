"""A TorchFunctionMode that records every call reading tensor values on the host (on CUDA
each waits for the device and breaks CUDA-graph capture), for tests/test_host_sync.py and
the expert-parallel workers."""

from __future__ import annotations

import os
import traceback

import torch
from torch.overrides import TorchFunctionMode

T = torch.Tensor
# each of these reads tensor values on the host (on CUDA: a device sync)
READS = {T.item, T.tolist, T.__bool__, T.__int__, T.__float__, T.__index__, T.numpy,
         T.cpu, T.nonzero, torch.nonzero, torch.argwhere, T.masked_select,
         torch.masked_select, T.unique, torch.unique, torch.unique_consecutive,
         T.bincount, torch.bincount, T.equal, torch.equal, T.allclose, torch.allclose,
         T.__repr__, T.__format__}
REPEAT_INTERLEAVE = {T.repeat_interleave, torch.repeat_interleave}
INDEXING = {T.__getitem__, T.__setitem__}
# mla_decompress_kv_paged's value checks: a CPU call always runs them, a CUDA call only
# when not given num_tokens or out_k (docs/mla.md), so that CUDA calls can be sync-free
ALLOWED = {"_paged_value_problem"}
# the Triton interpreter copies a launch's tensors through numpy: on the GPU, a launch
INTERPRETER = os.path.join("triton", "runtime", "interpreter.py")


def _reads_values(func, args, kwargs) -> bool:
    if func in READS:
        return True
    if func in REPEAT_INTERLEAVE:    # tensor repeats size the output from their values
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0])
        return isinstance(repeats, T) and kwargs.get("output_size") is None
    if func in INDEXING:             # a boolean mask is a nonzero
        index = args[1] if len(args) > 1 else None
        return any(isinstance(i, T) and i.dtype == torch.bool
                   for i in (index if isinstance(index, tuple) else (index,)))
    if func is torch.where:          # where(cond) alone is nonzero
        return len(args) + len(kwargs) == 1
    return False


class HostReads(TorchFunctionMode):
    """Within `with HostReads() as mode:`, mode.reads lists each host read as 'name at
    file:line in function' of the innermost moe_kernels frame (a read inside torch names
    its caller in the package), except the ALLOWED functions' and the interpreter's."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_values(func, args, kwargs):
            stack = traceback.extract_stack()[:-1]
            if any(f.filename.endswith(INTERPRETER) for f in stack):
                return func(*args, **kwargs)     # a launch's stand-in, not host code
            frames = [f for f in stack if f"{os.sep}moe_kernels{os.sep}" in f.filename]
            where = frames[-1] if frames else None
            if where is None or where.name not in ALLOWED:
                name = getattr(func, "__name__", str(func))
                self.reads.append(f"{name} at {where.filename.split('moe_kernels')[-1]}:"
                                  f"{where.lineno} in {where.name}" if where else name)
        return func(*args, **kwargs)
