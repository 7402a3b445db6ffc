// Schema of the fused LoRA linear: y = x·Wᵀ + b + s·(dropout_p(x)·Aᵀ)·Bᵀ.
//   x (..., C_in)  weight (C_out, C_in)  bias (C_out) or None  lora_a (R, C_in)  lora_b (C_out, R)
// Returns y (..., C_out) in x's dtype and xa = dropout_p(x)·Aᵀ (..., R) in fp32 (fp64 for fp64
// inputs): the only activation the backward needs besides x. The dropout mask is never stored;
// it is regenerated from (seed, offset) by csrc/include/llmkern/rng.h.
#include "llmkern/registration.h"

LLMKERN_LIBRARY_FRAGMENT(m) {
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
      "float dropout_p, int seed, int offset) -> (Tensor, Tensor)");
  // Gradients of x, lora_a and lora_b. Those of weight and bias (frozen in the common case) are
  // formed in Python only when they are required.
  m.def(
      "_lora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor xa, float scale, float dropout_p, int seed, int offset) -> (Tensor, Tensor, Tensor)");
}
