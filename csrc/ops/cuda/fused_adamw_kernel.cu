// CUDA kernel of fused_adamw_ (schema and argument meanings: csrc/ops/fused_adamw.cpp; element math:
// csrc/include/llmkern/optim_math.h; launch scheme: csrc/include/llmkern/multi_tensor_apply.cuh).
// Also compiled for the CPU under csrc/emu (namespace llmkern_emu), so it has no #ifdef.
//
// No host sync: found_inf, step and grad_coef are read by every block from device memory. On an
// overflow step every block returns after reading 4 bytes, so nothing changes and nothing waits; so
// does a step < 1 (no update is numbered 0: 1 - beta^0 = 0 would divide), which check_step reports.
#include "llmkern/launch.cuh"  // first: under emulation it brings the cuda_runtime.h stand-in
#include "../fused_adamw.h"
#include "llmkern/cuda_float.cuh"
#include "llmkern/multi_tensor_apply.cuh"
#include "llmkern/optim_math.h"
#include "llmkern/registration.h"
#include "llmkern/rng.h"

#include <tuple>

namespace llmkern::ops {
namespace detail {

using namespace llmkern::cuda;
enum AdamList { kP, kG, kM, kV, kVmax, kCopy, kAdamLists };
// 36 tensors: 6 lists x 36 x 8 B + sizes + bases + block map = 3.9 KB of kernel parameters.
using AdamTable = mta::Table<kAdamLists, 36>;

template <class P, class G, class S, class M, bool kDecoupled>
__global__ void fused_adamw_kernel(AdamTable table, const float* step, const float* found_inf,
                                   const float* grad_coef, double lr, double beta1, double beta2, double eps,
                                   double weight_decay, bool stochastic, uint32_t seed_key, uint64_t element_offset) {
  if (*found_inf != 0.0f || !(*step >= 1.0f)) return;
  int t;
  int64_t begin, end;
  mta::block_range(table, t, begin, end);
  const AdamCoeffs c = adam_coeffs(static_cast<double>(*step), lr, beta1, beta2, eps, weight_decay, kDecoupled);
  const float coef = *grad_coef;
  const uint32_t key = rounding_key(seed_key, static_cast<uint32_t>(*step));
  P* p = static_cast<P*>(table.ptr[kP][t]);
  const G* g = static_cast<const G*>(table.ptr[kG][t]);
  S* m = static_cast<S*>(table.ptr[kM][t]);
  S* v = static_cast<S*>(table.ptr[kV][t]);
  S* vmax = static_cast<S*>(table.ptr[kVmax][t]);  // null unless AMSGrad; uniform, never divergent
  M* copy = static_cast<M*>(table.ptr[kCopy][t]);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float pf = to_float(p[i]), mf = to_float(m[i]), vf = to_float(v[i]);
    float xf = vmax != nullptr ? to_float(vmax[i]) : 0.0f;
    adam_element(pf, to_float(g[i]) * coef, mf, vf, vmax != nullptr ? &xf : nullptr, c);
    p[i] = from_float<P>(pf);
    // stochastic is uniform across the launch (a kernel argument): no divergence. Only bf16
    // states are rounded; the draw is rng.h's, bit-identical to the CPU and Triton kernels.
    if (std::is_same_v<S, __nv_bfloat16> && stochastic) {
      const uint32_t h = counter_hash(key, element_offset + static_cast<uint64_t>(table.base[t] + i));
      m[i] = from_float_stochastic<S>(mf, h);
      v[i] = from_float_stochastic<S>(vf, h >> 16);
      if (vmax != nullptr) vmax[i] = from_float_stochastic<S>(xf, h >> 16);  // v's bits: stored max >= stored v
    } else {
      m[i] = from_float<S>(mf);
      v[i] = from_float<S>(vf);
      if (vmax != nullptr) vmax[i] = from_float<S>(xf);
    }
    if constexpr (!std::is_same_v<M, None>) copy[i] = from_float<M>(pf);
  }
}

}  // namespace detail

void fused_adamw_device(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList model_copies,
                        const at::Tensor& step, const at::Tensor& found_inf, const at::Tensor& grad_coef,
                        double lr, double beta1, double beta2, double eps, double weight_decay,
                        bool decoupled_weight_decay, bool stochastic_rounding, int64_t rounding_seed,
                        int64_t element_offset) {
  using namespace detail;
  check_fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies, step, found_inf,
                    grad_coef, lr, beta1, beta2, eps, weight_decay, element_offset);
  LLMKERN_DEVICE_GUARD(step);
  const bool has_copy = !model_copies.empty();
  auto key = [&](size_t j) {
    return std::make_tuple(params[j].scalar_type(), grads[j].scalar_type(), exp_avgs[j].scalar_type(),
                           has_copy ? model_copies[j].scalar_type() : at::kFloat);
  };
  const float* st = step.data_ptr<float>();
  const float* fi = found_inf.data_ptr<float>();
  const float* gc = grad_coef.data_ptr<float>();
  const uint32_t sk = seed_key(rounding_seed);
  const bool sr = stochastic_rounding;
  const uint64_t off = static_cast<uint64_t>(element_offset);
  mta::apply<kAdamLists, 36>(
      {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies}, key,
      [&](const AdamTable& table, int blocks, size_t j) {
        with_type(params[j].scalar_type(), "fused_adamw_: params", [&](auto p0) {
          with_type(grads[j].scalar_type(), "fused_adamw_: grads", [&](auto g0) {
            with_state_type(exp_avgs[j].scalar_type(), [&](auto s0) {
              with_copy_type(has_copy, has_copy ? model_copies[j].scalar_type() : at::kFloat, [&](auto m0) {
                using P = decltype(p0);
                using G = decltype(g0);
                using S = decltype(s0);
                using M = decltype(m0);
                if (decoupled_weight_decay) {
                  LAUNCH((fused_adamw_kernel<P, G, S, M, true>), blocks, mta::kThreads, 0,
                         llmkern::current_stream())(table, st, fi, gc, lr, beta1, beta2, eps, weight_decay, sr, sk, off);
                } else {
                  LAUNCH((fused_adamw_kernel<P, G, S, M, false>), blocks, mta::kThreads, 0,
                         llmkern::current_stream())(table, st, fi, gc, lr, beta1, beta2, eps, weight_decay, sr, sk, off);
                }
                LLMKERN_CUDA_CHECK(cudaGetLastError());
              });
            });
          });
        });
      });
}

}  // namespace llmkern::ops

LLMKERN_DEVICE_IMPL(m) { m.impl("fused_adamw_", &llmkern::ops::fused_adamw_device); }
