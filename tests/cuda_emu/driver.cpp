// Runs the CUDA kernels of csrc/cuda/*.cuh under tests/cuda_emu/emulator.h: requests on
// stdin, one after another until EOF, each answered on stdout (tests/cuda_emulation.py
// writes and reads both). It allocates and fills buffers as the torch bindings (csrc/cuda/*.cu) do,
// each at its exact size so AddressSanitizer sees any access past it; buffers the bindings
// leave uninitialised hold 0xA5 bytes.
//
// Request: int64 op, then per op
//   1 permute index: P E align ids_int64 vllm_layout R, then P ids (int32 or int64)
//     -> error, then (permute) offsets[E+1] i64, counts[E] i32, m_indices[R] i32,
//        row_of_pair[P] i32, pair_of_row[R] i32
//     -> error, then (vllm) sorted_ids[R] i32, expert_ids[ceil(R/align)] i32, offsets[E+1] i64
//   2 grouped_topk: T E stride dtype G topk_group top_k softmax group_top2 select_groups
//     renormalize has_bias scale_bits shared_id, then (T-1)*stride+E logits (T>0), E float32
//     bias -> error, then weights[T*W] f32, ids[T*W] i32 (W = top_k, + 1 with shared_id >= 0)
// error: int64 cudaError_t of the launch. A violation the emulator sees ends the process
// with status 3, a sanitizer's report with the sanitizer's status.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/gating.cuh"
#include "cuda/permute.cuh"

namespace {

void read_exact(void* out, size_t bytes) {
  if (bytes > 0 && std::fread(out, 1, bytes, stdin) != bytes) {
    std::fprintf(stderr, "driver: request too short\n");
    std::exit(2);
  }
}

int64_t read_i64() {
  int64_t v;
  read_exact(&v, sizeof v);
  return v;
}

template <class T>
std::vector<T> read_array(int64_t n) {
  std::vector<T> v(static_cast<size_t>(n));
  read_exact(v.data(), v.size() * sizeof(T));
  return v;
}

template <class T>
std::vector<T> poisoned(int64_t n) {
  std::vector<T> v(static_cast<size_t>(n));
  if (!v.empty()) std::memset(v.data(), cuda_emu::kPoison, v.size() * sizeof(T));
  return v;
}

template <class T>
void write(const std::vector<T>& v) {
  if (!v.empty()) std::fwrite(v.data(), sizeof(T), v.size(), stdout);
}

void write_error(cudaError_t err) {
  const int64_t code = err;
  std::fwrite(&code, sizeof code, 1, stdout);
}

void permute_index() {
  using namespace moe_kernels::permute_cuda;
  const int64_t P = read_i64(), E = read_i64(), align = read_i64();
  const bool ids_int64 = read_i64() != 0, vllm = read_i64() != 0;
  const int64_t R = read_i64();
  std::vector<int64_t> ids64;
  std::vector<int32_t> ids32;
  if (ids_int64) ids64 = read_array<int64_t>(P);
  else ids32 = read_array<int32_t>(P);
  const void* ids = ids_int64 ? static_cast<const void*>(ids64.data()) : ids32.data();

  // Scratch as csrc/cuda/permute.cu's make_scratch: at::empty of these sizes.
  const int64_t chunks = num_chunks(P);
  auto chunk_counts = poisoned<int32_t>(chunks * E);
  auto rank = poisoned<int32_t>(std::max<int64_t>(P, 1));
  auto chunk_start = poisoned<int64_t>(chunks * E);
  auto offsets = poisoned<int64_t>(E + 1);
  auto counts = poisoned<int32_t>(E);
  IndexBuffers b{};
  b.chunk_counts = chunk_counts.data();
  b.rank = rank.data();
  b.chunk_start = chunk_start.data();
  b.offsets = offsets.data();
  b.counts = counts.data();
  if (!vllm) {
    std::vector<int32_t> m_indices(R, -1), row_of_pair = poisoned<int32_t>(P), pair_of_row(R, -1);
    b.m_indices = m_indices.data();
    b.row_of_pair = row_of_pair.data();
    b.pair_of_row = pair_of_row.data();
    write_error(launch_index_any(ids, ids_int64, P, static_cast<int>(E), align, b, nullptr));
    write(offsets), write(counts), write(m_indices), write(row_of_pair), write(pair_of_row);
  } else {
    std::vector<int32_t> sorted_ids(R, static_cast<int32_t>(P)),
        expert_ids((R + align - 1) / align, -1);
    b.sorted_ids = sorted_ids.data();
    b.block_expert = expert_ids.data();
    write_error(launch_index_any(ids, ids_int64, P, static_cast<int>(E), align, b, nullptr));
    write(sorted_ids), write(expert_ids), write(offsets);
  }
}

void grouped_topk() {
  using namespace moe_kernels::gating_cuda;
  const int64_t T = read_i64(), E = read_i64(), stride = read_i64(), dtype = read_i64();
  Params p{};
  p.num_tokens = T;
  p.stride = stride;
  p.num_experts = static_cast<int>(E);
  p.num_groups = static_cast<int>(read_i64());
  p.group_size = p.num_experts / p.num_groups;
  p.topk_group = static_cast<int>(read_i64());
  p.top_k = static_cast<int>(read_i64());
  p.softmax = read_i64() != 0;
  p.group_top2 = read_i64() != 0;
  p.select_groups = read_i64() != 0;
  p.renormalize = read_i64() != 0;
  const bool has_bias = read_i64() != 0;
  const uint32_t scale_bits = static_cast<uint32_t>(read_i64());
  std::memcpy(&p.scale, &scale_bits, sizeof p.scale);
  p.shared_id = static_cast<int>(read_i64());
  const int64_t width = p.top_k + (p.shared_id >= 0 ? 1 : 0);
  const int64_t n = T > 0 ? (T - 1) * stride + E : 0;
  const int64_t elt = dtype == 0 ? 4 : 2;
  auto logits = read_array<unsigned char>(n * elt);
  std::vector<float> bias = has_bias ? read_array<float>(E) : std::vector<float>();
  auto weights = poisoned<float>(T * width);
  auto ids = poisoned<int32_t>(T * width);
  p.logits = logits.data();
  p.bias = has_bias ? bias.data() : nullptr;
  p.weights = weights.data();
  p.ids = ids.data();
  // As csrc/cuda/gating.cu: no launch for T = 0.
  const cudaError_t err = T == 0 ? cudaSuccess
                                 : launch_grouped_topk(p, static_cast<DType>(dtype), nullptr);
  write_error(err);
  write(weights), write(ids);
}

}  // namespace

int main() {
  int64_t op;
  while (std::fread(&op, sizeof op, 1, stdin) == 1) {
    if (op == 1) permute_index();
    else if (op == 2) grouped_topk();
    else {
      std::fprintf(stderr, "driver: unknown op %lld\n", static_cast<long long>(op));
      return 2;
    }
    std::fflush(stdout);
  }
  return 0;
}
