"""Probe of the platform: does a minimal torch extension (load_inline) that throws
TORCH_CHECK_VALUE raise a Python ValueError here, or crash? Compiles the same source with
our flags and without. On the GPU machine (torch 2.11.0+cu130, gcc 13.3) every variant
crashed with SIGSEGV (benchmarks/results/cpp_exception_probe_*.txt); on the CPU machines
(torch 2.13.0, gcc 12.2) every variant raised. Usage: python3 benchmarks/probe_cpp_exceptions.py"""
import subprocess
import sys
SRC = r'''
#include <torch/extension.h>
__attribute__((target_clones("avx512f","avx2","default"))) void vec(float* s, long n) { for (long i = 0; i < n; ++i) s[i] = s[i] * 2.f; }
at::Tensor boom(at::Tensor x) { if (x.dim() == 0) vec(nullptr, 0); TORCH_CHECK_VALUE(x.dim() == 7, "boom: dim ", x.dim()); return x; }
'''
VARIANTS = {"plain": [], "ours": ["-O3", "-fopenmp", "-fno-trapping-math"], "O3": ["-O3"], "omp": ["-fopenmp"]}
if len(sys.argv) == 1:
    procs = {k: subprocess.Popen([sys.executable, __file__, k], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in VARIANTS}
    for k, p in procs.items():
        out = p.communicate()[0]
        print(f"variant {k}: rc={p.returncode} {out.strip().splitlines()[-1] if out.strip() else ''}")
else:
    from torch.utils.cpp_extension import load_inline
    k = sys.argv[1]
    m = load_inline(f"exc_{k}", cpp_sources=[SRC], functions=["boom"], extra_cflags=VARIANTS[k], build_directory=None, verbose=False)
    import torch
    try:
        m.boom(torch.zeros(2))
    except Exception as e:
        print("caught", type(e).__name__)
