// Input validation for lora_linear, shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/ATen.h>

#include "llmkern/checks.h"
#include "llmkern/rng.h"

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

// The dropout parameters of one call, checked: seed an int64 CPU tensor of one element (read here, on
// the host, without a device sync), col_offset >= 0 and row_stride >= col_offset + C_in (the local
// columns lie inside the full row whose counters they share).
inline DropoutParams lora_dropout_params(double dropout_p, const at::Tensor& seed, int64_t offset, int64_t col_offset,
                                         int64_t row_stride, const LoraShapes& sh) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.device().is_cpu(),
              "lora_linear: seed must be an int64 CPU tensor with one element, got a ", seed.scalar_type(),
              " tensor of shape ", seed.sizes(), " on ", seed.device());
  TORCH_CHECK(col_offset >= 0 && row_stride >= col_offset + sh.c_in, "lora_linear: the dropout counter needs ",
              "0 <= col_offset and col_offset + C_in <= row_stride, got col_offset=", col_offset, ", C_in=", sh.c_in,
              ", row_stride=", row_stride);
  return make_dropout_params(dropout_p, *seed.data_ptr<int64_t>(), offset, col_offset, row_stride);
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

// What both backends work on. The base GEMMs (x·Wᵀ + b, gy·W) go to ATen (MKL/oneDNN on the CPU,
// cuBLAS on CUDA); the kernels then add the LoRA terms in place. Factors are cast once to the
// accumulation dtype (R×C, small); Bᵀ is stored R×C so every kernel reads factor rows contiguously.
struct LoraForward {
  LoraShapes sh;
  at::Tensor x2, y2, xa, a, bt;

  std::tuple<at::Tensor, at::Tensor> outputs(const at::Tensor& x) const {
    return {y2.view(with_last(x.sizes(), sh.c_out)), xa.view(with_last(x.sizes(), sh.r))};
  }
};

inline LoraForward prepare_lora_forward(const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                        const at::Tensor& lora_b, double dropout_p) {
  LoraForward f;
  f.sh = check_lora_inputs(x, weight, bias, lora_a, lora_b, dropout_p);
  const auto acc_t = lora_acc_dtype(x);
  f.x2 = x.reshape({f.sh.n, f.sh.c_in}).contiguous();
  f.y2 = bias.has_value() ? at::addmm(*bias, f.x2, weight.t()) : at::mm(f.x2, weight.t());
  TORCH_INTERNAL_ASSERT(f.y2.is_contiguous());
  f.xa = at::zeros({f.sh.n, f.sh.r}, x.options().dtype(acc_t));
  f.a = lora_a.to(acc_t).contiguous();
  f.bt = lora_b.t().to(acc_t).contiguous();
  return f;
}

// gu = s·gy·B (N×R); gbt = Bᵀ's gradient (R×C_out) and ga = A's (R×C_in), zeroed for accumulation.
struct LoraBackward {
  LoraShapes sh;
  at::Tensor gy2, x2, xa2, gx2, a, bt, gu, gbt, ga;

  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs(const at::Tensor& x) const {
    return {gx2.view(x.sizes()), ga.to(x.scalar_type()), gbt.t().to(x.scalar_type()).contiguous()};
  }
};

inline LoraBackward prepare_lora_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& xa,
                                          double dropout_p) {
  LoraBackward b;
  b.sh = check_lora_inputs(x, weight, std::nullopt, lora_a, lora_b, dropout_p);
  check_lora_backward_inputs(grad_y, x, xa, b.sh);
  const auto acc_t = lora_acc_dtype(x);
  const auto& sh = b.sh;
  b.gy2 = grad_y.reshape({sh.n, sh.c_out}).contiguous();
  b.x2 = x.reshape({sh.n, sh.c_in}).contiguous();
  b.xa2 = xa.reshape({sh.n, sh.r}).contiguous();
  b.gx2 = at::mm(b.gy2, weight);
  TORCH_INTERNAL_ASSERT(b.gx2.is_contiguous());
  b.a = lora_a.to(acc_t).contiguous();
  b.bt = lora_b.t().to(acc_t).contiguous();
  b.gu = at::zeros({sh.n, sh.r}, x.options().dtype(acc_t));
  b.gbt = at::zeros({sh.r, sh.c_out}, x.options().dtype(acc_t));
  b.ga = at::zeros({sh.r, sh.c_in}, x.options().dtype(acc_t));
  return b;
}

}  // namespace llmkern::ops::detail
