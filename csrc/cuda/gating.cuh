// grouped_topk device code: one warp per token row. Framework-free (CUDA headers only), so
// `make check-cuda` compiles it with nvcc for sm_90a on machines whose torch lacks CUDA.
//
// Lane l holds the VPT consecutive experts e = l * VPT + i (i < VPT): DeepSeek-V3's row of
// 256 bf16 logits is one 16-byte load per lane. Each of the top_k choices is two warp
// reductions of 32-bit values, in hardware on sm_80+ (REDUX): the largest order image of a
// selection score (csrc/common/order_key.h `order_bits`), then the lowest expert index
// holding it. So ties resolve exactly as in moe_kernels/reference/gating.py, and a choice
// costs two instructions where a butterfly of int64 keys takes 5 dependent steps of two
// shuffles each (sm_90a SASS: 50 instructions a choice against 110; docs/gating.md).
//
// Groups: where a group is a power-of-two number of whole lanes (DeepSeek-V3: 32 experts =
// 4 lanes of 8), its top-two sum takes log2(lanes) shuffle steps and a group is kept when
// fewer than topk_group groups beat it (one shuffle per group, no dependent rounds). Other
// group sizes (E=72 with G=8, E=160, groups of one expert, ...) go through shared memory.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/limits.h"
#include "../common/order_key.h"

namespace moe_kernels {
namespace gating_cuda {

enum class DType { kFloat32, kBFloat16, kFloat16 };

struct Params {
  const void* logits;   // (T, E), row stride `stride` elements, last dim contiguous
  const float* bias;    // (E,) float32 or nullptr
  float* weights;       // (T, width): width = top_k, or top_k + 1 with a shared expert
  int32_t* ids;         // (T, width)
  int64_t num_tokens, stride;
  int num_experts, num_groups, group_size, topk_group, top_k;
  int shared_id;        // -1: none; else column top_k holds this id with weight 1
  bool softmax, group_top2, select_groups, renormalize;
  float scale;
  int group_lane_bits;  // set by launch_vpt: log2 of a group's lanes; -1: shared memory
};

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxExperts = kGatingCudaMaxExperts;  // VPT <= 32
constexpr unsigned kFullWarp = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullWarp, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullWarp, v, o);
  return v;
}
__device__ __forceinline__ int64_t warp_max(int64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const int64_t other = __shfl_xor_sync(kFullWarp, v, o);
    v = other > v ? other : v;
  }
  return v;
}
// The warp's max (kMax) or min of v: one REDUX instruction on sm_80+, else a butterfly.
template <bool kMax>
__device__ __forceinline__ unsigned warp_extreme(unsigned v) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  return kMax ? __reduce_max_sync(kFullWarp, v) : __reduce_min_sync(kFullWarp, v);
#else
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned other = __shfl_xor_sync(kFullWarp, v, o);
    v = kMax ? max(v, other) : min(v, other);
  }
  return v;
#endif
}

