// A task's weight rows for the bf16 dot products of the avx512bf16 build (simd.h,
// gemm_pairs): the grouped GEMMs' and MLA's tasks each widen their block of weight rows into
// VNNI tiles, with the weight scales per K block and lane.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/fp8_math.h"
#include "amx.h"
#include "simd.h"
#include "tasks.h"

namespace moe_kernels {

struct PairPanel {
  TileScratch tiles{0};        // amx::pack_weights_vnni's tiles (64-byte aligned)
  std::vector<float> scales;   // (KB, panel_rows): the scale of lane n's row in block kb

  // Rows [n0, n0 + nb) of w (K elements per row, fp8 or bf16; nb <= panel_rows) in VNNI
  // tiles (amx.h: plain AVX-512 code, no tile instructions), with the 128 x 128 block
  // scales w_scales (ceil(K / 128) per block row) or none (w_scales null: scale_data() is
  // null).
  PairPanelRef pack(const void* w, bool fp8, const float* w_scales, int64_t n0, int64_t nb,
                    int64_t K) {
    const int64_t need = amx::panel_elems(simd().panel_rows, K);
    if (tiles.storage.numel() < need) tiles = TileScratch(need);
    const char* rows = static_cast<const char*>(w) + n0 * K * (fp8 ? 1 : 2);
    amx::pack_weights_vnni(rows, fp8 ? amx::Src::fp8 : amx::Src::bf16, K, nb, K, tiles.data());
    set_scales(w_scales, n0, nb, K);
    return vnni_ref(tiles.data(), K);
  }

  // The VNNI tiles at `tiles` (from a row that starts a 16-row tile) as gemm_pairs reads them
  static PairPanelRef vnni_ref(const uint16_t* tiles, int64_t K) {
    return {tiles, amx::kTileRows, amx::chunks(K) * amx::kTileElems / 2};
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
