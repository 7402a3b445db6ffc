// Schema of fused_sgd_: one multi-tensor SGD (momentum, dampening, Nesterov) step, in place.
// The lists and the three scalar tensors mean what they mean for fused_adamw_ (see fused_adamw.cpp);
// momentum_buffers is empty when momentum == 0. On step 1 the buffer is set to the gradient, as
// torch.optim.SGD does.
#include "llmkern/registration.h"

LLMKERN_LIBRARY_FRAGMENT(m) {
  m.def(
      "fused_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(d!)[] model_copies, Tensor step, Tensor found_inf, Tensor grad_coef, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov) -> ()");
}
