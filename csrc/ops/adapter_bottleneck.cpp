// Schema of the fused bottleneck adapter: out = r + s·(act(LN?(x)·Dᵀ + d)·Uᵀ + u).
//   x (T, C) 2-D (llmkern/ops/adapter_bottleneck.py flattens leading dims)  down_weight D (R, C)
//   down_bias d (R) or None  up_weight U (C, R)  up_bias u (C) or None  ln_weight/ln_bias (C) or None
//   (LayerNorm iff ln_weight is given)  residual r (T, C), or None for r = x (the series form).
// Returns out (T, C) in x's dtype and the only activations the backward needs besides x: the fp32
// pre-activation z (T, R), and the LayerNorm row statistics mean, rstd (T) in fp32 ((0) without LN).
// act(z) and LN(x) are recomputed in the backward, never stored.
#include "llmkern/registration.h"

LLMKERN_LIBRARY_FRAGMENT(m) {
  m.def(
      "adapter_bottleneck(Tensor x, Tensor down_weight, Tensor? down_bias, Tensor up_weight, Tensor? up_bias, "
      "float scale, str activation, Tensor? ln_weight, Tensor? ln_bias, float eps, Tensor? residual) "
      "-> (Tensor out, Tensor z, Tensor mean, Tensor rstd)");
  // Every gradient, in x's dtype (grad_ln_* are (0) without LN). grad_x includes grad_out when
  // residual_is_x; the gradient of a separate residual is grad_out itself (formed in Python).
  m.def(
      "_adapter_bottleneck_backward(Tensor grad_out, Tensor x, Tensor down_weight, Tensor? down_bias, "
      "Tensor up_weight, float scale, str activation, Tensor? ln_weight, Tensor? ln_bias, Tensor z, Tensor mean, "
      "Tensor rstd, bool residual_is_x) -> (Tensor grad_x, Tensor grad_down_weight, Tensor grad_down_bias, "
      "Tensor grad_up_weight, Tensor grad_up_bias, Tensor grad_ln_weight, Tensor grad_ln_bias)");
}
