"""Builds moe_kernels._C: C++ CPU kernels always; CUDA kernels where torch has CUDA and
nvcc is found. MOE_KERNELS_SKIP_CUDA=1 skips CUDA; MOE_KERNELS_CUDA_ARCHS picks the
architectures (torch's TORCH_CUDA_ARCH_LIST syntax, default "9.0a")."""

import glob
import os
import shutil

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch


# Headers torch's own CUDA headers include (ATen/cuda/CUDAContextLight.h): a toolkit
# without them (nvcc alone, or a runtime-only install) cannot build any torch CUDA code.
TORCH_CUDA_HEADERS = ("cuda_runtime_api.h", "cusparse.h", "cublas_v2.h", "cublasLt.h")


def missing_cuda_headers(cuda_home):
    """The TORCH_CUDA_HEADERS found in none of the toolkit's include directories."""
    dirs = [os.path.join(cuda_home, "include")] + glob.glob(
        os.path.join(cuda_home, "targets", "*", "include"))
    return [h for h in TORCH_CUDA_HEADERS
            if not any(os.path.exists(os.path.join(d, h)) for d in dirs)]


def cuda_build_reason(environ=os.environ, torch_cuda=torch.version.cuda, cuda_home=CUDA_HOME,
                      nvcc=shutil.which("nvcc")):
    """None when CUDA kernels are built, else why not (printed by the build)."""
    if environ.get("MOE_KERNELS_SKIP_CUDA") == "1":
        return "MOE_KERNELS_SKIP_CUDA=1"
    if torch_cuda is None:
        return "torch has no CUDA"
    if cuda_home is None and nvcc is None:
        return "nvcc not found"
    home = cuda_home or os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    missing = missing_cuda_headers(home)
    if missing:
        return (f"the CUDA toolkit at {home} lacks {', '.join(missing)} (torch's CUDA headers "
                f"include them; install the full toolkit, or set MOE_KERNELS_SKIP_CUDA=1 to "
                f"silence this)")
    return None


def extension():
    sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is an OpenMP pragma, serial without it. -fno-trapping-math:
    # lets GCC if-convert float selects so csrc/cpu/vec_math.h vectorizes (no code reads
    # FP exception flags). -g0: Python's flags add -g, whose debug info for the torch headers
    # made each object ~18 MB and its compile ~30% longer (gating.cpp 60 s -> 46 s, 2 cores).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-g0"]
    reason = cuda_build_reason()
    if reason is not None:
        print(f"moe_kernels: building CPU kernels only ({reason})")
        return CppExtension("moe_kernels._C", sources, extra_compile_args={"cxx": cxx})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("MOE_KERNELS_CUDA_ARCHS", "9.0a"))
    print(f"moe_kernels: building CPU and CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension(
        "moe_kernels._C", sources,
        define_macros=[("MOE_KERNELS_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx + ["-DMOE_KERNELS_WITH_CUDA"],
                            "nvcc": ["-O3", "-lineinfo", "-DMOE_KERNELS_WITH_CUDA"]})


if __name__ == "__main__":    # setuptools runs this file as __main__; tests import it
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
