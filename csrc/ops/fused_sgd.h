// Host-side argument checks of fused_sgd_, shared by its CPU and CUDA kernels.
#pragma once
#include <cmath>

#include "llmkern/multi_tensor.h"

namespace llmkern::ops {

inline void check_fused_sgd(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            at::TensorList model_copies, const at::Tensor& step, const at::Tensor& found_inf,
                            const at::Tensor& grad_coef, double lr, double momentum, double dampening,
                            double weight_decay, bool nesterov) {
  using namespace llmkern::detail;
  // In this order on every backend (llmkern/ops/fused_sgd.py check_args is the Python twin).
  check_hyper(lr, "lr", 0.0, false, INFINITY, true);
  check_hyper(momentum, "momentum", 0.0, false, 1.0, true);
  check_hyper(dampening, "dampening", 0.0, false, 1.0, false);
  check_hyper(weight_decay, "weight_decay", 0.0, false, INFINITY, true);
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0.0 && dampening == 0.0),
                    "nesterov needs momentum > 0 and dampening == 0, got momentum ", momentum, ", dampening ",
                    dampening);
  const at::Device device = step.device();
  check_scalar_tensor(step, "step", device);
  check_scalar_tensor(found_inf, "found_inf", device);
  check_scalar_tensor(grad_coef, "grad_coef", device);
  check_step(step, found_inf);
  TORCH_CHECK((momentum == 0.0) == momentum_buffers.empty(),
              "momentum_buffers must be given exactly when momentum > 0 (momentum ", momentum, ", ",
              momentum_buffers.size(), " buffers)");
  check_tensor_lists({params, grads, momentum_buffers, model_copies},
                     {"params", "grads", "momentum_buffers", "model_copies"}, {false, false, true, true},
                     device);
  for (size_t j = 0; j < model_copies.size(); ++j)
    TORCH_CHECK(params[j].scalar_type() == at::kFloat && model_copies[j].scalar_type() != at::kFloat,
                "with model_copies, params[", j, "] must be the float32 master and model_copies[", j,
                "] float16 or bfloat16, got ", params[j].scalar_type(), " and ", model_copies[j].scalar_type());
}

}  // namespace llmkern::ops
