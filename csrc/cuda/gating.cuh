// grouped_topk device code: one warp per token row. Framework-free (CUDA headers only), so
// `make check-cuda` compiles it with nvcc for sm_90a on machines whose torch lacks CUDA.
//
// Lane l holds experts e = i * 32 + l (i < VPT): every load instruction of the warp reads
// consecutive addresses. Selection is a warp max over int64 order keys (value, then lower
// index; csrc/common/order_key.h), so each choice is one butterfly and ties resolve exactly
// as in moe_kernels/reference/gating.py. Group scores go through shared memory, which
// handles any group size (E=72 with G=8, E=160, ...).
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
};

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxExperts = kGatingCudaMaxExperts;  // VPT <= 32

__device__ __forceinline__ float load_float(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) {
  return __bfloat162float(__ldg(p));
}
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(__ldg(p)); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ int64_t warp_max(int64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const int64_t other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// Per-warp shared memory: selection scores b[E] (float), group keys[G] (int64), the chosen
// scores[top_k] (float) and ids[top_k] (int32).
__host__ __device__ inline size_t warp_smem_bytes(int E, int G, int top_k) {
  size_t floats = (static_cast<size_t>(E) * 4 + 7) / 8 * 8;
  return floats + static_cast<size_t>(G) * 8 + static_cast<size_t>(top_k) * 8;
}

template <typename scalar_t, int VPT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    grouped_topk_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.num_tokens) return;  // only __syncwarp below: a whole warp leaves together
  const int E = p.num_experts;
  unsigned char* mine = smem_raw + warp * warp_smem_bytes(E, p.num_groups, p.top_k);
  float* sb = reinterpret_cast<float*>(mine);
  int64_t* gkeys = reinterpret_cast<int64_t*>(mine + (static_cast<size_t>(E) * 4 + 7) / 8 * 8);
  float* chosen_s = reinterpret_cast<float*>(gkeys + p.num_groups);
  int32_t* chosen_id = reinterpret_cast<int32_t*>(chosen_s + p.top_k);

  const scalar_t* row = static_cast<const scalar_t*>(p.logits) + t * p.stride;
  float s[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = i * 32 + lane;
    s[i] = e < E ? nan_to_neg_inf(load_float(row + e)) : -__builtin_inff();
  }
  if (p.softmax) {
    float m = -__builtin_inff();
#pragma unroll
    for (int i = 0; i < VPT; ++i) m = fmaxf(m, s[i]);
    m = warp_max(m);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = i * 32 + lane;
      s[i] = e < E ? expf(s[i] == m ? 0.0f : s[i] - m) : 0.0f;  // limit rule
      sum += s[i];
    }
    const float inv = 1.0f / warp_sum(sum);
#pragma unroll
    for (int i = 0; i < VPT; ++i) s[i] *= inv;
  } else {
#pragma unroll
    for (int i = 0; i < VPT; ++i) s[i] = 1.0f / (1.0f + expf(-s[i]));
  }

  int64_t key[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = i * 32 + lane;
    const float b = e < E ? nan_to_neg_inf(p.bias ? s[i] + __ldg(p.bias + e) : s[i]) : 0.0f;
    key[i] = e < E ? order_key(b, e) : kExcludedKey;
    if (p.select_groups && e < E) sb[e] = b;
  }

  if (p.select_groups) {
    constexpr int64_t kKept = kExcludedKey + 1;
    __syncwarp();
    for (int g = lane; g < p.num_groups; g += 32)
      gkeys[g] = order_key(group_score(sb + g * p.group_size, p.group_size, p.group_top2), g);
    __syncwarp();
    // The topk_group best groups: their keys become kKept, a value no real key takes
    // (real keys exceed kExcludedKey by more than 2^54).
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
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = i * 32 + lane;
      if (e < E && gkeys[e / p.group_size] != kKept) key[i] = kExcludedKey;
    }
  }

  float sum = 0.0f;
  for (int k = 0; k < p.top_k; ++k) {
    int64_t local = kExcludedKey;
#pragma unroll
    for (int i = 0; i < VPT; ++i) local = key[i] > local ? key[i] : local;
    const int64_t best = warp_max(local);
    float mine_s = 0.0f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (key[i] == best) {
        mine_s = s[i];
        key[i] = kExcludedKey;
      }
    }
    const int id = index_of_key(best);
    const float cs = __shfl_sync(0xffffffffu, mine_s, id & 31);  // owner lane = e % 32
    sum += cs;
    if (lane == 0) {
      chosen_s[k] = cs;
      chosen_id[k] = id;
    }
  }
  __syncwarp();
  const float mul = p.renormalize ? (sum > 0.0f ? p.scale / sum : 0.0f) : p.scale;
  const int64_t width = p.top_k + (p.shared_id >= 0 ? 1 : 0);
  float* w_out = p.weights + t * width;
  int32_t* id_out = p.ids + t * width;
  for (int k = lane; k < p.top_k; k += 32) {
    w_out[k] = chosen_s[k] * mul;
    id_out[k] = chosen_id[k];
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
  const size_t smem = kWarpsPerBlock * warp_smem_bytes(p.num_experts, p.num_groups, p.top_k);
  auto run = [&](auto kernel) -> cudaError_t {
    if (smem > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    kernel<<<blocks, kWarpsPerBlock * 32, smem, stream>>>(p);
    return cudaGetLastError();
  };
  if (vpt_needed <= 1) return run(grouped_topk_kernel<scalar_t, 1>);
  if (vpt_needed <= 2) return run(grouped_topk_kernel<scalar_t, 2>);
  if (vpt_needed <= 4) return run(grouped_topk_kernel<scalar_t, 4>);
  if (vpt_needed <= 8) return run(grouped_topk_kernel<scalar_t, 8>);
  if (vpt_needed <= 16) return run(grouped_topk_kernel<scalar_t, 16>);
  return run(grouped_topk_kernel<scalar_t, 32>);
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
