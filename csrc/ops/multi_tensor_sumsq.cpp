// Schema of multi_tensor_sumsq: the sum of squares of every element of every tensor, as a float32
// tensor of one element (inf/nan when any element is). The optimizers' overflow check and gradient
// norm: one read of the gradients. On the CPU torch's _foreach_norm of fp16 tensors runs at
// 0.26 GB/s here (121 ms for 16Mi fp16 values, 6x a full in-place axpy over fp32), which made the
// check cost more than the fused AdamW step itself.
#include "llmkern/registration.h"

LLMKERN_LIBRARY_FRAGMENT(m) { m.def("multi_tensor_sumsq(Tensor[] tensors) -> Tensor"); }
