// Every schema of the moe_kernels namespace, in one place (mirrored for extension-less
// imports by moe_kernels/_library.py::SCHEMAS; tests/test_registration.py checks they agree).
// Kernels register themselves per dispatch key next to their code (csrc/cpu, csrc/cuda).
#include <torch/extension.h>

#include "ops.h"

TORCH_LIBRARY(moe_kernels, m) {
  m.def(
      "grouped_topk(Tensor logits, Tensor? correction_bias, int top_k, "
      "int num_expert_group, int topk_group, str scoring_func, str group_scoring, "
      "bool renormalize, float routed_scaling_factor) -> (Tensor, Tensor)");
  m.def(
      "grouped_topk_triton(Tensor logits, Tensor? correction_bias, int top_k, "
      "int num_expert_group, int topk_group, str scoring_func, str group_scoring, "
      "bool renormalize, float routed_scaling_factor) -> (Tensor, Tensor)");
}

// Direct entry points for the eager path: calling these skips the dispatcher and the
// Python autograd kernel (about 3-10 us per call, see docs/index.md).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("with_cuda", []() {
#ifdef MOE_KERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("grouped_topk_cpu", &moe_kernels::grouped_topk_cpu);
#ifdef MOE_KERNELS_WITH_CUDA
  m.def("grouped_topk_cuda", &moe_kernels::grouped_topk_cuda);
#endif
}
