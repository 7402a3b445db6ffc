// Schema of RMSNorm with an optional fused residual add (llmkern/ops/rms_norm.py flattens x to 2-D).
//   x (T, C)  weight (C)  residual (T, C) or None  convention "llama" | "gemma"
//   s = x + residual (rounded to x's dtype, as the unfused `residual + hidden_states`), else s = x
//   llama: y = w · round(s·rstd)        (LlamaRMSNorm: normalize in fp32, cast, then scale)
//   gemma: y = round(s·rstd · (1 + w))  (GemmaRMSNorm: everything in fp32, one cast at the end)
//   rstd = 1/sqrt(mean_c(s²) + eps), in fp32.
// Returns y (T, C) in x's dtype, residual_out = s (T, C) ((0) without a residual) and rstd (T) fp32.
#include "llmkern/registration.h"

LLMKERN_LIBRARY_FRAGMENT(m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, str convention, Tensor? residual) "
        "-> (Tensor y, Tensor residual_out, Tensor rstd)");
  // xs is s (x, or residual_out with a residual). grad_residual_out is the gradient reaching
  // residual_out from its other uses, or None; it is added to grad_x (the gradient of s, which is
  // also the residual's). Gradients are in x's dtype, accumulated in fp32.
  m.def("_rms_norm_backward(Tensor grad_y, Tensor? grad_residual_out, Tensor xs, Tensor weight, Tensor rstd, "
        "str convention) -> (Tensor grad_x, Tensor grad_weight)");
}
