// Input checks shared by every op. Each message says what was expected and what was given.
#pragma once
#include <ATen/ATen.h>

namespace llmkern::detail {

inline void check_float_dtype(const at::Tensor& t, const char* name, bool allow_double = true) {
  auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16 || (allow_double && d == at::kDouble),
              name, " must be float32, float16 or bfloat16", allow_double ? " (or float64)" : "",
              ", got ", d);
}

inline void check_same_dtype(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), an, " and ", bn, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ", a.device(),
              " and ", b.device());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D with shape ", shape, ", got shape ", t.sizes());
}

}  // namespace llmkern::detail
