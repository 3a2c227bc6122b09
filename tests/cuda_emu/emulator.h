// A CPU emulation of the part of the CUDA runtime and device language that the kernels of
// csrc/cuda/*.cuh use, so that their logic runs in `make test` on machines without a GPU,
// under AddressSanitizer + UndefinedBehaviorSanitizer (out-of-bounds global and shared
// memory, overflow) and ThreadSanitizer (races between threads of a block that a missing
// __syncthreads / __syncwarp leaves). tests/cuda_emulation.py rewrites the two constructs
// C++ has no spelling for (`k<<<grid, block, smem, stream>>>(args)` launches and
// `__shared__` declarations) into calls of this header, and builds tests/cuda_emu/driver.cpp.
//
// Each CUDA thread of a block runs on a worker std::thread; blocks run one after another.
// __syncthreads / __syncwarp are barriers: a thread that returns drops out of its block's
// and its warp's, as an exited thread stops counting for __syncthreads on sm_70+. Warp
// collectives exchange through per-warp slots between two barrier phases.
// What it checks beyond the results:
//   - launch configuration: 1..1024 threads, a non-empty grid, dynamic shared memory over
//     48 KB only after cudaFuncSetAttribute, at most 227 KB, static shared at most 48 KB;
//   - a full-mask warp collective whose warp has lost a lane (undefined on the GPU);
// each reported on stderr, and the driver exits with status 3. Shared memory starts as
// 0xA5 bytes in every block, as stale data would on the GPU.
// Lanes of a warp run independently, as under independent thread scheduling: code that
// relies on lockstep without __syncwarp shows up as a race. Not modelled: the memory model
// across blocks (they run in sequence), timing, nvcc's float contraction (FMA); a shuffle
// here orders memory like __syncwarp, which the GPU does not promise.
#pragma once

#include <math.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <semaphore>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
typedef struct CUstream_st* cudaStream_t;

namespace cuda_emu {

constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr size_t kMaxShared = 227 * 1024;  // sm_90 opt-in limit per block
constexpr size_t kMaxStaticShared = 48 * 1024;
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned char kPoison = 0xA5;

inline cudaError_t last_error = cudaSuccess;
inline std::map<const void*, size_t> dynamic_shared_limit;

// std::barrier's semantics (arrive_and_wait, arrive_and_drop) on a mutex and a condition
// variable: std::barrier spins before it sleeps, and 1024 spinning threads on two cores
// made a ThreadSanitizer run of grouped_topk's kernel 3x slower.
class Barrier {
 public:
  explicit Barrier(unsigned n) : expected_(n), left_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(m_);
    const uint64_t phase = phase_;
    if (--left_ == 0) return complete();
    cv_.wait(lock, [&] { return phase_ != phase; });
  }
  void arrive_and_drop() {
    std::unique_lock<std::mutex> lock(m_);
    --expected_;
    if (--left_ == 0) complete();
  }

 private:
  void complete() {
    ++phase_;
    left_ = expected_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  unsigned expected_, left_;
  uint64_t phase_ = 0;
};

struct Warp {
  explicit Warp(int lanes) : bar(lanes), full(lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u) {}
  Barrier bar;
  uint64_t slot[32] = {};
  std::atomic<uint32_t> exited{0};
  const uint32_t full;
};

struct Block {
  Block(dim3 idx_, unsigned threads, size_t dynamic_bytes)
      : idx(idx_), bar(threads), dynamic(dynamic_bytes, kPoison) {
    for (unsigned first = 0; first < threads; first += 32)
      warps.push_back(std::make_unique<Warp>(std::min<unsigned>(32, threads - first)));
  }
  dim3 idx;
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> dynamic;
  std::mutex lock;  // guards shared / static_bytes
  std::map<int, std::vector<unsigned char>> shared;
  size_t static_bytes = 0;
};

struct Thread {
  Block* block;
  Warp* warp;
  dim3 tid, bid, bdim, gdim;
  unsigned linear;
  int lane;
};

inline thread_local Thread* current = nullptr;
inline Thread& self() { return *current; }

inline void violation(const char* what) {
  const Thread& t = self();
  std::fprintf(stderr, "cuda_emu: %s (block %u,%u,%u thread %u,%u,%u)\n", what, t.bid.x,
               t.bid.y, t.bid.z, t.tid.x, t.tid.y, t.tid.z);
  std::fflush(stderr);
  std::_Exit(3);
}

// `__shared__ T name[N];` becomes `auto& name = shared<T[N]>(__LINE__);`: one array per
// declaration per block.
template <class Array>
Array& shared(int site) {
  Block& b = *self().block;
  std::lock_guard<std::mutex> guard(b.lock);
  auto [it, fresh] = b.shared.try_emplace(site);
  if (fresh) {
    it->second.assign(sizeof(Array), kPoison);
    b.static_bytes += sizeof(Array);
    if (b.static_bytes > kMaxStaticShared) violation("static shared memory over 48 KB");
  }
  return *reinterpret_cast<Array*>(it->second.data());
}

// `extern __shared__ T name[];` becomes `T* name = dynamic_shared<T>();`.
template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(self().block->dynamic.data());
}

