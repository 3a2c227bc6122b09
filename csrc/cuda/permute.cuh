// Token permutation index computation on the GPU (moe_align_block_size and the index of
// permute). Framework-free (CUDA headers only): `make check-cuda` compiles it for sm_90a.
// Semantics: moe_kernels/reference/permute.py. Ranks inside an expert follow the pair
// order without atomics, so results are deterministic:
//   1. chunk_count: a block of kChunk pairs counts its pairs per expert and gives each pair
//      its rank among the chunk's earlier pairs of the same expert (__match_any_sync in a
//      warp, a per-warp count table across warps);
//   2. scan: one block turns chunk counts into each chunk's start inside each expert, the
//      expert counts, the padded offsets and (for the vLLM layout) the block experts;
//   3. scatter: row = offset[e] + chunk start + rank, written into the outputs.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/limits.h"

namespace moe_kernels {
namespace permute_cuda {

constexpr int kChunk = 256;            // pairs per block in kernels 1 and 3
constexpr int kWarps = kChunk / 32;
constexpr int kMaxExperts = kPermuteCudaMaxExperts;  // kWarps x E counts in shared memory
constexpr int kScanThreads = 1024;

template <typename id_t>
__device__ __forceinline__ int expert_of(const id_t* ids, int64_t p, int64_t P, int E) {
  if (p >= P) return -1;
  const int64_t e = static_cast<int64_t>(ids[p]);
  return (e >= 0 && e < E) ? static_cast<int>(e) : -1;
}

template <typename id_t>
__global__ void __launch_bounds__(kChunk)
    chunk_count_kernel(const id_t* ids, int64_t P, int E, int32_t* chunk_counts,
                       int32_t* rank) {
  __shared__ int32_t warp_counts[kWarps * kMaxExperts];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t c = blockIdx.x;
  for (int i = tid; i < kWarps * E; i += kChunk) warp_counts[i] = 0;
  __syncthreads();
  const int64_t p = c * kChunk + tid;
  const int e = expert_of(ids, p, P, E);
  const unsigned same = __match_any_sync(0xffffffffu, e);   // lanes with this expert
  const unsigned lower = same & ((1u << lane) - 1u);
  if (e >= 0 && lower == 0) warp_counts[warp * E + e] = __popc(same);  // group leader
  __syncthreads();
  if (e >= 0) {
    int before = 0;
    for (int w = 0; w < warp; ++w) before += warp_counts[w * E + e];
    rank[p] = before + __popc(lower);
  }
  for (int x = tid; x < E; x += kChunk) {
    int total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_counts[w * E + x];
    chunk_counts[c * E + x] = total;
  }
}

// One block. chunk_start[c][e] = pairs of expert e in chunks before c; offsets[e+1] =
// offsets[e] + round_up(count[e], align); block_expert (when given) gets e for the
// blocks of `align` rows of expert e (the caller fills it with -1 first).
__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(const int32_t* chunk_counts, int64_t n_chunks, int E, int64_t align,
                int64_t* chunk_start, int64_t* offsets, int32_t* counts,
                int32_t* block_expert) {
  __shared__ int64_t padded[kMaxExperts];
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int64_t running = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {   // threads read consecutive e: coalesced
      chunk_start[c * E + e] = running;
      running += chunk_counts[c * E + e];
    }
    counts[e] = static_cast<int32_t>(running);
    padded[e] = (running + align - 1) / align * align;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // E <= 1024 additions: cheaper than a parallel scan's launches
    int64_t acc = 0;
    offsets[0] = 0;
    for (int e = 0; e < E; ++e) {
      acc += padded[e];
      offsets[e + 1] = acc;
      padded[e] = acc - padded[e];  // now the exclusive offset of e
    }
  }
  __syncthreads();
  if (block_expert != nullptr) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
      const int64_t first = padded[e] / align;
      const int64_t last = (padded[e] + (counts[e] + align - 1) / align * align) / align;
      for (int64_t b = first; b < last; ++b) block_expert[b] = e;
    }
  }
}

