// Bounds of the CUDA kernels, in one place: the device code sizes its shared memory by them,
// and moe_kernels._C.limits() gives them to Python, which checks arguments against them.
#pragma once

namespace moe_kernels {

// grouped_topk_cuda: one warp per token, 32 lanes x up to 32 experts per lane.
constexpr int kGatingCudaMaxExperts = 32 * 32;
// permute_index_cuda / moe_align_block_size_cuda: each block keeps kWarps x E counts in
// shared memory.
constexpr int kPermuteCudaMaxExperts = 1024;

}  // namespace moe_kernels