inline void check_full_warp(uint32_t mask) {
  const Thread& t = self();
  if (mask != t.warp->full) violation("a warp collective with a partial mask (not emulated)");
}

// Every lane of the warp writes its value, then reads lane `src`'s.
template <class T>
T exchange(uint32_t mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "warp exchange of at most 8 bytes");
  check_full_warp(mask);
  Thread& t = self();
  std::memcpy(&t.warp->slot[t.lane], &v, sizeof(T));
  t.warp->bar.arrive_and_wait();
  if (t.warp->exited.load() & mask) violation("a full-mask warp collective after a lane exited");
  T out;
  std::memcpy(&out, &t.warp->slot[src & 31], sizeof(T));
  t.warp->bar.arrive_and_wait();
  return out;
}

// Every lane writes its value, then each folds all lanes' values in lane order.
template <class T, class Fold>
T reduce(uint32_t mask, T v, Fold fold) {
  check_full_warp(mask);
  Thread& t = self();
  t.warp->slot[t.lane] = static_cast<uint64_t>(v);
  t.warp->bar.arrive_and_wait();
  if (t.warp->exited.load() & mask) violation("a full-mask warp collective after a lane exited");
  T out = static_cast<T>(t.warp->slot[0]);
  for (int l = 1; l < 32; ++l)
    if ((t.warp->full >> l) & 1u) out = fold(out, static_cast<T>(t.warp->slot[l]));
  t.warp->bar.arrive_and_wait();
  return out;
}

template <class T>
uint32_t match_any(uint32_t mask, T v) {
  check_full_warp(mask);
  Thread& t = self();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  t.warp->slot[t.lane] = bits;
  t.warp->bar.arrive_and_wait();
  if (t.warp->exited.load() & mask) violation("a full-mask warp collective after a lane exited");
  uint32_t same = 0;
  for (int l = 0; l < 32; ++l)
    if (((t.warp->full >> l) & 1u) && t.warp->slot[l] == bits) same |= 1u << l;
  t.warp->bar.arrive_and_wait();
  return same;
}

// The threads of a block: workers made once per process (ThreadSanitizer makes a thread
// in about 1.3 ms, so a thread per CUDA thread per block cost seconds a launch) and reused
// by every block. Worker i runs CUDA thread i; each has its own semaphore, so a block of
// n threads wakes n workers.
class Pool {
 public:
  void run(unsigned n, const std::function<void(unsigned)>& task) {
    while (workers_.size() < n) add_worker();
    task_ = &task;
    left_.store(n);
    for (unsigned i = 0; i < n; ++i) workers_[i]->go.release();
    done_.acquire();
  }
  ~Pool() {
    stop_ = true;
    for (auto& w : workers_) w->go.release();
    for (auto& w : workers_) w->thread.join();
  }

