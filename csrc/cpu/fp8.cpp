// FP8 block-scaled quantization on the CPU (semantics:
// moe_kernels/reference/fp8.py). Parallel over rows (token groups) or weight blocks; each
// group is computed in float32, its amax gives the scale, then the clamped values are
// rounded to e4m3 (round to nearest even). Token groups of 16-multiple sizes run the
// vector rows of simd.h (512 x 7168 bf16 on one thread: 2.1 ms, against 7.8 ms with the
// loops below, whose amax GCC left scalar); the loops below take every other size.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <type_traits>
#include <vector>

#include "../fp8.h"
#include "../ops.h"
#include "index_values.h"
#include "simd.h"
#include "vec_math.h"

namespace moe_kernels {
namespace {

using fp8_t = c10::Float8_e4m3fn;

// amax over the finite values, on the bit patterns: for |x| they order as the values do;
// inf and NaN (exponent all ones) count as 0.
MOE_VEC_CLONES float finite_amax(const float* v, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t a = __builtin_bit_cast(uint32_t, v[i]) & 0x7FFFFFFFu;
    const uint32_t f = a < 0x7F800000u ? a : 0u;
    m = f > m ? f : m;
  }
  return __builtin_bit_cast(float, m);
}

MOE_VEC_CLONES void quantize_run(const float* v, int64_t n, float scale, uint8_t* q) {
  for (int64_t i = 0; i < n; ++i) q[i] = fp8_bits(v[i] / scale);
}

// gate[i] = silu(gate[i]) * up[i]
MOE_VEC_CLONES void silu_mul_inplace(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + exp_branchless(-gate[i])) * up[i];
}

// Quantizes one group of n float32 values into q, returns its scale.
float quantize_group(const float* v, int64_t n, float eps, bool ue8m0, fp8_t* q) {
  const float scale = group_scale(finite_amax(v, n), eps, ue8m0);
  quantize_run(v, n, scale, reinterpret_cast<uint8_t*>(q));
  return scale;
}

// Whether simd().quantize_row takes these rows: the sizes of every DeepSeek-V3 and vLLM /
// SGLang call (group 128, widths multiples of 128). The scalar loop below is the fallback.
template <typename scalar_t>
bool simd_rows(int64_t W, int64_t group) {
  return !std::is_same_v<scalar_t, double> && group % 16 == 0 && group <= kMaxSimdGroup &&
         W % 16 == 0;
}

// Which rows token_groups quantizes: all (live empty), or those with live[m] set; the
// others are not read, and zeroed (q 0, scale 0) when zero_fill, else not written.
struct LiveRows {
  std::vector<uint8_t> live;
  bool zero_fill = true;

  // true when row m is done without quantizing it
  bool skip(int64_t m, int64_t W, int64_t G, uint8_t* q8, float* sp, int64_t ssm,
            int64_t ssg) const {
    if (live.empty() || live[m]) return false;
    if (zero_fill) {
      std::fill(q8 + m * W, q8 + (m + 1) * W, uint8_t{0});
      for (int64_t g = 0; g < G; ++g) sp[m * ssm + g * ssg] = 0.0f;
    }
    return true;
  }
};

