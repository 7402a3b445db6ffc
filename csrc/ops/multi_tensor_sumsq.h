// Host-side argument checks of multi_tensor_sumsq, shared by its CPU and CUDA kernels.
#pragma once
#include "llmkern/multi_tensor.h"

namespace llmkern::ops {

// Every tensor on tensors[0]'s device, float32/float16/bfloat16, and dense (any strides), so the
// kernels walk each storage as one flat run of numel() elements.
inline void check_multi_tensor_sumsq(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "multi_tensor_sumsq: tensors must not be empty (the result's device comes from "
              "tensors[0])");
  const at::Device device = tensors[0].device();
  for (size_t j = 0; j < tensors.size(); ++j) {
    const at::Tensor& t = tensors[j];
    TORCH_CHECK(t.device() == device, "multi_tensor_sumsq: tensors[", j, "] must be on ", device,
                " like tensors[0], got ", t.device());
    TORCH_CHECK(llmkern::detail::is_optim_float(t.scalar_type()), "multi_tensor_sumsq: tensors[", j,
                "] must be float32, float16 or bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.numel() <= 1 || t.is_non_overlapping_and_dense(), "multi_tensor_sumsq: tensors[", j,
                "] must be dense (non-overlapping); got shape ", t.sizes(), " and strides ", t.strides(),
                "; pass .contiguous()");
  }
}

}  // namespace llmkern::ops
