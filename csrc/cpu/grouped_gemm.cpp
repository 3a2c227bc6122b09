// FP8 grouped GEMMs on the CPU (semantics:
// moe_kernels/reference/grouped_gemm.py). Per expert: dequantize its weight block by block
// into float32 (parallel over rows of N), gather its rows of `a` dequantized, and one
// at::mm (itself parallel). Dequantize-then-multiply equals "promotion every 128" up to
// float32 rounding, since a scale is constant over each 128-wide K block.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "../fp8.h"
#include "../ops.h"
#include "vec_math.h"

namespace moe_kernels {
namespace {

using fp8_t = c10::Float8_e4m3fn;

// rows x (K) of fp8 `a` with per-128 scales -> float32 (rows, K)
at::Tensor dequant_rows(const at::Tensor& a, const at::Tensor& a_scales,
                        const std::vector<int64_t>& rows) {
  const int64_t K = a.size(1), n = static_cast<int64_t>(rows.size());
  at::Tensor out = at::empty({n, K}, a.options().dtype(at::kFloat));
  const fp8_t* ap = a.data_ptr<fp8_t>();
  const float* sp = a_scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sa = a.stride(0), ssm = a_scales.stride(0), ssk = a_scales.stride(1);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = rows[i];
      dequant_row(ap + r * sa, sp + r * ssm, ssk, K, kScaleBlock, op + i * K);
    }
  });
  return out;
}

// b[e] (N, K) fp8 with 128x128 scales -> float32 (N, K)
at::Tensor dequant_expert(const at::Tensor& b, const at::Tensor& b_scales, int64_t e) {
  const int64_t N = b.size(1), K = b.size(2), KB = b_scales.size(2);
  at::Tensor out = at::empty({N, K}, b.options().dtype(at::kFloat));
  const fp8_t* bp = b.data_ptr<fp8_t>() + e * N * K;
  const float* sp = b_scales.data_ptr<float>() + e * b_scales.size(1) * KB;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      dequant_row(bp + n * K, sp + (n / kScaleBlock) * KB, 1, K, kScaleBlock, op + n * K);
    }
  });
  return out;
}

// acc[r] += scale * sum_k x[r * ldx + k] * w[k] for r < m, k < len: 16 partial sums in a
// fixed order (deterministic, and vectorized where one running sum would not be).
MOE_VEC_CLONES void scaled_dots(const float* x, int64_t ldx, int64_t m, const float* w,
                                int64_t len, float scale, float* acc) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * ldx;
    float part[16] = {};
    int64_t k = 0;
    for (; k + 16 <= len; k += 16)
      for (int j = 0; j < 16; ++j) part[j] += xr[k + j] * w[k + j];
    float sum = 0.0f;
    for (int j = 0; j < 16; ++j) sum += part[j];
    for (; k < len; ++k) sum += xr[k] * w[k];
    acc[r] += sum * scale;
  }
}

MOE_VEC_CLONES void decode_fp8(const fp8_t* src, int64_t n, float* dst) {
  const uint8_t* bits = reinterpret_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = fp8_value(bits[i]);
}

// Few rows (decode): y = x @ b[e].T from one 128-wide block of a weight row at a time,
// decoded into an L1 buffer, so the (N, K) float32 weight is never written and read back
// (dequantizing it cost more than the GEMV itself at T=1). Parallel over weight rows.
at::Tensor small_expert_gemm(const at::Tensor& x, const at::Tensor& b, const at::Tensor& b_scales,
                             int64_t e) {
  const int64_t m = x.size(0), K = x.size(1), N = b.size(1), KB = b_scales.size(2);
  at::Tensor y = at::empty({m, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const fp8_t* bp = b.data_ptr<fp8_t>() + e * N * K;
  const float* sp = b_scales.data_ptr<float>() + e * b_scales.size(1) * KB;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    float buf[kScaleBlock];
    std::vector<float> acc(m);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      const fp8_t* row = bp + n * K;
      const float* srow = sp + (n / kScaleBlock) * KB;
      for (int64_t k0 = 0; k0 < K; k0 += kScaleBlock) {
        const int64_t len = std::min(kScaleBlock, K - k0);
        decode_fp8(row + k0, len, buf);
        scaled_dots(xp + k0, K, m, buf, len, srow[k0 / kScaleBlock], acc.data());
      }
      for (int64_t r = 0; r < m; ++r) yp[r * N + n] = acc[r];
    }
  });
  return y;
}

// Up to this many rows an expert takes small_expert_gemm: 8 rows x 128 columns of
// activations stay in L1 beside the decoded weight block.
constexpr size_t kSmallRows = 8;

// out[rows] = (a[rows] dequantized) @ b[e].T dequantized, cast to out's dtype
void expert_gemm(const at::Tensor& a, const at::Tensor& a_scales, const at::Tensor& b,
                 const at::Tensor& b_scales, int64_t e, const std::vector<int64_t>& rows,
                 at::Tensor& out) {
  if (rows.empty()) return;
  const at::Tensor x = dequant_rows(a, a_scales, rows);
  at::Tensor y = rows.size() <= kSmallRows ? small_expert_gemm(x, b, b_scales, e)
                                           : at::mm(x, dequant_expert(b, b_scales, e).t());
  const bool contiguous_run = rows.back() - rows.front() + 1 == static_cast<int64_t>(rows.size());
  if (contiguous_run) {
    out.narrow(0, rows.front(), static_cast<int64_t>(rows.size())).copy_(y);
  } else {
    out.index_copy_(0, at::tensor(rows, out.options().dtype(at::kLong)), y.to(out.scalar_type()));
  }
}

