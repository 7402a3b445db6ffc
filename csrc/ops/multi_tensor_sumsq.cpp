// Schema of multi_tensor_sumsq: the sum of squares of every element of every tensor, as a float64
// tensor of one element (inf/nan when any element is, and only then). The optimizers' overflow check
// and gradient norm: one read of the gradients. float64 because a finite fp32 or bf16 gradient above
// 1.8e19 has a square past fp32's 3.4e38: an fp32 result was inf, and the optimizers skipped the step
// as an overflow; the largest finite sum (2^31 squares of 3.4e38, 2.5e86) is far inside double's range. On the CPU torch's _foreach_norm of fp16 tensors runs at
// 0.26 GB/s here (121 ms for 16Mi fp16 values, 6x a full in-place axpy over fp32), which made the
// check cost more than the fused AdamW step itself.
#include "llmkern/registration.h"

LLMKERN_LIBRARY_FRAGMENT(m) { m.def("multi_tensor_sumsq(Tensor[] tensors) -> Tensor"); }
