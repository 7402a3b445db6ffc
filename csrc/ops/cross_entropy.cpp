// Schema of the cross-entropy of logits rows against integer labels, one online-softmax pass per row
// in fp32 (llmkern/ops/cross_entropy.py reduces the per-row losses and flattens the batch):
//   logits (T, V) with a unit last stride (any row stride), in fp32, fp16 or bf16; labels (T) int64
//   losses[t] = (1-ε)·(lse_t - x_t[y_t]) + ε·(lse_t - mean_v x_t[v]) + z·lse_t²
//   (0 where y_t == ignore_index; ε is label_smoothing, z the z-loss coefficient)
// lse (T) fp32 is log Σ_v exp x_t[v] (0 for ignored rows). The backward recomputes the softmax from
// the logits and lse and writes the gradient in one pass, rounded once: autograd keeps the logits
// (which the caller holds anyway, e.g. a model's output.logits) and lse, never a (T, V) softmax or a
// second (T, V) tensor. (A gradient formed in the forward and stored in a 16-bit dtype is rounded
// twice, once there and once when scaled by the incoming gradient: up to 7x PyTorch's error in fp16,
// tests/ops/test_cross_entropy.py.)
// A label outside [0, V) that is not ignore_index is an error.
#include "llmkern/registration.h"

LLMKERN_LIBRARY_FRAGMENT(m) {
  m.def("cross_entropy(Tensor logits, Tensor labels, int ignore_index, float label_smoothing, float z_loss) "
        "-> (Tensor losses, Tensor lse)");
  // grad_logits[t] = grad_losses[t] · d losses[t] / d logits[t] in the logits' dtype, fp32 math; rows
  // with ignored labels are 0 (also where grad_losses is inf or NaN, e.g. a mean over no valid label).
  m.def("_cross_entropy_backward(Tensor grad_losses, Tensor logits, Tensor labels, Tensor lse, int ignore_index, "
        "float label_smoothing, float z_loss) -> Tensor grad_logits");
}
