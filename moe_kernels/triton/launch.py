"""Launching compiled Triton kernels without Triton's per-call launcher in Python.

`kernel[grid](*args, **kwargs)` on a `triton.jit` function goes through
`JITFunction.run` on every call: it binds the arguments, specialises each one, turns the
options into a string for the cache key, reads several knobs and checks the globals the
kernel used, then calls the compiled kernel's C launcher. Measured on a 2-core Sapphire
Rapids CPU with the C launcher stubbed out: `kernel[grid](...)` of the gating kernel
10.9 us (triton 3.6) and 12.7 us (triton 3.9), against 0.5 us for the C launcher's
Python call alone, and ~5 us through this cache; whole ops: `benchmarks/host_overhead.py
--compiled` (docs/benchmarks.md). On the H100 machine the gating kernel's whole launch
took 40 us (triton 3.6, `bench_NVIDIA_H100_80GB_HBM3_20261122T2211.txt`).

`cached_launch(kernel)` wraps a kernel so that `kernel[grid](...)` looks the compiled
kernel up by a key of our own and calls its launcher directly. The key is at least as
fine as Triton's specialisation, so a hit is the kernel Triton would have chosen:

- a tensor: its dtype and whether its address is a multiple of 16 (Triton's "D");
- an int: whether it is 1 (Triton compiles 1 in as a constant), a multiple of 16, and
  which of int32 / int64 / uint64 holds it;
- a float, a bool: only the type (Triton specialises neither on its value); None: None;
- a TMA descriptor (`triton.tools.tensor_descriptor.TensorDescriptor`): its dtype, block
  shape and padding (its shape and strides are runtime arguments of the launcher); a
  Gluon one also by its shared-memory layout;
- every keyword argument (constexprs and launch options such as num_warps) by value;
- the current device.

Anything else goes through `JITFunction.run` unchanged: another argument type, a grid
given as a function, a keyword that fills a non-constexpr parameter, a constexpr passed
by position, launch hooks set, `JITFunction.run` replaced (as the sm_90a gate does). So
does the first call of each key, which compiles and launches as usual and is then cached.
Not looked at again on a hit: Triton's debug knobs (read by `JITFunction.run` per call)
and the kernel's globals (constexpr globals of this package, never reassigned).
`MOE_KERNELS_TRITON_LAUNCH=jit` (read at import) turns the cache off.

`configure(kernel, **keywords)` binds a launch configuration's keywords once (an op's
launcher memoises it per configuration): `[grid](*args)` then skips building the keywords
and their part of the key. Used where a launch has many keywords (gating 14, MLA 19, the
grouped GEMMs 9-10: 2-6 us a call on a 2-core CPU, docs/benchmarks.md); for a handful
the memo's own lookup costs about what it saves.

Under TRITON_INTERPRET=1 kernels are returned unwrapped (the interpreter has no launcher).
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1
_U64_MIN = 1 << 63


class _Unkeyed(Exception):
    """An argument whose specialisation is not derived here: the call goes through
    `JITFunction.run`."""


def _other_key(a):
    """The key of a positional argument that is neither a plain tensor nor an int."""
    kind = type(a)
    if kind is float or kind is bool or a is None:
        return kind
    if isinstance(a, torch.Tensor):       # a subclass (nn.Parameter)
        return _args_key((a.data,))[0]
    if type(a) is _TensorDescriptor:      # Triton: "tensordesc<dtype[block_shape]>"
        return (_TensorDescriptor, a.base.dtype, tuple(a.block_shape), a.padding)
    if type(a) is _GluonDescriptor:       # Gluon's also names its shared-memory layout
        return (_GluonDescriptor, a.base.dtype, tuple(a.block_shape), a.layout, a.padding)
    raise _Unkeyed


def _args_key(args: tuple, T=torch.Tensor, lo=_I32_MIN, hi=_I32_MAX, u64=_U64_MIN) -> tuple:
    """What of the positional arguments Triton's specialisation depends on (module
    docstring), each kind in a form no other kind takes: an aligned tensor its dtype, an
    unaligned one (dtype,); an int32 other than 1 a bool (a multiple of 16), another int
    a 4-tuple; float, bool, None their type. Tensors and ints inline, the common cases
    without a tuple: 26 arguments (MLA's) 4.4 -> 3.5 us, and a call per argument would
    double it."""
    return tuple([(a.dtype if not a.data_ptr() & 15 else (a.dtype,)) if type(a) is T
                  else not a & 15 if type(a) is int and a != 1 and lo <= a <= hi
                  else (a == 1, not a & 15, lo <= a <= hi, a < u64) if type(a) is int
                  else _other_key(a) for a in args])


class CachedLaunch:
    """A `triton.jit` kernel whose `[grid](*args, **kwargs)` launches a cached compiled
    kernel directly (module docstring). Every other attribute is the kernel's."""

    def __init__(self, jit):
        self.jit = jit
        self._names = [p.name for p in jit.params]
        self._defaults = {p.name: p.default for p in jit.params if p.has_default}
        self._runtime = {p.name for p in jit.params if not p.is_constexpr}
        self._constexpr = [p.is_constexpr for p in jit.params]
        self._cache: dict = {}

    def __getattr__(self, name):
        return getattr(self.jit, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict, kwargs_key: tuple | None = None):
        """Launches jit[grid](*args, **kwargs); returns nothing. kwargs_key:
        tuple(kwargs.items()) when the caller has it (`Configured`)."""
        if not _fast_path_open(self.jit) or type(grid) is not tuple:
            self.jit[grid](*args, **kwargs)
            return
        d = _driver.active
        device = d.get_current_device()
        try:
            key = (device, kwargs_key or tuple(kwargs.items()), _args_key(args))
            entry = self._cache.get(key)
        except (_Unkeyed, TypeError):     # TypeError: an unhashable keyword value
            self.jit[grid](*args, **kwargs)
            return
        if entry is None:
            self._cache_miss(key, grid, args, kwargs)
            return
        run, function, metadata, tail = entry
        n = len(grid)
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
            d.get_current_stream(device), function, metadata, None, None, None, *args, *tail)

    def _cache_miss(self, key, grid, args, kwargs):
        kernel = self.jit[grid](*args, **kwargs)
        if hasattr(kernel, "result"):          # an asynchronous compile's future
            kernel = kernel.result()
        if kernel is None:                     # nothing compiled (Triton's own choice)
            return
        entry = self._entry(kernel, args, kwargs)
        if entry is not None:
            self._cache[key] = entry

    def _entry(self, kernel, args, kwargs):
        """(C launcher, function handle, packed metadata, the arguments after the
        positional ones) of a compiled kernel, or None where the key does not hold what
        a hit would reuse: a keyword that fills a runtime parameter (its value is not
        keyed), a positional constexpr (keyed like a runtime argument, not by value)."""
        if self._runtime.intersection(kwargs) or any(self._constexpr[:len(args)]):
            return None
        rest = self._names[len(args):]
        if not all(n in kwargs or n in self._defaults for n in rest):
            return None
        tail = tuple(kwargs[n] if n in kwargs else self._defaults[n] for n in rest)
        return kernel.run, kernel.function, kernel.packed_metadata, tail


