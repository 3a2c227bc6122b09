// Read-only int64 values of an int32 or int64 index tensor, without the converted copy
// that `.to(at::kLong)` makes for int32 (an allocation per tensor and per call: 1.8 of the
// 2.2 us that mla_paged_values_cpu took on decode-sized int32 tables, 2-core VM).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace moe_kernels {

class IndexValues {
 public:
  // t: int32 or int64 as the callers' checks require, any strides; another dtype is
  // converted, as `.to(at::kLong)` did, so a caller that skipped them reads in bounds.
  explicit IndexValues(const at::Tensor& t)
      : tensor_(t.scalar_type() == at::kInt ? t.contiguous() : t.to(at::kLong).contiguous()),
        wide_(tensor_.scalar_type() == at::kLong),
        data_(tensor_.data_ptr()) {}

  int64_t operator[](int64_t i) const {
    return wide_ ? static_cast<const int64_t*>(data_)[i]
                 : static_cast<const int32_t*>(data_)[i];
  }

 private:
  at::Tensor tensor_;  // holds the contiguous copy alive where one was made
  bool wide_;
  const void* data_;
};

}  // namespace moe_kernels
