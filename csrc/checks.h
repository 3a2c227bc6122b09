// Argument checks of the kernel entry points, reported instead of thrown.
//
// Every entry point `<op>_<backend>` has a check function `check_<op>_<backend>` with the
// same arguments that returns the first problem found (or nothing) and never throws. The
// registered op's kernel (moe_kernels/_library.py) calls it through `_C.<op>_<backend>_check`
// and raises the Python exception itself before the kernel runs, so no argument a user
// passes (direct torch.ops calls included) makes C++ code throw: on one platform (torch
// 2.11 + gcc 13.3) any C++ exception leaving an extension killed the process
// (benchmarks/probe_cpp_exceptions.py). A check passing means the kernel's body runs
// without throwing, whatever the values in the tensors; tests/test_direct_calls.py holds
// each check to that with mutated arguments of every kind.
//
// The entry points call their check first too (`throw_if`), for callers of the private
// `_C.<op>_<backend>` functions. The CPU checks read no device (the dispatcher's CPU key
// means CPU tensors; the caller of a private entry point answers for them), so the Triton
// variant of an op runs its CPU check as the op's argument check on any device.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

namespace moe_kernels {

// A kind of problem is the Python exception it becomes: ValueError or TypeError.
enum class ProblemKind : int { kValue = 1, kType = 2 };

struct Problem {
  ProblemKind kind;
  std::string message;  // names the argument; Python prefixes the op's name
};

using Report = std::optional<Problem>;

// What `_C.<op>_<backend>_check` returns: (0, "") when the arguments pass, else
// (1 for ValueError or 2 for TypeError, message).
inline std::tuple<int, std::string> to_python(const Report& r) {
  if (!r) return {0, std::string()};
  return {static_cast<int>(r->kind), r->message};
}

inline void throw_if(const Report& r) {
  if (!r) return;
  if (r->kind == ProblemKind::kType) TORCH_CHECK_TYPE(false, r->message);
  TORCH_CHECK_VALUE(false, r->message);
}

inline bool dtype_in(at::ScalarType t, std::initializer_list<at::ScalarType> allowed) {
  for (at::ScalarType a : allowed)
    if (t == a) return true;
  return false;
}

// The dtypes the vector kernels read and write (csrc/cpu/simd.h, SrcType).
inline bool simd_dtype(at::ScalarType t) {
  return dtype_in(t, {at::kFloat, at::kBFloat16, at::kHalf});
}

inline bool index_dtype(at::ScalarType t) { return dtype_in(t, {at::kInt, at::kLong}); }

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Argument `index` of a check when it is a tensor whose memory the kernel cannot read:
// another layout than strided (sparse, mkldnn: no strides or data pointer, and reading
// either throws), a meta tensor (no data), or a tensor subclass dispatched in Python (a
// FakeTensor has no data; the eager path sends calls under its mode to the registered op,
// where its fake answers). Every `_C.<entry>_check` runs this over its arguments first
// (csrc/registration.cpp), so no check or kernel reads such a tensor; the public ops refuse
// the layouts by name before (check_tensor).
inline Report readable_problem(size_t index, const at::Tensor& t) {
  if (!t.defined()) return std::nullopt;
  if (t.layout() != at::kStrided)
    return Problem{ProblemKind::kType, c10::str("argument ", index, " must be a dense "
                                                "(strided) tensor, got layout ", t.layout())};
  if (t.is_meta())
    return Problem{ProblemKind::kType, c10::str("argument ", index, " is a meta tensor; the "
                                                "kernels read data (backend 'reference' "
                                                "takes meta tensors)")};
  if (t.key_set().has(c10::DispatchKey::Python))
    return Problem{ProblemKind::kType,
                   c10::str("argument ", index, " is a tensor subclass dispatched in Python "
                            "(a FakeTensor outside its mode?), whose data the kernel cannot "
                            "read; call the op under the subclass's mode")};
  return std::nullopt;
}
inline Report readable_problem(size_t index, const std::optional<at::Tensor>& t) {
  return t ? readable_problem(index, *t) : std::nullopt;
}
template <typename T>
Report readable_problem(size_t, const T&) {
  return std::nullopt;
}

}  // namespace moe_kernels

// Inside a function returning Report: return the problem when `cond` fails. The message
// parts are joined as by TORCH_CHECK.
#define MK_REQUIRE(kind, cond, ...)                                           \
  do {                                                                        \
    if (!(cond)) return ::moe_kernels::Problem{kind, ::c10::str(__VA_ARGS__)}; \
  } while (0)
#define MK_CHECK_VALUE(cond, ...) MK_REQUIRE(::moe_kernels::ProblemKind::kValue, cond, __VA_ARGS__)
#define MK_CHECK_TYPE(cond, ...) MK_REQUIRE(::moe_kernels::ProblemKind::kType, cond, __VA_ARGS__)
// Inside a function returning Report: return the problem another check reports, if any.
#define MK_CHECK(report)                    \
  do {                                      \
    if (auto mk_report_ = (report)) return mk_report_; \
  } while (0)
