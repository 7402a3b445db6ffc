// Schema of the fused LoRA linear: y = x·Wᵀ + b + s·(dropout_p(x)·Aᵀ)·Bᵀ.
//   x (..., C_in)  weight (C_out, C_in)  bias (C_out) or None  lora_a (R, C_in)  lora_b (C_out, R)
// Returns y (..., C_out) in x's dtype and xa = dropout_p(x)·Aᵀ (..., R) in fp32 (fp64 for fp64
// inputs): the only activation the backward needs besides x. The dropout mask is never stored;
// it is regenerated from (seed, offset, col_offset, row_stride) by csrc/include/llmkern/rng.h: the
// bit of local element (n, k) is that of counter offset + col_offset + n·row_stride + k, so a
// column shard of a tensor-parallel layer (col_offset = its first column, row_stride = the full
// C_in) draws the slice of the single-device mask. seed is an int64 CPU tensor of one element: a
// module draws it from torch's CPU generator as a tensor, so neither eager mode (no device sync)
// nor torch.compile (no Tensor.item() graph break) reads it on the host before the op runs.
#include "llmkern/registration.h"

LLMKERN_LIBRARY_FRAGMENT(m) {
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
      "float dropout_p, Tensor seed, int offset, int col_offset, int row_stride) -> (Tensor, Tensor)");
  // Gradients of x, lora_a and lora_b. Those of weight and bias (frozen in the common case) are
  // formed in Python only when they are required.
  m.def(
      "_lora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor xa, float scale, float dropout_p, Tensor seed, int offset, int col_offset, int row_stride) -> "
      "(Tensor, Tensor, Tensor)");
}