// x[i] = row[base + i] as float (-inf past E). 16-byte loads where the lane's run is whole
// and aligned; else one element a load.
template <int VPT, typename scalar_t>
__device__ __forceinline__ void load_run(const scalar_t* row, int base, int E, float (&x)[VPT]) {
  constexpr int kPerChunk = 16 / sizeof(scalar_t);
  struct alignas(16) Chunk { scalar_t v[kPerChunk]; };
  const scalar_t* run = row + base;
  if constexpr (VPT % kPerChunk == 0) {
    if (base + VPT <= E && reinterpret_cast<uintptr_t>(run) % 16 == 0) {
#pragma unroll
      for (int c = 0; c < VPT / kPerChunk; ++c) {
        const Chunk chunk = reinterpret_cast<const Chunk*>(run)[c];
#pragma unroll
        for (int j = 0; j < kPerChunk; ++j) x[c * kPerChunk + j] = to_float(chunk.v[j]);
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < VPT; ++i) x[i] = base + i < E ? to_float(run[i]) : -__builtin_inff();
}

// dst[base + i] = x[i] for base + i < E; 16-byte stores where the run is whole (dst is
// 16-byte aligned).
template <int VPT>
__device__ __forceinline__ void store_run(float* dst, int base, int E, const float (&x)[VPT]) {
  struct alignas(16) Chunk { float v[4]; };
  if constexpr (VPT % 4 == 0) {
    if (base + VPT <= E) {
#pragma unroll
      for (int c = 0; c < VPT / 4; ++c) {
        Chunk chunk;
#pragma unroll
        for (int j = 0; j < 4; ++j) chunk.v[j] = x[c * 4 + j];
        reinterpret_cast<Chunk*>(dst + base)[c] = chunk;
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < VPT; ++i)
    if (base + i < E) dst[base + i] = x[i];
}

__host__ __device__ inline size_t pad16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// Per-warp shared memory, each part 16-byte aligned: the chosen ids[top_k] (int32), the
// scores s[E] (float); on the shared-memory group path also the selection scores b[E]
// (float) and the group keys[G] (int64).
struct WarpSmem {
  int32_t* chosen_id;
  float* scores;
  float* sb;
  int64_t* gkeys;
};

__host__ __device__ inline size_t warp_smem_bytes(int E, int G, int top_k, bool group_smem) {
  const size_t common = pad16(static_cast<size_t>(top_k) * 4) + pad16(static_cast<size_t>(E) * 4);
  if (!group_smem) return common;
  return common + pad16(static_cast<size_t>(E) * 4) + pad16(static_cast<size_t>(G) * 8);
}

__device__ __forceinline__ WarpSmem warp_smem(unsigned char* mine, int E, int top_k) {
  WarpSmem w;
  w.chosen_id = reinterpret_cast<int32_t*>(mine);
  mine += pad16(static_cast<size_t>(top_k) * 4);
  w.scores = reinterpret_cast<float*>(mine);
  mine += pad16(static_cast<size_t>(E) * 4);
  w.sb = reinterpret_cast<float*>(mine);  // the group path's parts, where it has them
  mine += pad16(static_cast<size_t>(E) * 4);
  w.gkeys = reinterpret_cast<int64_t*>(mine);
  return w;
}

// log2 of a group's lanes where groups are a power-of-two number of whole lanes (groups
// then sit on aligned lane blocks, the shape xor shuffles reduce), else -1: the
// shared-memory path.
__host__ __device__ inline int group_lane_bits(int vpt, int group_size) {
  if (group_size % vpt != 0) return -1;
  for (int bits = 0; bits <= 5; ++bits)
    if (group_size / vpt == 1 << bits) return bits;
  return -1;
}

// Group keep flags by shuffles: this lane's group is kept when fewer than topk_group groups
// beat its score (larger, or equal with a lower index): the reference's selection of the
// topk_group best groups, all at once.
template <int VPT>
__device__ __forceinline__ bool group_kept_by_shuffles(const float (&b)[VPT], const Params& p,
                                                       int lane) {
  const int lanes = 1 << p.group_lane_bits;
  float first = -__builtin_inff(), second = -__builtin_inff();
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const float low = fminf(b[i], first);
    second = fmaxf(second, low);
    first = fmaxf(first, b[i]);
  }
  for (int o = 1; o < lanes; o <<= 1) {
    const float f = __shfl_xor_sync(kFullWarp, first, o);
    const float s = __shfl_xor_sync(kFullWarp, second, o);
    second = fmaxf(fmaxf(second, s), fminf(first, f));
    first = fmaxf(first, f);
  }
  const float score = nan_to_neg_inf(p.group_top2 ? first + second : first);
  const int g = lane >> p.group_lane_bits;
  int better = 0;
  for (int j = 0; j < p.num_groups; ++j) {
    const float other = __shfl_sync(kFullWarp, score, j * lanes);
    better += other > score || (other == score && j < g);
  }
  return g < p.num_groups && better < p.topk_group;
}

// Group keep flags through shared memory (any group size): group scores by the lanes
// g < G, then topk_group rounds of a warp max over int64 group keys. On return, gkeys[g]
// is kKept for the kept groups.
constexpr int64_t kKept = kExcludedKey + 1;  // real keys exceed kExcludedKey by over 2^54

template <int VPT>
__device__ __forceinline__ void keep_groups_in_smem(const float (&b)[VPT], const Params& p,
                                                    int base, int lane, float* sb,
                                                    int64_t* gkeys) {
  store_run<VPT>(sb, base, p.num_experts, b);
  __syncwarp();
  for (int g = lane; g < p.num_groups; g += 32)
    gkeys[g] = order_key(group_score(sb + g * p.group_size, p.group_size, p.group_top2), g);
  __syncwarp();
  for (int r = 0; r < p.topk_group; ++r) {
    int64_t best = kExcludedKey;
    for (int g = lane; g < p.num_groups; g += 32)
      if (gkeys[g] != kKept && gkeys[g] > best) best = gkeys[g];
    best = warp_max(best);
    const int g = index_of_key(best);
    __syncwarp();
    if (lane == 0) gkeys[g] = kKept;
    __syncwarp();
  }
}

template <typename scalar_t, int VPT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    grouped_topk_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.num_tokens) return;  // only __syncwarp below: a whole warp leaves together
  const int E = p.num_experts, base = lane * VPT;
  const bool group_smem = p.select_groups && p.group_lane_bits < 0;
  const WarpSmem sm = warp_smem(
      smem_raw + warp * warp_smem_bytes(E, p.num_groups, p.top_k, group_smem), E, p.top_k);

  float s[VPT];
  load_run<VPT>(static_cast<const scalar_t*>(p.logits) + t * p.stride, base, E, s);
#pragma unroll
  for (int i = 0; i < VPT; ++i) s[i] = nan_to_neg_inf(s[i]);
  if (p.softmax) {
    float m = -__builtin_inff();
#pragma unroll
    for (int i = 0; i < VPT; ++i) m = fmaxf(m, s[i]);
    m = warp_max(m);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      s[i] = base + i < E ? expf(s[i] == m ? 0.0f : s[i] - m) : 0.0f;  // limit rule
      sum += s[i];
    }
    const float inv = 1.0f / warp_sum(sum);
#pragma unroll
    for (int i = 0; i < VPT; ++i) s[i] *= inv;
  } else {
#pragma unroll
    for (int i = 0; i < VPT; ++i) s[i] = 1.0f / (1.0f + expf(-s[i]));
  }
  store_run<VPT>(sm.scores, base, E, s);  // read back by expert id for the weights

  float b[VPT];  // selection scores
  if (p.bias) {
    load_run<VPT>(p.bias, base, E, b);
#pragma unroll
    for (int i = 0; i < VPT; ++i) b[i] = nan_to_neg_inf(s[i] + b[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VPT; ++i) b[i] = s[i];
  }
  bool lane_kept = true;  // on the shuffle group path, this lane's group is kept
  if (p.select_groups && !group_smem) lane_kept = group_kept_by_shuffles<VPT>(b, p, lane);
  unsigned u[VPT];  // order images of the candidates; 0: not a candidate
#pragma unroll
  for (int i = 0; i < VPT; ++i) u[i] = lane_kept && base + i < E ? order_bits(b[i]) : 0u;
  if (group_smem) {
    keep_groups_in_smem<VPT>(b, p, base, lane, sm.sb, sm.gkeys);
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if (base + i < E && sm.gkeys[(base + i) / p.group_size] != kKept) u[i] = 0u;
  }

  // Each choice: the lane's best candidate (the lowest position among equals), the warp's
  // largest image, the lowest index holding it; its lane records it and drops it.
  for (int k = 0; k < p.top_k; ++k) {
    unsigned best = 0u;
    int pos = 0;
#pragma unroll
    for (int i = VPT - 1; i >= 0; --i) {
      if (u[i] >= best) {
        best = u[i];
        pos = i;
      }
    }
    const unsigned top = warp_extreme<true>(best);
    const unsigned id = warp_extreme<false>(best == top ? static_cast<unsigned>(base + pos) : ~0u);
    if (static_cast<unsigned>(base + pos) == id) {
      sm.chosen_id[k] = static_cast<int32_t>(id);
#pragma unroll
      for (int i = 0; i < VPT; ++i)
        if (i == pos) u[i] = 0u;
    }
  }
  __syncwarp();
  float chosen_sum = 0.0f;
  for (int k = lane; k < p.top_k; k += 32) chosen_sum += sm.scores[sm.chosen_id[k]];
  const float sum = warp_sum(chosen_sum);
  const float mul = p.renormalize ? (sum > 0.0f ? p.scale / sum : 0.0f) : p.scale;
  const int64_t width = p.top_k + (p.shared_id >= 0 ? 1 : 0);
  float* w_out = p.weights + t * width;
  int32_t* id_out = p.ids + t * width;
  for (int k = lane; k < p.top_k; k += 32) {
    const int32_t id = sm.chosen_id[k];
    w_out[k] = sm.scores[id] * mul;
    id_out[k] = id;
  }
  if (p.shared_id >= 0 && lane == 0) {
    w_out[p.top_k] = 1.0f;
    id_out[p.top_k] = p.shared_id;
  }
}

template <typename scalar_t>
inline cudaError_t launch_vpt(const Params& p, cudaStream_t stream) {
  const int vpt_needed = (p.num_experts + 31) / 32;
  const int blocks = static_cast<int>((p.num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock);
  auto run = [&](auto kernel, int vpt) -> cudaError_t {
    Params q = p;
    q.group_lane_bits = group_lane_bits(vpt, p.group_size);
    const size_t smem = kWarpsPerBlock * warp_smem_bytes(p.num_experts, p.num_groups, p.top_k,
                                                         p.select_groups && q.group_lane_bits < 0);
    if (smem > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    kernel<<<blocks, kWarpsPerBlock * 32, smem, stream>>>(q);
    return cudaGetLastError();
  };
  if (vpt_needed <= 1) return run(grouped_topk_kernel<scalar_t, 1>, 1);
  if (vpt_needed <= 2) return run(grouped_topk_kernel<scalar_t, 2>, 2);
  if (vpt_needed <= 4) return run(grouped_topk_kernel<scalar_t, 4>, 4);
  if (vpt_needed <= 8) return run(grouped_topk_kernel<scalar_t, 8>, 8);
  if (vpt_needed <= 16) return run(grouped_topk_kernel<scalar_t, 16>, 16);
  return run(grouped_topk_kernel<scalar_t, 32>, 32);
}

// Host entry: the caller has checked the arguments (E <= kMaxExperts, T > 0).
inline cudaError_t launch_grouped_topk(const Params& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_vpt<float>(p, stream);
    case DType::kBFloat16: return launch_vpt<__nv_bfloat16>(p, stream);
    default: return launch_vpt<__half>(p, stream);
  }
}

}  // namespace gating_cuda
}  // namespace moe_kernels
