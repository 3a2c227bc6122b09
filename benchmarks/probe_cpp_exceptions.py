"""Probe of the platform: does a C++ exception thrown inside a torch extension reach Python
as an exception here, or kill the process? Each variant is a minimal `load_inline`
extension, built and run in its own process, so that one crash does not hide the others.

On the GPU machine (torch 2.11.0+cu130, gcc 13.3) the first probe's variants (TORCH_CHECK
with our flags and without) all died with SIGSEGV; on the CPU machines (torch 2.13.0,
gcc 12.2) every variant raised. The variants below separate the candidate causes:

  check         TORCH_CHECK_VALUE escaping to Python (what our private entry points
                `_C.<op>_<backend>` still do when called with bad arguments)
  check_caught  the same c10::Error thrown and caught inside the function: does throwing
                (or the stack trace c10::Error captures when built) crash by itself?
  std_caught    std::runtime_error thrown and caught inside: does unwinding work at all?
  std_escapes   std::invalid_argument escaping to Python (pybind11: ValueError; no
                c10 stack-trace capture)
  static_gcc    TORCH_CHECK_VALUE, linked with -static-libgcc -static-libstdc++ (an
                unwinder of its own instead of the process's)
  no_clones     TORCH_CHECK_VALUE, without the target_clones (ifunc) function our CPU
                kernels use
  moe_kernels   our own extension as it is loaded here (built on this machine, or carried
                from the CPU machine's compiler: benchmarks/carried_build.py): a direct
                torch.ops call with a bad argument. Its C++ check reports the problem and
                Python raises it (csrc/checks.h), so this must raise even where C++
                exceptions kill the process
  moe_kernels_entry  the same bad argument passed to the private entry point
                `_C.grouped_topk_cpu`, which throws in C++: whether our extension's own
                throw survives here

Usage: python3 benchmarks/probe_cpp_exceptions.py  (prints one line per variant)
"""
import subprocess
import sys

CLONES = r'''
__attribute__((target_clones("avx512f","avx2","default"))) void vec(float* s, long n) {
  for (long i = 0; i < n; ++i) s[i] = s[i] * 2.f; }
'''
BODIES = {
    "check": 'TORCH_CHECK_VALUE(x.dim() == 7, "boom: dim ", x.dim()); return x;',
    "check_caught": 'try { TORCH_CHECK_VALUE(x.dim() == 7, "boom"); } '
                    'catch (const c10::Error&) { return x + 1; } return x;',
    "std_caught": 'try { throw std::runtime_error("boom"); } '
                  'catch (const std::exception&) { return x + 1; } return x;',
    "std_escapes": 'if (x.dim() != 7) throw std::invalid_argument("boom"); return x;',
    "static_gcc": 'TORCH_CHECK_VALUE(x.dim() == 7, "boom: dim ", x.dim()); return x;',
    "no_clones": 'TORCH_CHECK_VALUE(x.dim() == 7, "boom: dim ", x.dim()); return x;',
}
FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]      # setup.py's CPU flags
LDFLAGS = {"static_gcc": ["-static-libgcc", "-static-libstdc++"]}


def source(variant: str) -> str:
    clones = "" if variant == "no_clones" else CLONES
    call = "" if variant == "no_clones" else "if (x.dim() == 0) vec(nullptr, 0);"
    return (f"#include <torch/extension.h>\n#include <stdexcept>\n{clones}\n"
            f"at::Tensor boom(at::Tensor x) {{ {call} {BODIES[variant]} }}\n")


def run_ours(entry: bool) -> None:
    import torch
    import moe_kernels
    if not moe_kernels.extension_loaded():
        print("skipped: moe_kernels._C is not loaded")
        return
    call = moe_kernels._library._C.grouped_topk_cpu if entry else torch.ops.moe_kernels.grouped_topk
    try:
        call(torch.zeros(4, 10), None, 2, 3, 1, "sigmoid", "max", True, 1.0, -1)
        print("returned (no error for a bad num_expert_group)")
    except Exception as e:
        print("raised", type(e).__name__)


def run_variant(variant: str) -> None:
    if variant in ("moe_kernels", "moe_kernels_entry"):
        return run_ours(variant == "moe_kernels_entry")
    from torch.utils.cpp_extension import load_inline
    import torch
    m = load_inline(f"exc_probe_{variant}", cpp_sources=[source(variant)], functions=["boom"],
                    extra_cflags=FLAGS, extra_ldflags=LDFLAGS.get(variant, []), verbose=False)
    try:
        out = m.boom(torch.zeros(2))
        print(f"returned (caught inside: {bool(out[0] == 1)})")
    except Exception as e:
        print("raised", type(e).__name__)


def main() -> None:
    procs = {k: subprocess.Popen([sys.executable, __file__, k], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
             for k in (*BODIES, "moe_kernels", "moe_kernels_entry")}
    for k, p in procs.items():
        out = p.communicate()[0].strip()
        last = out.splitlines()[-1] if out else ""
        print(f"variant {k:17s} rc={p.returncode:4d}  {last}")


if __name__ == "__main__":
    run_variant(sys.argv[1]) if len(sys.argv) > 1 else main()
