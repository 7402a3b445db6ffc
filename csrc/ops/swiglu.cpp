// Schemas of the gated activations of LLaMA-style MLPs, element-wise over tensors of one shape
// (llmkern/ops/swiglu.py flattens them):
//   swiglu(gate, up)                = silu(gate)·up
//   geglu(gate, up, approximate)    = gelu(gate)·up, approximate "none" (erf) or "tanh"
// fp32 math, one rounding to the inputs' dtype. The backward recomputes the activation from gate:
// autograd saves gate and up, never act(gate).
#include "llmkern/registration.h"

LLMKERN_LIBRARY_FRAGMENT(m) {
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("_swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor grad_up)");
  m.def("geglu(Tensor gate, Tensor up, str approximate) -> Tensor");
  m.def("_geglu_backward(Tensor grad_out, Tensor gate, Tensor up, str approximate) "
        "-> (Tensor grad_gate, Tensor grad_up)");
}
