// MOE_HD: functions of csrc/common/ compile for the host (C++ CPU kernels) and, under
// nvcc, for the device too, so both sides share one definition of every numeric rule.
#pragma once

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__ __forceinline__
#else
#define MOE_HD inline
#endif
