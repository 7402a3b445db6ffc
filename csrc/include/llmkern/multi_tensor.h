// Host-side checks shared by the multi-tensor optimizer ops (fused_adamw_, fused_sgd_) on every
// backend. Each message names the list, the index and what was expected.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace llmkern::detail {

inline bool is_optim_float(at::ScalarType d) {
  return d == at::kFloat || d == at::kHalf || d == at::kBFloat16;
}

// The scalars that the caller keeps on the device: float32, one element, on `device`.
inline void check_scalar_tensor(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == 1, name,
              " must be a float32 tensor with one element, got ", t.scalar_type(), " with shape ",
              t.sizes());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " like the parameters, got ",
              t.device());
}

// `lists[k]` must be empty (when optional[k]) or as long as lists[0]. Tensor j of every list must
// have tensor j of lists[0]'s shape and strides and be non-overlapping and dense, so that the
// kernels can walk the storage as one flat run of numel() elements whatever the layout (a
// transposed weight is fine, a strided slice is not).
inline void check_tensor_lists(const std::vector<at::TensorList>& lists, const std::vector<const char*>& names,
                               const std::vector<bool>& optional, const at::Device& device) {
  const auto n = lists[0].size();
  for (size_t k = 1; k < lists.size(); ++k) {
    TORCH_CHECK(lists[k].size() == n || (optional[k] && lists[k].empty()), names[k], " has ",
                lists[k].size(), " tensors but ", names[0], " has ", n,
                optional[k] ? " (it may also be empty)" : "");
  }
  for (size_t k = 0; k < lists.size(); ++k) {
    for (size_t j = 0; j < lists[k].size(); ++j) {
      const at::Tensor& t = lists[k][j];
      const at::Tensor& ref = lists[0][j];
      TORCH_CHECK(t.device() == device, names[k], "[", j, "] must be on ", device, ", got ", t.device());
      TORCH_CHECK(is_optim_float(t.scalar_type()), names[k], "[", j,
                  "] must be float32, float16 or bfloat16, got ", t.scalar_type());
      TORCH_CHECK(t.sizes() == ref.sizes(), names[k], "[", j, "] has shape ", t.sizes(), " but ",
                  names[0], "[", j, "] has shape ", ref.sizes());
      TORCH_CHECK(t.numel() <= 1 || (t.strides() == ref.strides() && t.is_non_overlapping_and_dense()),
                  names[k], "[", j, "] must be dense with the same strides as ", names[0], "[", j,
                  "] (strides ", t.strides(), " vs ", ref.strides(),
                  "); pass .contiguous() tensors or tensors created with torch.zeros_like(param)");
    }
  }
}

// A hyper-parameter outside its range (NaN never is in one) is a ValueError in Python, with the message
// of llmkern/ops/_multi_tensor.py check_hyper, which the Python backends (triton, ref) raise.
inline void check_hyper(double value, const char* name, double lo, bool lo_open, double hi, bool hi_open) {
  const bool ok = (lo_open ? value > lo : value >= lo) && (hi_open ? value < hi : value <= hi);
  TORCH_CHECK_VALUE(ok, name, " must be in ", lo_open ? "(" : "[", lo, ", ", hi, hi_open ? ")" : "]",
                    ", got ", value);
}

// step >= 1 wherever an update happens (found_inf == 0): step = 0 divides by 1 - beta^0 = 0. A CPU step
// (the CPU kernels, the emulated CUDA kernels) is read here: ValueError before anything is written. A
// CUDA step is not (that would sync the host): the kernels write nothing when step < 1, as on an
// overflow, and _assert_async raises a device-side assert, so the error is not silent
// (llmkern/ops/_multi_tensor.py check_step does the same for the Python backends).
inline void check_step(const at::Tensor& step, const at::Tensor& found_inf) {
  static constexpr const char* kMessage =
      "step must be >= 1 (the 1-based number of this update) when found_inf is 0";
  if (step.is_cpu()) {
    const float t = step.item<float>();
    TORCH_CHECK_VALUE(found_inf.item<float>() != 0.0f || t >= 1.0f, kMessage, ", got ", t);
  } else {
    at::_assert_async(at::logical_or(step.ge(1.0), found_inf.ne(0.0)).reshape({}), kMessage);
  }
}

}  // namespace llmkern::detail