class Configured:
    """`configure(kernel, **keywords)`: `[grid](*args)` launches kernel[grid](*args,
    **keywords). Made once per launch configuration (an op's launcher memoises it), it
    spares each launch building the keywords and their part of the key: gating's
    kernel, 14 keywords, 6.1 -> 3.3 us a launch (C launcher stubbed, 2-core CPU)."""

    def __init__(self, kernel, kwargs: dict):
        self.kernel, self.kwargs = kernel, kwargs
        self._cached = isinstance(kernel, CachedLaunch)
        try:
            self._key = tuple(kwargs.items())
            hash(self._key)
        except TypeError:                      # an unhashable keyword: Triton's own path
            self._cached = False

    def __getitem__(self, grid):
        if self._cached:
            return lambda *args: self.kernel.launch(grid, args, self.kwargs, self._key)
        return lambda *args: self.kernel[grid](*args, **self.kwargs)


def configure(kernel, **kwargs) -> Configured:
    """kernel (a `cached_launch` kernel, or under the interpreter the plain one) with its
    keyword arguments (constexprs, num_warps, ...) bound."""
    return Configured(kernel, kwargs)


def _fast_path_open(jit) -> bool:
    """Whether nothing needs `JITFunction.run`'s own path: launch hooks (profilers) are
    passed only there, and a replaced `run` (the sm_90a gate) must see every call."""
    rt = _knobs.runtime
    return (_ENABLED and type(jit).run.__qualname__ == "JITFunction.run"
            and not _hooked(rt.launch_enter_hook) and not _hooked(rt.launch_exit_hook))


def _hooked(hook) -> bool:
    """A launch hook is set: a callable, or a non-empty `HookChain` (triton >= 3.6 keeps
    an empty chain there, which `JITFunction.run` passes and the launcher calls)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _launch_mode_from_environment() -> bool:
    """MOE_KERNELS_TRITON_LAUNCH: "cached" (the default) or "jit"; another value (a typo
    that meant "jit") warns and keeps the cache."""
    mode = os.environ.get("MOE_KERNELS_TRITON_LAUNCH", "cached")
    if mode not in ("cached", "jit"):
        warnings.warn(f"moe_kernels: MOE_KERNELS_TRITON_LAUNCH={mode!r} is neither 'cached' "
                      f"nor 'jit'; Triton kernels launch through the cache", RuntimeWarning,
                      stacklevel=2)
    return mode != "jit"


_ENABLED = _launch_mode_from_environment()


@contextlib.contextmanager
def cache_enabled(enabled: bool):
    """Within: launches through the cache (True) or through `JITFunction.run` (False); for
    the checks and benchmarks that compare the two."""
    global _ENABLED
    _ENABLED, saved = enabled, _ENABLED
    try:
        yield
    finally:
        _ENABLED = saved


# triton's, bound by the first cached_launch
_driver = _knobs = _TensorDescriptor = _GluonDescriptor = None


def package_globals():
    """(module, name, object) for every module-level name of moe_kernels.triton's modules:
    where the compile gate and the launch check find the kernels."""
    import importlib
    import pkgutil

    import moe_kernels.triton as pkg
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"moe_kernels.triton.{info.name}")
        for name, obj in vars(module).items():
            yield module, name, obj


def cached_launch(kernel):
    """Decorator over `@triton.jit`: `kernel[grid](...)` through the launch cache; the
    kernel itself where there is nothing to launch (the interpreter)."""
    global _driver, _knobs, _TensorDescriptor, _GluonDescriptor
    from triton import knobs
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
    from triton.tools.tensor_descriptor import TensorDescriptor
    _driver, _knobs, _TensorDescriptor = driver, knobs, TensorDescriptor
    _GluonDescriptor = GluonDescriptor
    if not isinstance(kernel, JITFunction):
        return kernel
    return CachedLaunch(kernel)
