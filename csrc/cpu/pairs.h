// A task's weight panel for the bf16 dot products of the avx512bf16 build (simd.h,
// gemm_pairs): the grouped GEMMs' and MLA's tasks each widen their block of weight rows into
// one panel, with the weight scales per K block and lane.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/fp8_math.h"
#include "simd.h"

namespace moe_kernels {

struct PairPanel {
  at::Tensor panel;            // int16 storage, 64-byte aligned (a std::vector's is 16)
  std::vector<float> scales;   // (KB, panel_rows): the scale of lane n's row in block kb
  std::vector<int64_t> offsets;

  // Rows [n0, n0 + nb) of w (K elements per row, fp8 or bf16; nb <= panel_rows), with the
  // 128 x 128 block scales w_scales (ceil(K / 128) per block row) or none (w_scales null:
  // scale_data() is null). Returns the panel.
  PairPanelRef pack(const void* w, bool fp8, const float* w_scales, int64_t n0, int64_t nb,
                    int64_t K) {
    const SimdKernels& k = simd();
    const int64_t need = k.panel_rows * ceil_div(K, 2) * 2;
    if (!panel.defined() || panel.numel() < need)
      panel = at::empty({need}, at::TensorOptions().dtype(at::kShort));
    offsets.resize(nb);
    for (int64_t i = 0; i < nb; ++i) offsets[i] = (n0 + i) * K;
    uint16_t* p = reinterpret_cast<uint16_t*>(panel.data_ptr<int16_t>());
    k.pack_pair_panels(w, fp8, offsets.data(), nb, K, p);
    set_scales(w_scales, n0, nb, K);
    return {p, k.panel_rows, 16};
  }

  // The lanes' scales of rows [n0, n0 + nb) (for a panel read in place), or none.
  void set_scales(const float* w_scales, int64_t n0, int64_t nb, int64_t K) {
    scales.clear();
    if (w_scales == nullptr) return;
    const int64_t KB = ceil_div(K, kScaleBlock), PR = simd().panel_rows;
    scales.assign(KB * PR, 0.0f);
    for (int64_t kb = 0; kb < KB; ++kb)
      for (int64_t i = 0; i < nb; ++i)
        scales[kb * PR + i] = w_scales[((n0 + i) / kScaleBlock) * KB + kb];
  }

  const float* scale_data() const { return scales.empty() ? nullptr : scales.data(); }
};

}  // namespace moe_kernels
