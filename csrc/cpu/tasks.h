// Work split for the CPU kernels whose tasks are few and heavy (a 128-row weight group of
// MLA, an expert's block of weight rows): each intra-op thread takes the next task from a
// shared counter until none is left. at::parallel_for hands each thread an equal range of
// tasks up front, so a thread slowed by another process on a shared host holds the others
// at the end. MLA (T = 256, H = 16, packed weight: 32 groups on 2 threads of a shared
// 2-core VM), three alternating runs each, the unfused torch path's time over ours:
// 1.14-1.16x with the equal split, 1.12-1.41x with the counter.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace moe_kernels {

// body(state, task) for every task in [0, n), in no fixed order; state = make_state(),
// once per thread that runs tasks (its scratch buffers).
template <typename MakeState, typename Body>
void for_each_task(int64_t n, MakeState make_state, Body body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  // one index per thread; nested inside another parallel region it runs once, serially,
  // and that one call takes every task
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t t = next++; t < n; t = next++) body(state, t);
  });
}

// A task's scratch for n uint16 of tile data: 64-byte aligned (at::empty's CPU storage is;
// a std::vector's is 16), so that no 64-byte tile row straddles two cache lines.
struct TileScratch {
  at::Tensor storage;
  explicit TileScratch(int64_t n) : storage(at::empty({n}, at::TensorOptions().dtype(at::kShort))) {}
  uint16_t* data() { return reinterpret_cast<uint16_t*>(storage.data_ptr<int16_t>()); }
};

}  // namespace moe_kernels
