// Schema of fused_adamw_: one multi-tensor AdamW/Adam step, in place.
//
//   params        fp32 master weights, or the model's own fp32/fp16/bf16 weights
//   grads         gradients as produced by backward (fp32/fp16/bf16), read once
//   exp_avgs      first moments (fp32, or bf16 to halve the state)
//   exp_avg_sqs   second moments (same dtype as exp_avgs)
//   max_exp_avg_sqs  empty, or AMSGrad's running max of exp_avg_sqs (same dtype); non-empty = AMSGrad
//   model_copies  empty, or the fp16/bf16 model weights, rewritten from the updated fp32 params
//   step          float32[1]: the 1-based step t of this update (the caller has already counted it)
//   found_inf     float32[1]: nonzero means the gradients overflowed; the op then changes nothing
//   grad_coef     float32[1]: every gradient is multiplied by it (= clip_coef / loss_scale)
//   stochastic_rounding  bf16 moments are rounded stochastically instead of to nearest (fp32 states
//                 are unaffected): unbiased, so small updates of v accumulate in expectation
//   rounding_seed the random bits are a function of (rounding_seed, step, element index) only
//                 (csrc/include/llmkern/rng.h), identical on every backend
//   element_offset added to every element's index in the call's concatenated params (>= 0): a 1-D
//                 shard of a flat tensor stepped with element_offset = its start draws the bits the
//                 whole tensor would (ZeRO steps the shards of flat fp32 masters)
// step, found_inf and grad_coef are tensors so that a GPU step never waits for the host. A step < 1
// with found_inf 0 is refused before anything is written (multi_tensor.h check_step).
#include "llmkern/registration.h"

LLMKERN_LIBRARY_FRAGMENT(m) {
  m.def(
      "fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(d!)[] model_copies, Tensor step, Tensor found_inf, Tensor grad_coef, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled_weight_decay, bool stochastic_rounding=False, "
      "int rounding_seed=0, int element_offset=0) -> ()");
}
