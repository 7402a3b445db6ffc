// Schema of the LM head matmul fused with the cross-entropy, over chunks of tokens, so that the
// (T, V) logits never exist at once (llmkern/ops/fused_linear_cross_entropy.py):
//   hidden (T, C)  weight (V, C) (the head, no bias)  labels (T) int64
//   logits of chunk c = hidden_c·weightᵀ in hidden's dtype (as the unfused lm_head), then the
//   cross-entropy of csrc/ops/cross_entropy.cpp on them in fp32.
// reduction "sum": loss is the 0-d fp32 sum of the per-row losses, and the gradients of that sum
//   (grad_hidden (T, C), grad_weight (V, C), each (0) when not asked for) are computed during the
//   forward, chunk by chunk (the backward only scales them by the incoming gradient).
// reduction "none": loss is (T) fp32; no gradient is formed in the forward; the backward op
//   recomputes each chunk's logits with the per-row incoming gradients.
// _fused_linear_cross_entropy_scale returns the gradients a "sum" forward formed times the incoming
//   0-d fp32 gradient, computed in fp32 and rounded once (`t * g` with a 0-d CUDA tensor g would round
//   g to t's 16-bit dtype first). Zeros stay zero when g is inf or NaN (the mean over no valid label),
//   as torch's gradients of ignored labels do.
// _fused_linear_cross_entropy_scale_ does the same in place. The eager backward uses it when the graph
//   is freed after the backward (no retain_graph): the forward's grad_weight is then the only (V, C)
//   gradient, where the out-of-place scale held two at once (with the zero gradients autograd then
//   materialized for the op's gradient outputs, the peak of a fwd+bwd at T = C = 2048, V = 128K in
//   fp32 was 3.2 GB, 1.2 GB now; bench/ops/bench_fused_linear_cross_entropy.py). Traced backwards
//   (torch.compile, opcheck's aot_dispatch) and retain_graph take the out-of-place op: AOT autograd
//   wants functional graphs, and a second backward needs the unscaled gradients.
// chunk_size is the number of tokens per chunk (>= 1), chosen by the Python wrapper from T, V and a
// memory cap.
#include "llmkern/registration.h"

LLMKERN_LIBRARY_FRAGMENT(m) {
  m.def("fused_linear_cross_entropy(Tensor hidden, Tensor weight, Tensor labels, int ignore_index, "
        "float label_smoothing, float z_loss, str reduction, int chunk_size, bool grad_hidden, bool grad_weight) "
        "-> (Tensor loss, Tensor grad_hidden, Tensor grad_weight)");
  m.def("_fused_linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor labels, "
        "int ignore_index, float label_smoothing, float z_loss, int chunk_size, bool grad_hidden, "
        "bool grad_weight) -> (Tensor grad_hidden, Tensor grad_weight)");
  m.def("_fused_linear_cross_entropy_scale(Tensor grad_hidden, Tensor grad_weight, Tensor grad_loss) "
        "-> (Tensor grad_hidden_out, Tensor grad_weight_out)");
  m.def("_fused_linear_cross_entropy_scale_(Tensor(a!) grad_hidden, Tensor(b!) grad_weight, Tensor grad_loss) -> ()");
}
