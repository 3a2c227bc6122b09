// Torch binding of the CUDA permutation index kernels (device code: permute.cuh). Built
// only where torch has CUDA (setup.py). Row movement on the GPU is the Triton kernels'.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>

#include <algorithm>

#include "../ops.h"
#include "../permute.h"
#include "permute.cuh"

namespace moe_kernels {
namespace {

Report check_ids_cuda(const at::Tensor& ids, int64_t num_experts, int64_t align,
                      const char* align_name) {
  MK_CHECK(check_topk_ids(ids, num_experts, align, align_name));
  MK_CHECK_VALUE(ids.is_cuda(), "topk_ids must be a CUDA tensor for the cuda backend");
  MK_CHECK_VALUE(num_experts <= permute_cuda::kMaxExperts, "the cuda backend takes num_experts <= ",
                 permute_cuda::kMaxExperts, ", got ", num_experts, "; use backend='triton'");
  return {};
}

struct Scratch {
  at::Tensor chunk_counts, rank, chunk_start, offsets, counts;
};

Scratch make_scratch(const at::Tensor& ids, int64_t num_experts) {
  const int64_t P = ids.numel();
  const int64_t n_chunks = permute_cuda::num_chunks(P);
  auto i32 = ids.options().dtype(at::kInt);
  auto i64 = ids.options().dtype(at::kLong);
  return {at::empty({n_chunks, num_experts}, i32), at::empty({std::max<int64_t>(P, 1)}, i32),
          at::empty({n_chunks, num_experts}, i64), at::empty({num_experts + 1}, i64),
          at::empty({num_experts}, i32)};
}

void run_index(const at::Tensor& ids, int64_t num_experts, int64_t align,
               permute_cuda::IndexBuffers& b, Scratch& s) {
  b.chunk_counts = s.chunk_counts.data_ptr<int32_t>();
  b.rank = s.rank.data_ptr<int32_t>();
  b.chunk_start = s.chunk_start.data_ptr<int64_t>();
  b.offsets = s.offsets.data_ptr<int64_t>();
  b.counts = s.counts.data_ptr<int32_t>();
  const cudaError_t err = permute_cuda::launch_index_any(
      ids.data_ptr(), ids.scalar_type() == at::kLong, ids.numel(),
      static_cast<int>(num_experts), align, b, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "permute index kernels failed: ", cudaGetErrorString(err));
}

}  // namespace

Report check_permute_index_cuda(const at::Tensor& topk_ids, int64_t num_experts, int64_t align) {
  return check_ids_cuda(topk_ids, num_experts, align, "align");
}

Report check_moe_align_block_size_cuda(const at::Tensor& topk_ids, int64_t num_experts,
                                       int64_t block_size) {
  return check_ids_cuda(topk_ids, num_experts, block_size, "block_size");
}

std::vector<at::Tensor> permute_index_cuda(const at::Tensor& topk_ids, int64_t num_experts,
                                           int64_t align) {
  throw_if(check_permute_index_cuda(topk_ids, num_experts, align));
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t T = ids.size(0), K = ids.size(1);
  const int64_t R = permuted_rows(T * K, num_experts, align);
  auto i32 = ids.options().dtype(at::kInt);
  Scratch s = make_scratch(ids, num_experts);
  at::Tensor m_indices = at::full({R}, -1, i32);
  at::Tensor row_of_pair = at::empty({T, K}, i32);
  at::Tensor pair_of_row = at::full({R}, -1, i32);
  permute_cuda::IndexBuffers b{};
  b.row_of_pair = row_of_pair.data_ptr<int32_t>();
  b.pair_of_row = pair_of_row.data_ptr<int32_t>();
  b.m_indices = m_indices.data_ptr<int32_t>();
  run_index(ids, num_experts, align, b, s);
  return {s.offsets, s.counts, m_indices, row_of_pair, pair_of_row};
}

std::vector<at::Tensor> moe_align_block_size_cuda(const at::Tensor& topk_ids,
                                                  int64_t num_experts, int64_t block_size) {
  throw_if(check_moe_align_block_size_cuda(topk_ids, num_experts, block_size));
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t P = ids.numel();
  const int64_t R = permuted_rows(P, num_experts, block_size);
  auto i32 = ids.options().dtype(at::kInt);
  Scratch s = make_scratch(ids, num_experts);
  at::Tensor sorted_ids = at::full({R}, P, i32);
  at::Tensor expert_ids = at::full({(R + block_size - 1) / block_size}, -1, i32);
  permute_cuda::IndexBuffers b{};
  b.sorted_ids = sorted_ids.data_ptr<int32_t>();
  b.block_expert = expert_ids.data_ptr<int32_t>();
  run_index(ids, num_experts, block_size, b, s);
  return {sorted_ids, expert_ids, s.offsets.slice(0, num_experts, num_experts + 1).to(at::kInt)};
}

}  // namespace moe_kernels
