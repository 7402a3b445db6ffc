// Schema of LayerNorm over the last dimension (llmkern/ops/layer_norm.py flattens x to 2-D).
//   x (T, C)  weight (C) or None  bias (C) or None (bias only with a weight, as nn.LayerNorm)
//   y = (x - mean)·rstd·w + b, mean and the biased variance over C in fp32, rstd = 1/sqrt(var + eps).
// Returns y (T, C) in x's dtype and the row statistics mean, rstd (T) in fp32.
#include "llmkern/registration.h"

LLMKERN_LIBRARY_FRAGMENT(m) {
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  // grad_weight / grad_bias are (C) when the weight / bias exists, (0) otherwise.
  m.def("_layer_norm_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool has_bias) "
        "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
}