// Writes the rows. Permute layout: row_of_pair, pair_of_row, m_indices (the last two
// pre-filled with -1). vLLM layout: sorted_ids (pre-filled with P), row_of_pair unused.
template <typename id_t>
__global__ void __launch_bounds__(kChunk)
    scatter_kernel(const id_t* ids, int64_t P, int E, const int32_t* rank,
                   const int64_t* offsets, const int64_t* chunk_start, int32_t* row_of_pair,
                   int32_t* pair_of_row, int32_t* m_indices, int32_t* sorted_ids) {
  const int64_t c = blockIdx.x;
  const int64_t p = c * kChunk + threadIdx.x;
  if (p >= P) return;
  const int e = expert_of(ids, p, P, E);
  if (e < 0) {
    if (row_of_pair != nullptr) row_of_pair[p] = -1;
    return;
  }
  const int64_t row = offsets[e] + chunk_start[c * E + e] + rank[p];
  if (row_of_pair != nullptr) row_of_pair[p] = static_cast<int32_t>(row);
  if (pair_of_row != nullptr) pair_of_row[row] = static_cast<int32_t>(p);
  if (m_indices != nullptr) m_indices[row] = e;
  if (sorted_ids != nullptr) sorted_ids[row] = static_cast<int32_t>(p);
}

struct IndexBuffers {
  // scratch: chunk_counts [n_chunks * E] int32, rank [P] int32, chunk_start [n_chunks * E]
  // int64; outputs as in scatter_kernel / scan_kernel (nullptr when not wanted)
  int32_t* chunk_counts;
  int32_t* rank;
  int64_t* chunk_start;
  int64_t* offsets;
  int32_t* counts;
  int32_t* row_of_pair;
  int32_t* pair_of_row;
  int32_t* m_indices;
  int32_t* sorted_ids;
  int32_t* block_expert;
};

inline int64_t num_chunks(int64_t P) { return P > 0 ? (P + kChunk - 1) / kChunk : 1; }

// Host entry: the caller has checked E <= kMaxExperts, align >= 1 and filled the outputs
// that need a fill value. P may be 0 (kernels 1 and 3 are skipped; the scan still writes
// zero counts and offsets from a zeroed chunk_counts row).
template <typename id_t>
inline cudaError_t launch_index(const id_t* ids, int64_t P, int E, int64_t align,
                                const IndexBuffers& b, cudaStream_t stream) {
  const int64_t n_chunks = num_chunks(P);
  if (P > 0) {
    chunk_count_kernel<id_t><<<static_cast<unsigned>(n_chunks), kChunk, 0, stream>>>(
        ids, P, E, b.chunk_counts, b.rank);
  } else {
    const cudaError_t err = cudaMemsetAsync(b.chunk_counts, 0, sizeof(int32_t) * E, stream);
    if (err != cudaSuccess) return err;
  }
  scan_kernel<<<1, kScanThreads, 0, stream>>>(b.chunk_counts, n_chunks, E, align,
                                              b.chunk_start, b.offsets, b.counts,
                                              b.block_expert);
  if (P > 0) {
    scatter_kernel<id_t><<<static_cast<unsigned>(n_chunks), kChunk, 0, stream>>>(
        ids, P, E, b.rank, b.offsets, b.chunk_start, b.row_of_pair, b.pair_of_row,
        b.m_indices, b.sorted_ids);
  }
  return cudaGetLastError();
}

inline cudaError_t launch_index_any(const void* ids, bool ids_int64, int64_t P, int E,
                                    int64_t align, const IndexBuffers& b,
                                    cudaStream_t stream) {
  return ids_int64 ? launch_index(static_cast<const int64_t*>(ids), P, E, align, b, stream)
                   : launch_index(static_cast<const int32_t*>(ids), P, E, align, b, stream);
}

}  // namespace permute_cuda
}  // namespace moe_kernels