// q (M, W) and s (M, G) (any strides of s) from x (M, W), or from [gate | up] (M, 2W).
template <typename scalar_t>
void token_groups(const at::Tensor& x, int64_t W, int64_t group, float eps, bool ue8m0,
                  bool gated, at::Tensor& q, at::Tensor& s, const LiveRows& rows) {
  const int64_t M = x.size(0), G = ceil_div(W, group);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t sx = x.stride(0);
  fp8_t* qp = q.data_ptr<fp8_t>();
  float* sp = s.data_ptr<float>();
  const int64_t ssm = s.stride(0), ssg = s.stride(1);
  uint8_t* q8 = reinterpret_cast<uint8_t*>(qp);
  if (simd_rows<scalar_t>(W, group)) {
    const SimdKernels& k = simd();
    const SrcType type = simd_type(x.scalar_type(), "x");
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        if (rows.skip(m, W, G, q8, sp, ssm, ssg)) continue;
        k.quantize_row(xp + m * sx, type, W, group, eps, ue8m0, gated,
                       q8 + m * W, sp + m * ssm, ssg);
      }
    });
    return;
  }
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    // a group wider than the row holds the row (a group_size of 2^40 allocates nothing)
    const int64_t width = std::min(group, W);
    std::vector<float> buf(width), up(gated ? width : 0);
    for (int64_t m = begin; m < end; ++m) {
      if (rows.skip(m, W, G, q8, sp, ssm, ssg)) continue;
      const scalar_t* row = xp + m * sx;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t c0 = g * group, n = std::min(group, W - c0);
        for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[c0 + i]);
        if (gated) {
          for (int64_t i = 0; i < n; ++i) up[i] = static_cast<float>(row[W + c0 + i]);
          silu_mul_inplace(buf.data(), up.data(), n);
        }
        sp[m * ssm + g * ssg] = quantize_group(buf.data(), n, eps, ue8m0, qp + m * W + c0);
      }
    }
  });
}

// The dtypes token_groups and the block quantizer read (their AT_DISPATCH).
bool quantizable_dtype(at::ScalarType t) { return simd_dtype(t) || t == at::kDouble; }

// x (M, W), or [gate | up] (M, 2W) when gated (masked: (E, M, 2W)); group_size >= 1
Report check_token_group_input(const at::Tensor& x, int64_t group, bool gated,
                               bool masked = false) {
  if (masked) {
    MK_CHECK_VALUE(x.dim() == 3, "x must be 3-D (E, M, 2N) with masked_m, got ", x.dim(), "-D");
  } else {
    MK_CHECK_VALUE(x.dim() == 2, "x must be 2-D (M, K), got ", x.dim(), "-D");
  }
  MK_CHECK_TYPE(quantizable_dtype(x.scalar_type()),
                "x must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
  MK_CHECK_VALUE(!gated || x.size(-1) % 2 == 0, "x must be [gate | up] with an even width, got ",
                 x.size(-1));
  MK_CHECK_VALUE(group >= 1, "group_size must be >= 1, got ", group);
  return {};
}

// q (M, W) contiguous float8_e4m3fn and s (M, ceil(W / group)) float32 of any strides
Report check_token_group_out(const at::Tensor& x, int64_t group, bool gated, const at::Tensor& q,
                             const at::Tensor& s) {
  MK_CHECK(check_token_group_input(x, group, gated));
  const int64_t M = x.size(0), W = gated ? x.size(1) / 2 : x.size(1), G = ceil_div(W, group);
  MK_CHECK_TYPE(q.scalar_type() == at::kFloat8_e4m3fn, "q must be float8_e4m3fn, got ",
                q.scalar_type());
  MK_CHECK_VALUE(q.dim() == 2 && q.size(0) == M && q.size(1) == W && q.is_contiguous(),
                 "q must be contiguous of shape (", M, ", ", W, "), got ", q.sizes());
  MK_CHECK_TYPE(s.scalar_type() == at::kFloat, "s must be float32, got ", s.scalar_type());
  MK_CHECK_VALUE(s.dim() == 2 && s.size(0) == M && s.size(1) == G, "s must have shape (", M,
                 ", ", G, "), got ", s.sizes());
  return {};
}

// q (M, W) contiguous and s (M, ceil(W / group)) of any strides, written in place; the
// arguments checked (check_token_group_out).
void token_group_out(const at::Tensor& x_in, int64_t W, int64_t group, double eps, bool ue8m0,
                     bool gated, at::Tensor& q, at::Tensor& s, const LiveRows& rows = {}) {
  const at::Tensor x = x_in.stride(-1) == 1 ? x_in : x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fp8_quant", [&] {
    token_groups<scalar_t>(x, W, group, static_cast<float>(eps), ue8m0, gated, q, s, rows);
  });
}

