// Host-side argument checks of fused_adamw_, shared by its CPU and CUDA kernels.
#pragma once
#include <cmath>

#include "llmkern/multi_tensor.h"

namespace llmkern::ops {

// The checks of every backend, in this order (llmkern/ops/fused_adamw.py check_args is the Python twin):
// hyper-parameters, element_offset, the scalar tensors, the step, the lists, the per-tensor dtype rules.
inline void check_fused_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                              at::TensorList model_copies, const at::Tensor& step, const at::Tensor& found_inf,
                              const at::Tensor& grad_coef, double lr, double beta1, double beta2, double eps,
                              double weight_decay, int64_t element_offset) {
  using namespace llmkern::detail;
  check_hyper(lr, "lr", 0.0, false, INFINITY, true);
  check_hyper(beta1, "beta1", 0.0, false, 1.0, true);
  check_hyper(beta2, "beta2", 0.0, false, 1.0, true);
  check_hyper(eps, "eps", 0.0, true, INFINITY, true);
  check_hyper(weight_decay, "weight_decay", 0.0, false, INFINITY, true);
  TORCH_CHECK_VALUE(element_offset >= 0, "element_offset must be >= 0, got ", element_offset);
  const at::Device device = step.device();
  check_scalar_tensor(step, "step", device);
  check_scalar_tensor(found_inf, "found_inf", device);
  check_scalar_tensor(grad_coef, "grad_coef", device);
  check_step(step, found_inf);
  check_tensor_lists({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies},
                     {"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "model_copies"},
                     {false, false, false, false, true, true}, device);
  for (size_t j = 0; j < params.size(); ++j) {
    TORCH_CHECK(exp_avgs[j].scalar_type() == exp_avg_sqs[j].scalar_type() &&
                    (exp_avgs[j].scalar_type() == at::kFloat || exp_avgs[j].scalar_type() == at::kBFloat16),
                "exp_avgs[", j, "] and exp_avg_sqs[", j, "] must both be float32 or both bfloat16, got ",
                exp_avgs[j].scalar_type(), " and ", exp_avg_sqs[j].scalar_type());
    TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs[j].scalar_type() == exp_avg_sqs[j].scalar_type(),
                "max_exp_avg_sqs[", j, "] must have exp_avg_sqs[", j, "]'s dtype ", exp_avg_sqs[j].scalar_type(),
                ", got ", max_exp_avg_sqs.empty() ? at::kFloat : max_exp_avg_sqs[j].scalar_type());
    TORCH_CHECK(model_copies.empty() || (params[j].scalar_type() == at::kFloat &&
                                         model_copies[j].scalar_type() != at::kFloat),
                "with model_copies, params[", j, "] must be the float32 master and model_copies[", j,
                "] float16 or bfloat16, got ", params[j].scalar_type(), " and ",
                model_copies.empty() ? at::kFloat : model_copies[j].scalar_type());
  }
}

}  // namespace llmkern::ops
