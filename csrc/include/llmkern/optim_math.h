// Element math of the fused optimizers, shared bit-for-bit by the C++ CPU kernels and the CUDA
// kernels (and mirrored by triton_kernels/fused_adamw.py and the fp64 references in
// llmkern/ops/fused_adamw.py, fused_sgd.py).
//
// Every update works in fp32 registers whatever the storage dtypes are:
//   g  = grad * grad_coef                    grad_coef = clip_coef / loss_scale (one fp32 scalar)
//   AdamW (decoupled):  p = p * (1 - lr * wd)
//   Adam  (L2):         g = g + wd * p
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g * g
//   p  = p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)      bc_i = 1 - beta_i^t
//   AMSGrad: vmax = max(vmax, v), used in place of v in the line above
// This is torch.optim.AdamW's formula (same eps placement), so fp32 results agree with
// torch's fused AdamW to a few ulps.
#pragma once
#include <cmath>
#include <cstdint>

#include "llmkern/host_device.h"

namespace llmkern {

// Per-step scalars, computed once per launch (host for the CPU kernel, each thread for CUDA,
// because the step count lives in a device tensor and must not be read back by the host).
struct AdamCoeffs {
  float lr, beta1, beta2, eps, weight_decay;
  float one_minus_beta1, one_minus_beta2;
  float step_size;     // lr / bc1
  float inv_sqrt_bc2;  // 1 / sqrt(bc2)
  float decay;         // 1 - lr * wd (decoupled only)
  bool decoupled;
};

// Every derived constant is computed in double from the double hyper-parameters and rounded once.
// Rounding first costs accuracy: 1 - 0.999f is 1.3e-5 off in relative terms (0.999f = 0.99900001),
// which showed up as a 9-ulp error in the parameters after one step against the fp64 reference;
// 1 - 0.9f is 2.4e-7 off. The bias corrections bc_i = 1 - beta_i^t likewise.
LLMKERN_HD AdamCoeffs adam_coeffs(double step, double lr, double beta1, double beta2, double eps,
                                  double weight_decay, bool decoupled) {
  AdamCoeffs c;
  c.lr = static_cast<float>(lr);
  c.beta1 = static_cast<float>(beta1);
  c.beta2 = static_cast<float>(beta2);
  c.eps = static_cast<float>(eps);
  c.weight_decay = static_cast<float>(weight_decay);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  const double bc1 = 1.0 - pow(beta1, step);
  const double bc2 = 1.0 - pow(beta2, step);
  c.step_size = static_cast<float>(lr / bc1);
  c.inv_sqrt_bc2 = static_cast<float>(1.0 / sqrt(bc2));
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.decoupled = decoupled;
  return c;
}

// One element. vmax is null, or AMSGrad's running max of v (then the denominator uses it).
// Every multiply-add is an explicit fmaf, so the compiler has none left to contract: with g++'s
// -ffp-contract=fast (setup.py) the CPU kernel's vector body and its scalar remainder contracted
// differently, so an element's result depended on its position in a 512-element block, and a shard
// stepped with element_offset differed from the whole tensor by 1 ulp in 4 of 3082 parameters
// (tests/ops/test_fused_adamw.py test_shards_draw_the_bits_of_the_whole_tensor). nvcc contracts the
// same pairs by default, so the CUDA kernel's arithmetic is what it was.
template <bool kDecoupled>
LLMKERN_HD void adam_element(float& p, float g, float& m, float& v, float* vmax, const AdamCoeffs& c) {
  if (!kDecoupled) g = fmaf(c.weight_decay, p, g);
  m = fmaf(c.beta1, m, c.one_minus_beta1 * g);
  v = fmaf(c.beta2, v, c.one_minus_beta2 * g * g);
  float vhat = v;
  if (vmax != nullptr) {
    *vmax = *vmax > v ? *vmax : v;
    vhat = *vmax;
  }
  const float denom = fmaf(sqrtf(vhat), c.inv_sqrt_bc2, c.eps);
  const float update = c.step_size * m / denom;
  p = kDecoupled ? fmaf(p, c.decay, -update) : p - update;
}

// The same element with the AdamW/Adam switch read from c. The CPU kernel calls the template above:
// g++ leaves a loop that reads the bool c.decoupled scalar ("no vectype"), and the fp32 step of
// 16 Mi parameters took 39 ms on one Xeon thread against 20 ms with the switch a template constant
// (csrc/ops/cpu/fused_adamw_kernel.cpp).
LLMKERN_HD void adam_element(float& p, float g, float& m, float& v, float* vmax, const AdamCoeffs& c) {
  if (c.decoupled)
    adam_element<true>(p, g, m, v, vmax, c);
  else
    adam_element<false>(p, g, m, v, vmax, c);
}

// SGD with momentum, torch.optim.SGD's formula:
//   g = g + wd * p;  buf = first ? g : momentum * buf + (1 - dampening) * g
//   d = nesterov ? g + momentum * buf : buf;  p = p - lr * d
struct SgdCoeffs {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov, first;  // first: the momentum buffer is initialised to g (torch's rule)
};

LLMKERN_HD void sgd_element(float& p, float g, float& buf, const SgdCoeffs& c) {
  g += c.weight_decay * p;
  float d = g;
  if (c.momentum != 0.0f) {
    buf = c.first ? g : c.momentum * buf + c.one_minus_dampening * g;
    d = c.nesterov ? g + c.momentum * buf : buf;
  }
  p -= c.lr * d;
}

}  // namespace llmkern