// x (E, M, 2W) [gate | up] in the masked layout, masked_m (E,) int32 | int64
Report check_masked_gated_input(const at::Tensor& x, const at::Tensor& masked_m, int64_t group) {
  MK_CHECK(check_token_group_input(x, group, true, true));
  MK_CHECK_VALUE(masked_m.dim() == 1 && masked_m.size(0) == x.size(0),
                 "masked_m must have shape (", x.size(0), ",), got ", masked_m.sizes());
  MK_CHECK_TYPE(index_dtype(masked_m.scalar_type()), "masked_m must be int32 or int64, got ",
                masked_m.scalar_type());
  return {};
}

// x (E, M, 2W) -> q (E, M, W), s (E, M, G), both contiguous; rows i >= masked_m[e] not read
void masked_gated_out(const at::Tensor& x, const at::Tensor& masked_m, int64_t group,
                      double eps, bool zero_fill, at::Tensor& q, at::Tensor& s) {
  const int64_t E = x.size(0), M = x.size(1), W = x.size(2) / 2;
  LiveRows rows{std::vector<uint8_t>(E * M, 0), zero_fill};
  const IndexValues mm(masked_m);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = 0; i < std::min(std::max(mm[e], int64_t{0}), M); ++i) rows.live[e * M + i] = 1;
  at::Tensor q2 = q.view({E * M, W}), s2 = s.view({E * M, s.size(2)});
  token_group_out(x.reshape({E * M, 2 * W}), W, group, eps, false, true, q2, s2, rows);
}

std::tuple<at::Tensor, at::Tensor> token_group_op(const at::Tensor& x, int64_t group, double eps,
                                                  bool ue8m0, bool column_major, bool gated) {
  throw_if(check_token_group_input(x, group, gated));
  const int64_t M = x.size(0), W = gated ? x.size(1) / 2 : x.size(1), G = ceil_div(W, group);
  at::Tensor q = at::empty({M, W}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor s = column_major ? at::empty({G, M}, x.options().dtype(at::kFloat)).t()
                              : at::empty({M, G}, x.options().dtype(at::kFloat));
  token_group_out(x, W, group, eps, ue8m0, gated, q, s);
  return {q, s};
}

}  // namespace

Report check_quantize_fp8_per_token_group_cpu(const at::Tensor& x, int64_t group_size,
                                              double /*eps*/, bool /*scale_ue8m0*/,
                                              bool /*column_major_scales*/) {
  return check_token_group_input(x, group_size, false);
}

Report check_quantize_fp8_per_token_group_out_cpu(const at::Tensor& x, int64_t group_size,
                                                  double /*eps*/, bool /*scale_ue8m0*/,
                                                  const at::Tensor& q, const at::Tensor& s) {
  return check_token_group_out(x, group_size, false, q, s);
}

Report check_silu_and_mul_quant_fp8_cpu(const at::Tensor& x, int64_t group_size,
                                        double /*eps*/) {
  return check_token_group_input(x, group_size, true);
}