 private:
  struct Worker {
    std::binary_semaphore go{0};
    std::thread thread;
  };
  void add_worker() {
    const unsigned i = static_cast<unsigned>(workers_.size());
    auto w = std::make_unique<Worker>();
    Worker* raw = w.get();
    workers_.push_back(std::move(w));
    raw->thread = std::thread([this, raw, i] {
      for (;;) {
        raw->go.acquire();
        if (stop_) return;
        (*task_)(i);
        if (left_.fetch_sub(1) == 1) done_.release();
      }
    });
  }
  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(unsigned)>* task_ = nullptr;
  std::atomic<unsigned> left_{0};
  std::binary_semaphore done_{0};
  bool stop_ = false;
};

inline Pool& pool() {
  static Pool p;
  return p;
}

inline void run_block(Block& block, dim3 grid, dim3 bdim, const std::function<void()>& body) {
  const unsigned n = bdim.x * bdim.y * bdim.z;
  pool().run(n, [&](unsigned i) {
    Thread t{&block, block.warps[i / 32].get(),
             dim3(i % bdim.x, (i / bdim.x) % bdim.y, i / (bdim.x * bdim.y)), block.idx, bdim,
             grid, i, static_cast<int>(i % 32)};
    current = &t;
    body();
    t.warp->exited.fetch_or(1u << t.lane);
    t.warp->bar.arrive_and_drop();
    block.bar.arrive_and_drop();
    current = nullptr;
  });
}

inline cudaError_t launch_grid(const void* kernel, dim3 grid, dim3 bdim, size_t smem,
                               const std::function<void()>& body) {
  const uint64_t threads = uint64_t(bdim.x) * bdim.y * bdim.z;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  if (threads == 0 || threads > kMaxThreads || blocks == 0 || grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  auto limit = dynamic_shared_limit.find(kernel);
  const size_t allowed =
      limit == dynamic_shared_limit.end() ? kDefaultDynamicShared : limit->second;
  if (smem > allowed) return cudaErrorInvalidValue;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block block(dim3(x, y, z), static_cast<unsigned>(threads), smem);
        run_block(block, grid, bdim, body);
        if (block.static_bytes + smem > kMaxShared) {
          std::fprintf(stderr, "cuda_emu: %zu bytes of shared memory per block, over %zu\n",
                       block.static_bytes + smem, kMaxShared);
          std::_Exit(3);
        }
      }
  return cudaSuccess;
}

// `kernel<<<grid, block, smem, stream>>>(args...)` becomes
// `launch(kernel, grid, block, smem, stream)(args...)`.
template <class... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;
  template <class... Args>
  void operator()(Args&&... args) const {
    auto k = kernel;
    const std::function<void()> body = [&] { k(args...); };
    const cudaError_t err = launch_grid(reinterpret_cast<const void*>(k), grid, block, smem, body);
    if (err != cudaSuccess) last_error = err;
  }
};

template <class... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem = 0,
                         cudaStream_t = nullptr) {
  return Launch<Params...>{kernel, grid, block, smem};
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::self().tid)
#define blockIdx (::cuda_emu::self().bid)
#define blockDim (::cuda_emu::self().bdim)
#define gridDim (::cuda_emu::self().gdim)

inline void __syncthreads() { ::cuda_emu::self().block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::cuda_emu::check_full_warp(mask);
  ::cuda_emu::self().warp->bar.arrive_and_wait();
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src) { return ::cuda_emu::exchange(mask, v, src); }
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return ::cuda_emu::exchange(mask, v, ::cuda_emu::self().lane ^ lane_mask);
}
template <class T>
unsigned __match_any_sync(unsigned mask, T v) { return ::cuda_emu::match_any(mask, v); }
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
  return ::cuda_emu::reduce(mask, v, [](unsigned a, unsigned b) { return a > b ? a : b; });
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
  return ::cuda_emu::reduce(mask, v, [](unsigned a, unsigned b) { return a < b ? a : b; });
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <class T>
T __ldg(const T* p) { return *p; }

inline cudaError_t cudaGetLastError() {
  const cudaError_t err = ::cuda_emu::last_error;
  ::cuda_emu::last_error = cudaSuccess;
  return err;
}
inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
template <class... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > ::cuda_emu::kMaxShared)
    return cudaErrorInvalidValue;
  ::cuda_emu::dynamic_shared_limit[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

// 16-bit floats: storage and the conversions the kernels use.
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float __half2float(__half v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, sizeof(h));
  return static_cast<float>(h);
}
