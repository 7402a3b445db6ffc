// Input validation for lora_linear, shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/ATen.h>

#include "llmkern/checks.h"

namespace llmkern::ops::detail {

struct LoraShapes {
  int64_t n, c_in, c_out, r;
};

inline LoraShapes check_lora_inputs(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                    const at::Tensor& lora_b, double dropout_p) {
  using namespace llmkern::detail;
  TORCH_CHECK(x.dim() >= 1, "lora_linear: x must have shape (..., C_in), got a 0-d tensor");
  check_dim(weight, "lora_linear: weight", 2, "(C_out, C_in)");
  check_dim(lora_a, "lora_linear: lora_a", 2, "(R, C_in)");
  check_dim(lora_b, "lora_linear: lora_b", 2, "(C_out, R)");
  const int64_t c_in = x.size(-1), c_out = weight.size(0), r = lora_a.size(0);
  TORCH_CHECK(weight.size(1) == c_in, "lora_linear: x has C_in=", c_in, " (shape ", x.sizes(),
              ") but weight has shape ", weight.sizes(), "; expected (C_out, ", c_in, ")");
  TORCH_CHECK(lora_a.size(1) == c_in, "lora_linear: lora_a has shape ", lora_a.sizes(), "; expected (R, ",
              c_in, ") to match x's C_in");
  TORCH_CHECK(r >= 1, "lora_linear: rank R must be >= 1, got lora_a of shape ", lora_a.sizes());
  TORCH_CHECK(lora_b.size(0) == c_out && lora_b.size(1) == r, "lora_linear: lora_b has shape ", lora_b.sizes(),
              "; expected (C_out, R) = (", c_out, ", ", r, ")");
  check_float_dtype(x, "lora_linear: x");
  check_same_dtype(x, "x", weight, "weight");
  check_same_dtype(x, "x", lora_a, "lora_a");
  check_same_dtype(x, "x", lora_b, "lora_b");
  check_same_device(x, "x", weight, "weight");
  check_same_device(x, "x", lora_a, "lora_a");
  check_same_device(x, "x", lora_b, "lora_b");
  if (bias.has_value()) {
    check_dim(*bias, "lora_linear: bias", 1, "(C_out)");
    TORCH_CHECK(bias->size(0) == c_out, "lora_linear: bias has shape ", bias->sizes(), "; expected (", c_out, ")");
    check_same_dtype(x, "x", *bias, "bias");
    check_same_device(x, "x", *bias, "bias");
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "lora_linear: dropout_p must be in [0, 1), got ", dropout_p);
  int64_t n = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) n *= x.size(i);
  return {n, c_in, c_out, r};
}

inline at::ScalarType lora_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// The backward's own inputs: grad_y (..., C_out) and xa (..., R) in the accumulation dtype.
inline void check_lora_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& xa,
                                       const LoraShapes& sh) {
  const auto acc_t = lora_acc_dtype(x);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(with_last(x.sizes(), sh.c_out)), "_lora_linear_backward: grad_y has shape ",
              grad_y.sizes(), "; expected ", with_last(x.sizes(), sh.c_out));
  TORCH_CHECK(xa.sizes() == at::IntArrayRef(with_last(x.sizes(), sh.r)) && xa.scalar_type() == acc_t,
              "_lora_linear_backward: xa has shape ", xa.sizes(), " and dtype ", xa.scalar_type(), "; expected ",
              with_last(x.sizes(), sh.r), " and ", acc_t);
  llmkern::detail::check_same_dtype(x, "x", grad_y, "grad_y");
  llmkern::detail::check_same_device(x, "x", grad_y, "grad_y");
  llmkern::detail::check_same_device(x, "x", xa, "xa");
}

}  // namespace llmkern::ops::detail
