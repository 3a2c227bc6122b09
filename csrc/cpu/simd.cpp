// Run-time choice of the vector kernels (simd.h).
#include "simd.h"

#include <atomic>
#include <initializer_list>
#include <cstdlib>
#include <cstring>

#include "amx.h"

namespace moe_kernels {
namespace {

struct Build {
  const char* name;
  const SimdKernels* kernels;
  bool amx;
};

// Widest first. The amx build takes the GEMMs of many rows to the tiles, so it needs no
// bf16 dot products of its own.
constexpr Build kBuilds[] = {{"amx", &simd_avx512::kernels, true},
                             {"avx512bf16", &simd_avx512bf16::kernels, false},
                             {"avx512", &simd_avx512::kernels, false},
                             {"avx2", &simd_avx2::kernels, false},
                             {"generic", &simd_generic::kernels, false}};
constexpr size_t kGeneric = sizeof(kBuilds) / sizeof(kBuilds[0]) - 1;

bool runs_here(const Build& b) {
  if (b.amx) return amx::supported();
  if (b.kernels == &simd_avx512bf16::kernels) return simd_avx512bf16::supported();
  if (b.kernels == &simd_avx512::kernels) return simd_avx512::supported();
  if (b.kernels == &simd_avx2::kernels) return simd_avx2::supported();
  return true;
}

// The build called `name` if this CPU runs it, else nullptr.
const Build* build_named(const char* name) {
  for (const Build& b : kBuilds)
    if (std::strcmp(name, b.name) == 0) return runs_here(b) ? &b : nullptr;
  return nullptr;
}

const Build* initial_choice() {
  const char* forced = std::getenv("MOE_KERNELS_CPU_ISA");
  const Build* b = forced != nullptr ? build_named(forced) : nullptr;
  if (b != nullptr) return b;
  for (const Build& c : kBuilds)
    if (runs_here(c)) return &c;
  return &kBuilds[kGeneric];
}

std::atomic<const Build*>& chosen() {
  static std::atomic<const Build*> build{initial_choice()};
  return build;
}

}  // namespace

const SimdKernels& simd() { return *chosen().load(std::memory_order_relaxed)->kernels; }

bool amx_enabled() { return chosen().load(std::memory_order_relaxed)->amx; }

const char* cpu_isa() { return chosen().load(std::memory_order_relaxed)->name; }

bool set_cpu_isa(const char* name) {
  const Build* b = build_named(name);
  if (b != nullptr) chosen().store(b);
  return b != nullptr;
}

}  // namespace moe_kernels
