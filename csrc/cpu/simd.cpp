// Run-time choice of the vector kernels (simd.h).
#include "simd.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

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

namespace {

// The first line of a small sysfs file, "" where it cannot be read.
std::string read_line(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return "";
  char buf[64] = {};
  const bool ok = std::fgets(buf, sizeof(buf), f) != nullptr;
  std::fclose(f);
  return ok ? std::string(buf) : "";
}

int64_t read_last_level_cache_bytes() {
  int64_t bytes = 0, top = 0;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i);
    const std::string level = read_line(dir + "/level"), size = read_line(dir + "/size");
    if (level.empty() || size.empty()) continue;
    char* unit = nullptr;
    int64_t n = std::strtoll(size.c_str(), &unit, 10);
    n *= *unit == 'K' ? 1024 : *unit == 'M' ? 1024 * 1024 : 1;
    const int64_t l = std::strtoll(level.c_str(), nullptr, 10);
    if (n > 0 && l > top) top = l, bytes = n;
  }
  return bytes > 0 ? bytes : int64_t{32} << 20;
}

}  // namespace

int64_t last_level_cache_bytes() {
  static const int64_t bytes = read_last_level_cache_bytes();
  return bytes;
}

}  // namespace moe_kernels