Report check_silu_and_mul_quant_fp8_out_cpu(const at::Tensor& x, int64_t group_size,
                                            double /*eps*/, const at::Tensor& q,
                                            const at::Tensor& s) {
  return check_token_group_out(x, group_size, true, q, s);
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_per_token_group_cpu(
    const at::Tensor& x, int64_t group_size, double eps, bool scale_ue8m0,
    bool column_major_scales) {
  return token_group_op(x, group_size, eps, scale_ue8m0, column_major_scales, false);
}

void quantize_fp8_per_token_group_out_cpu(const at::Tensor& x, int64_t group_size, double eps,
                                          bool scale_ue8m0, at::Tensor& q, at::Tensor& s) {
  throw_if(check_token_group_out(x, group_size, false, q, s));
  token_group_out(x, x.size(1), group_size, eps, scale_ue8m0, false, q, s);
}

std::tuple<at::Tensor, at::Tensor> silu_and_mul_quant_fp8_cpu(const at::Tensor& x,
                                                              int64_t group_size, double eps) {
  return token_group_op(x, group_size, eps, false, false, true);
}

void silu_and_mul_quant_fp8_out_cpu(const at::Tensor& x, int64_t group_size, double eps,
                                    at::Tensor& q, at::Tensor& s) {
  throw_if(check_token_group_out(x, group_size, true, q, s));
  token_group_out(x, x.size(1) / 2, group_size, eps, false, true, q, s);
}

Report check_silu_and_mul_quant_fp8_masked_cpu(const at::Tensor& x, const at::Tensor& masked_m,
                                               int64_t group_size, double /*eps*/) {
  return check_masked_gated_input(x, masked_m, group_size);
}

Report check_silu_and_mul_quant_fp8_masked_out_cpu(const at::Tensor& x,
                                                   const at::Tensor& masked_m,
                                                   int64_t group_size, double /*eps*/,
                                                   bool /*zero_fill*/, const at::Tensor& q,
                                                   const at::Tensor& s) {
  MK_CHECK(check_masked_gated_input(x, masked_m, group_size));
  const int64_t E = x.size(0), M = x.size(1), W = x.size(2) / 2;
  const int64_t G = ceil_div(W, group_size);
  MK_CHECK_TYPE(q.scalar_type() == at::kFloat8_e4m3fn, "q must be float8_e4m3fn, got ",
                q.scalar_type());
  MK_CHECK_VALUE(q.dim() == 3 && q.size(0) == E && q.size(1) == M && q.size(2) == W &&
                     q.is_contiguous(),
                 "q must be contiguous of shape (", E, ", ", M, ", ", W, "), got ", q.sizes());
  MK_CHECK_TYPE(s.scalar_type() == at::kFloat, "s must be float32, got ", s.scalar_type());
  MK_CHECK_VALUE(s.dim() == 3 && s.size(0) == E && s.size(1) == M && s.size(2) == G &&
                     s.is_contiguous(),
                 "s must be contiguous of shape (", E, ", ", M, ", ", G, "), got ", s.sizes());
  return {};
}

std::tuple<at::Tensor, at::Tensor> silu_and_mul_quant_fp8_masked_cpu(const at::Tensor& x,
                                                                     const at::Tensor& masked_m,
                                                                     int64_t group_size,
                                                                     double eps) {
  throw_if(check_masked_gated_input(x, masked_m, group_size));
  const int64_t E = x.size(0), M = x.size(1), W = x.size(2) / 2;
  at::Tensor q = at::empty({E, M, W}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor s = at::empty({E, M, ceil_div(W, group_size)}, x.options().dtype(at::kFloat));
  masked_gated_out(x, masked_m, group_size, eps, true, q, s);
  return {q, s};
}

void silu_and_mul_quant_fp8_masked_out_cpu(const at::Tensor& x, const at::Tensor& masked_m,
                                           int64_t group_size, double eps, bool zero_fill,
                                           at::Tensor& q, at::Tensor& s) {
  throw_if(check_silu_and_mul_quant_fp8_masked_out_cpu(x, masked_m, group_size, eps, zero_fill,
                                                       q, s));
  masked_gated_out(x, masked_m, group_size, eps, zero_fill, q, s);
}

Report check_quantize_fp8_block_cpu(const at::Tensor& w, int64_t block_n, int64_t block_k,
                                    double /*eps*/) {
  MK_CHECK_VALUE(w.dim() >= 2, "w must be at least 2-D (..., N, K), got ", w.dim(), "-D");
  MK_CHECK_TYPE(quantizable_dtype(w.scalar_type()),
                "w must be float32, bfloat16, float16 or float64, got ", w.scalar_type());
  MK_CHECK_VALUE(block_n >= 1 && block_k >= 1, "block sizes must be >= 1, got (", block_n, ", ",
                 block_k, ")");
  return {};
}

Report check_dequantize_fp8_block_cpu(const at::Tensor& q, const at::Tensor& s, int64_t block_n,
                                      int64_t block_k, at::ScalarType dtype) {
  MK_CHECK_VALUE(q.dim() >= 2, "q must be at least 2-D (..., N, K), got ", q.dim(), "-D");
  MK_CHECK_TYPE(q.scalar_type() == at::kFloat8_e4m3fn, "q must be float8_e4m3fn, got ",
                q.scalar_type());
  MK_CHECK_VALUE(block_n >= 1 && block_k >= 1, "block sizes must be >= 1, got (", block_n, ", ",
                 block_k, ")");
  std::vector<int64_t> s_shape(q.sizes().begin(), q.sizes().end() - 2);
  s_shape.push_back(ceil_div(q.size(-2), block_n));
  s_shape.push_back(ceil_div(q.size(-1), block_k));
  MK_CHECK(check_scales(s, "s", s_shape));
  MK_CHECK_TYPE(quantizable_dtype(dtype), "dtype must be float32, bfloat16, float16 or float64, got ",
                dtype);
  return {};
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_block_cpu(const at::Tensor& w_in,
                                                          int64_t block_n, int64_t block_k,
                                                          double eps) {
  throw_if(check_quantize_fp8_block_cpu(w_in, block_n, block_k, eps));
  const at::Tensor w = w_in.contiguous();
  const int64_t N = w.size(-2), K = w.size(-1);
  const int64_t B = N * K != 0 ? w.numel() / (N * K) : 0;
  const int64_t NB = ceil_div(N, block_n), KB = ceil_div(K, block_k);
  at::Tensor q = at::empty(w.sizes(), w.options().dtype(at::kFloat8_e4m3fn));
  std::vector<int64_t> s_shape(w.sizes().begin(), w.sizes().end() - 2);
  s_shape.push_back(NB);
  s_shape.push_back(KB);
  at::Tensor s = at::empty(s_shape, w.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "fp8_block", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    fp8_t* qp = q.data_ptr<fp8_t>();
    float* sp = s.data_ptr<float>();
    at::parallel_for(0, B * NB * KB, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t b = blk / (NB * KB), nb = blk / KB % NB, kb = blk % KB;
        const int64_t n0 = nb * block_n, n1 = std::min(N, n0 + block_n);
        const int64_t k0 = kb * block_k, k1 = std::min(K, k0 + block_k);
        const scalar_t* base = wp + b * N * K;
        float amax = 0.0f;
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t k = k0; k < k1; ++k)
            amax = std::max(amax, finite_abs(static_cast<float>(base[n * K + k])));
        const float scale = group_scale(amax, static_cast<float>(eps), false);
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t k = k0; k < k1; ++k)
            qp[b * N * K + n * K + k] = to_fp8(static_cast<float>(base[n * K + k]) / scale);
        sp[blk] = scale;
      }
    });
  });
  return {q, s};
}

