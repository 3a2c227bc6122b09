"""Builds moe_kernels._C: C++ CPU kernels always; CUDA kernels where torch has CUDA and
nvcc is found. MOE_KERNELS_SKIP_CUDA=1 skips CUDA; MOE_KERNELS_CUDA_ARCHS picks the
architectures (torch's TORCH_CUDA_ARCH_LIST syntax, default "9.0a")."""

import glob
import os
import shutil

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch


def cuda_build_reason():
    """None when CUDA kernels are built, else why not."""
    if os.environ.get("MOE_KERNELS_SKIP_CUDA") == "1":
        return "MOE_KERNELS_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return "torch has no CUDA"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc not found"
    return None


def extension():
    sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is an OpenMP pragma, serial without it. -fno-trapping-math:
    # lets GCC if-convert float selects so csrc/cpu/vec_math.h vectorizes (no code reads
    # FP exception flags).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
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


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
