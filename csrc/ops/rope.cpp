// Schema of rotary position embedding applied to q and k in one call, in Hugging Face's rotate_half
// layout (llmkern/ops/rope.py brings q, k to (B, H, T, D) views and cos/sin to (B or 1, T, D)):
//   out[..., i] = x[..., i]·cos[i] - x[..., i + D/2]·sin[i]      i <  D/2
//   out[..., i] = x[..., i]·cos[i] + x[..., i - D/2]·sin[i]      i >= D/2
// (x·cos + rotate_half(x)·sin). q (B, Hq, T, D) and k (B, Hk, T, D) may be strided views with a
// unit last stride; cos and sin are the rotary module's (any scaling is already in them), in q's dtype.
// fp32 math, one rounding per output element.
#include "llmkern/registration.h"

LLMKERN_LIBRARY_FRAGMENT(m) {
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor q_out, Tensor k_out)");
  // In place, for inputs that need no gradient (inference, or tensors autograd does not track).
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  // The transposed rotation: grad_x[i] = g[i]·cos[i] + g[i + D/2]·sin[i + D/2] (i < D/2),
  // g[i]·cos[i] - g[i - D/2]·sin[i - D/2] (i >= D/2). cos and sin need no gradient (the rotary
  // module computes them under no_grad).
  m.def("_rope_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin) -> (Tensor grad_q_in, Tensor grad_k_in)");
}