at::Tensor dequantize_fp8_block_cpu(const at::Tensor& q_in, const at::Tensor& s_in,
                                    int64_t block_n, int64_t block_k, at::ScalarType dtype) {
  throw_if(check_dequantize_fp8_block_cpu(q_in, s_in, block_n, block_k, dtype));
  const at::Tensor q = q_in.contiguous();
  const int64_t N = q.size(-2), K = q.size(-1);
  const int64_t NB = ceil_div(N, block_n), KB = ceil_div(K, block_k);
  const at::Tensor s = s_in.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  if (q.numel() == 0) return out;  // before any division by N or K
  const int64_t rows = q.numel() / K;
  if (dtype == at::kFloat) {
    const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.data_ptr<fp8_t>());
    const float* sp = s.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const SimdKernels& k = simd();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        k.dequant_row(qp + r * K, sp + (r / N * NB + r % N / block_n) * KB, 1, K, block_k,
                      op + r * K);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fp8_dequant", [&] {
    const fp8_t* qp = q.data_ptr<fp8_t>();
    const float* sp = s.data_ptr<float>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / N, n = r % N;
        dequant_row(qp + r * K, sp + (b * NB + n / block_n) * KB, 1, K, block_k, op + r * K);
      }
    });
  });
  return out;
}

}  // namespace moe_kernels
