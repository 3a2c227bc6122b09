// Run-time choice of the vector kernels (simd.h).
#include "simd.h"

#include <atomic>
#include <initializer_list>
#include <cstdlib>
#include <cstring>

namespace moe_kernels {
namespace {

// The build called `name` if this CPU runs it, else nullptr.
const SimdKernels* build_named(const char* name) {
  if (std::strcmp(name, "avx512") == 0)
    return simd_avx512::supported() ? &simd_avx512::kernels : nullptr;
  if (std::strcmp(name, "avx2") == 0) return simd_avx2::supported() ? &simd_avx2::kernels : nullptr;
  if (std::strcmp(name, "generic") == 0) return &simd_generic::kernels;
  return nullptr;
}

const SimdKernels* initial_choice() {
  const char* forced = std::getenv("MOE_KERNELS_CPU_ISA");
  const SimdKernels* k = forced != nullptr ? build_named(forced) : nullptr;
  if (k != nullptr) return k;
  for (const char* name : {"avx512", "avx2"})
    if ((k = build_named(name)) != nullptr) return k;
  return &simd_generic::kernels;
}

std::atomic<const SimdKernels*>& chosen() {
  static std::atomic<const SimdKernels*> kernels{initial_choice()};
  return kernels;
}

}  // namespace

const SimdKernels& simd() { return *chosen().load(std::memory_order_relaxed); }

bool set_cpu_isa(const char* name) {
  const SimdKernels* k = build_named(name);
  if (k != nullptr) chosen().store(k);
  return k != nullptr;
}

}  // namespace moe_kernels
