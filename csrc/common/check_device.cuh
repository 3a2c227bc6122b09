// Calls every host-device function of csrc/common/ from a kernel, so that `make check-cuda`
// compiles them for sm_90a (an uncalled __host__ __device__ function is never compiled for
// the device). Not part of the build.
#pragma once
#include <cuda_runtime.h>

#include "fp8_math.h"
#include "order_key.h"

namespace moe_kernels {

__global__ void check_common_device_code(const float* x, float* y, uint8_t* q, int64_t* key) {
  const float s = group_scale(x[0], 1e-10f, true);
  q[0] = fp8_bits(x[1] / s);
  y[0] = fp8_value(q[0]) * s + finite_abs(x[2]) + group_score(x, 8, true);
  key[0] = order_key(nan_to_neg_inf(x[3]), ceil_div(5, 2)) + index_of_key(key[1]) +
           order_bits(x[4]);
}

}  // namespace moe_kernels
