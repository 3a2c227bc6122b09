"""Triton's interpreter without its redundant re-patching of `triton.language` on every
device-function call (test set-up only; the package never touches Triton).

Under TRITON_INTERPRET=1 a kernel launch (`GridExecutor.__call__`) replaces the builtins
of the `triton.language` modules its function's globals hold (`tl`, `tl.core`) by their
interpreter versions, runs every program, and puts them back. A `@triton.jit` helper called
inside the kernel (`InterpretedFunction.__call__`) patches them again, on every call, though
they are patched already: `inspect.getmembers` over the modules, 0.27 ms a call (triton
3.9, 2-core CPU). The grouped GEMMs call helpers in their K loop: 3796 calls, a quarter of
an interleaved-experts edge case's 4.1 s. Measured on the edge presets (best of 2, the
same CPU): grouped_gemm_fp8 3.8-4.0 -> 2.5-2.9 s, fused_moe_fp8 3.8 -> 2.5 s,
grouped_topk 1.5 -> 0.75 s.

`install()` skips a helper's patching where the running launch has patched every module
the helper's globals hold: what it would set is what is set (the same builtins wrapped the
same way, the same replacements), so no program sees a difference. A helper whose globals
hold a module the launch did not patch is patched as Triton does it. Outside a launch
nothing changes. Where the interpreter lacks the names this relies on (another Triton),
`install()` returns False and Triton runs as it is.
"""

from __future__ import annotations

import contextlib
import inspect
import os

_STATE: dict = {}


class _AlreadyPatched:
    """The scope of a skipped patching: nothing to put back."""

    def restore(self) -> None:
        pass


def _lang_modules(fn, tl) -> frozenset:
    """The ids of the triton.language modules `_patch_lang(fn)` patches."""
    return frozenset(id(v) for v in fn.__globals__.values()
                     if inspect.ismodule(v) and (v is tl or v is tl.core))


def install() -> bool:
    """Makes the interpreter skip redundant patching (module docstring) in a process whose
    kernels run interpreted (TRITON_INTERPRET=1); idempotent. Returns whether it is
    installed."""
    if "installed" in _STATE:
        return _STATE["installed"]
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton.language as tl
        import triton.runtime.interpreter as interpreter
        patch_lang = interpreter._patch_lang
        launch = interpreter.GridExecutor.__call__
    except (ImportError, AttributeError):
        _STATE["installed"] = False
        return False
    patched: list[set] = []     # per running launch: the modules patched for it

    def _patch_lang(fn):
        modules = _lang_modules(fn, tl)
        if patched and modules <= patched[-1]:
            _STATE["skipped"] = _STATE.get("skipped", 0) + 1
            return _AlreadyPatched()
        if patched:
            patched[-1].update(modules)
        return patch_lang(fn)

    def _launch(self, *args, **kwargs):
        patched.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    interpreter._patch_lang = _patch_lang
    interpreter.GridExecutor.__call__ = _launch
    _STATE.update(installed=True, triton=(patch_lang, launch), ours=(_patch_lang, _launch))
    return True


@contextlib.contextmanager
def triton_as_it_is():
    """Inside: the interpreter's own functions (a test's baseline)."""
    import triton.runtime.interpreter as interpreter
    (patch_lang, launch), ours = _STATE["triton"], _STATE["ours"]
    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang, launch
    try:
        yield
    finally:
        interpreter._patch_lang, interpreter.GridExecutor.__call__ = ours


def skipped_patchings() -> int:
    """How many helper calls skipped their patching so far (a test's evidence)."""
    return _STATE.get("skipped", 0)