void check_b(const at::Tensor& b, const at::Tensor& b_scales, int64_t K) {
  check_fp8(b, "b", 3);
  TORCH_CHECK_VALUE(b.size(2) == K, "b must have K = ", K, " columns, got ", b.size(2));
  check_scales(b_scales, "b_scales",
               {b.size(0), ceil_div(b.size(1), kScaleBlock), ceil_div(K, kScaleBlock)});
}

}  // namespace

void grouped_gemm_fp8_out_cpu(const at::Tensor& a_in, const at::Tensor& a_scales_in,
                              const at::Tensor& b_in, const at::Tensor& b_scales_in,
                              const at::Tensor& m_indices_in, at::Tensor& out) {
  check_fp8(a_in, "a", 2);
  const int64_t R = a_in.size(0), K = a_in.size(1);
  check_scales(a_scales_in, "a_scales", {R, ceil_div(K, kScaleBlock)});
  check_b(b_in, b_scales_in, K);
  TORCH_CHECK_VALUE(m_indices_in.dim() == 1 && m_indices_in.size(0) == R,
                    "m_indices must have shape (", R, ")");
  const int64_t E = b_in.size(0), N = b_in.size(1);
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == R && out.size(1) == N,
                    "out must have shape (", R, ", ", N, ")");
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor b_scales = b_scales_in.contiguous();
  const at::Tensor m_indices = m_indices_in.to(at::kLong).contiguous();
  out.zero_();  // rows without an expert are zero
  std::vector<std::vector<int64_t>> rows(E);
  const int64_t* mp = m_indices.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    if (mp[r] >= 0 && mp[r] < E) rows[mp[r]].push_back(r);
  for (int64_t e = 0; e < E; ++e) expert_gemm(a, a_scales_in, b, b_scales, e, rows[e], out);
}

at::Tensor grouped_gemm_fp8_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                const at::Tensor& b, const at::Tensor& b_scales,
                                const at::Tensor& m_indices, at::ScalarType out_dtype) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 3, "a must be 2-D and b 3-D");
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options().dtype(out_dtype));
  grouped_gemm_fp8_out_cpu(a, a_scales, b, b_scales, m_indices, out);
  return out;
}

void grouped_gemm_fp8_masked_out_cpu(const at::Tensor& a_in, const at::Tensor& a_scales_in,
                                     const at::Tensor& b_in, const at::Tensor& b_scales_in,
                                     const at::Tensor& masked_m_in, at::Tensor& out) {
  check_fp8(a_in, "a", 3);
  const int64_t E = a_in.size(0), M = a_in.size(1), K = a_in.size(2);
  check_scales(a_scales_in, "a_scales", {E, M, ceil_div(K, kScaleBlock)});
  check_b(b_in, b_scales_in, K);
  TORCH_CHECK_VALUE(b_in.size(0) == E, "b must have ", E, " groups");
  TORCH_CHECK_VALUE(masked_m_in.dim() == 1 && masked_m_in.size(0) == E,
                    "masked_m must have shape (", E, ")");
  const int64_t N = b_in.size(1);
  TORCH_CHECK_VALUE(out.dim() == 3 && out.size(0) == E && out.size(1) == M &&
                        out.size(2) == N && out.is_contiguous(),
                    "out must be contiguous of shape (", E, ", ", M, ", ", N, ")");
  const at::Tensor a = a_in.reshape({E * M, K}).contiguous();
  const at::Tensor a_scales = a_scales_in.reshape({E * M, -1});
  const at::Tensor b = b_in.contiguous(), b_scales = b_scales_in.contiguous();
  const at::Tensor masked_m = masked_m_in.to(at::kLong).contiguous();
  at::Tensor flat = out.view({E * M, N});
  flat.zero_();  // rows >= masked_m[e] are zero
  const int64_t* mm = masked_m.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < std::min(std::max(mm[e], int64_t{0}), M); ++i) rows.push_back(e * M + i);
    expert_gemm(a, a_scales, b, b_scales, e, rows, flat);
  }
}

at::Tensor grouped_gemm_fp8_masked_cpu(const at::Tensor& a, const at::Tensor& a_scales,
                                       const at::Tensor& b, const at::Tensor& b_scales,
                                       const at::Tensor& masked_m, at::ScalarType out_dtype) {
  TORCH_CHECK_VALUE(a.dim() == 3 && b.dim() == 3, "a and b must be 3-D");
  at::Tensor out = at::empty({a.size(0), a.size(1), b.size(1)}, a.options().dtype(out_dtype));
  grouped_gemm_fp8_masked_out_cpu(a, a_scales, b, b_scales, masked_m, out);
  return out;
}

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("grouped_gemm_fp8", &grouped_gemm_fp8_cpu);
  m.impl("grouped_gemm_fp8_masked", &grouped_gemm_fp8_masked_cpu);
  m.impl("grouped_gemm_fp8_out", &grouped_gemm_fp8_out_cpu);
  m.impl("grouped_gemm_fp8_masked_out", &grouped_gemm_fp8_masked_out_cpu);
}

}  // namespace moe_kernels
