// CPU kernel of fused_adamw_ (schema and argument meanings: csrc/ops/fused_adamw.cpp).
// One pass over memory: each element's grad, param, m, v are read once and param, m, v (and the
// 16-bit model copy) written once: 28 B/param for fp32, the minimum for an fp32 AdamW step.
#include <ATen/Parallel.h>

#include "../fused_adamw.h"
#include "llmkern/cpu_float.h"
#include "llmkern/optim_math.h"
#include "llmkern/registration.h"
#include "llmkern/rng.h"

namespace llmkern::ops {
namespace detail {

using namespace llmkern::cpu;

// Stochastic rounding of the bf16 states (rng.h): element k of the call draws counter_hash(key, k).
struct Rounding {
  bool stochastic;
  uint32_t key;       // rounding_key(seed_key(seed), step)
  uint64_t counter0;  // the call-wide element index of this span's first element
};

// Writes block [b, b + len) of a bf16 state from fp32 scratch x: stochastically with the draws h
// (bits shift..shift+15), else to nearest.
template <class S>
inline void state_writeback(raw_t<S>* __restrict a, int64_t b, int64_t len, const float* __restrict x,
                            const uint32_t* __restrict h, int shift) {
  if constexpr (std::is_same_v<S, bf16>) {
    if (h != nullptr) {
      for (int64_t i = 0; i < len; ++i) a[b + i] = bf16_bits_stochastic(x[i], h[i] >> shift);
      return;
    }
  }
  f32_writeback<S>(a, b, len, x);
}

template <bool kDecoupled, class P, class G, class S, class M>
void adam_span(raw_t<P>* __restrict p, const raw_t<G>* __restrict g, raw_t<S>* __restrict m,
               raw_t<S>* __restrict v, raw_t<S>* __restrict vmax, raw_t<M>* __restrict copy, int64_t n,
               float coef, const AdamCoeffs c, const Rounding rnd) {
  constexpr bool kAllFloat = std::is_same_v<P, float> && std::is_same_v<G, float> && std::is_same_v<S, float> &&
                             std::is_same_v<M, none>;
  if constexpr (kAllFloat) {
    if (vmax == nullptr) {  // fp32 training: one direct vectorized loop, no scratch
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) adam_element<kDecoupled>(p[i], g[i] * coef, m[i], v[i], nullptr, c);
      return;
    }
  }
  alignas(64) float tp[kBlock], tg[kBlock], tm[kBlock], tv[kBlock], tx[kBlock];
  alignas(64) uint32_t th[kBlock];
  const bool sr = std::is_same_v<S, bf16> && rnd.stochastic;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    if (sr) {
      for (int64_t i = 0; i < len; ++i) th[i] = counter_hash(rnd.key, rnd.counter0 + b + i);
    }
    const uint32_t* h = sr ? th : nullptr;
    float* __restrict fp = f32_view<P>(p, b, len, tp);
    const float* __restrict fg = f32_view<G>(g, b, len, tg);
    float* __restrict fm = f32_view<S>(m, b, len, tm);
    float* __restrict fv = f32_view<S>(v, b, len, tv);
    if (vmax != nullptr) {  // AMSGrad
      float* __restrict fx = f32_view<S>(vmax, b, len, tx);
      for (int64_t i = 0; i < len; ++i) adam_element<kDecoupled>(fp[i], fg[i] * coef, fm[i], fv[i], &fx[i], c);
      state_writeback<S>(vmax, b, len, fx, h, 16);  // v's bits: stored max >= stored v
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) adam_element<kDecoupled>(fp[i], fg[i] * coef, fm[i], fv[i], nullptr, c);
    }
    f32_writeback<P>(p, b, len, fp);
    state_writeback<S>(m, b, len, fm, h, 0);
    state_writeback<S>(v, b, len, fv, h, 16);
    if constexpr (!std::is_same_v<M, none>) from_f32<M>(fp, copy + b, len);
  }
}

// Dispatches on the four storage dtypes of tensor j, then runs one span. The AdamW/Adam switch is
// a template parameter so the inner loop has no branch.
template <bool kDecoupled>
void adam_dispatch(const Span& s, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList vmaxes, at::TensorList copies, float coef,
                   const AdamCoeffs& c, Rounding rnd) {
  const auto j = s.tensor;
  with_float_type(params[j].scalar_type(), "fused_adamw_: params", [&](auto p0) {
    using P = decltype(p0);
    with_float_type(grads[j].scalar_type(), "fused_adamw_: grads", [&](auto g0) {
      using G = decltype(g0);
      with_float_type(exp_avgs[j].scalar_type(), "fused_adamw_: exp_avgs", [&](auto s0) {
        using S = decltype(s0);
        auto run = [&](auto m0, raw_t<decltype(m0)>* copy) {
          using M = decltype(m0);
          adam_span<kDecoupled, P, G, S, M>(ptr<P>(params[j]) + s.begin, ptr<G>(grads[j]) + s.begin,
                                ptr<S>(exp_avgs[j]) + s.begin, ptr<S>(exp_avg_sqs[j]) + s.begin,
                                vmaxes.empty() ? nullptr : ptr<S>(vmaxes[j]) + s.begin,
                                copy == nullptr ? nullptr : copy + s.begin, s.count, coef, c, rnd);
        };
        if (copies.empty()) return run(none{}, nullptr);
        with_float_type(copies[j].scalar_type(), "fused_adamw_: model_copies",
                        [&](auto m0) { run(m0, ptr<decltype(m0)>(copies[j])); });
      });
    });
  });
}

}  // namespace detail

void fused_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList model_copies, const at::Tensor& step,
                     const at::Tensor& found_inf, const at::Tensor& grad_coef, double lr, double beta1,
                     double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                     bool stochastic_rounding, int64_t rounding_seed, int64_t element_offset) {
  check_fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies, step, found_inf, grad_coef, lr,
                    beta1, beta2, eps, weight_decay, element_offset);
  if (found_inf.item<float>() != 0.0f) return;  // overflow: nothing changes
  const double t = step.item<float>();  // >= 1 (check_step)
  const float coef = grad_coef.item<float>();
  const AdamCoeffs c = adam_coeffs(t, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay);
  const uint32_t key = rounding_key(seed_key(rounding_seed), static_cast<uint32_t>(t));
  // Call-wide index of each tensor's first element, plus element_offset.
  std::vector<uint64_t> base(params.size() + 1, static_cast<uint64_t>(element_offset));
  for (size_t j = 0; j < params.size(); ++j) base[j + 1] = base[j] + params[j].numel();
  const auto spans = cpu::make_spans(params);
  cpu::for_each_span(spans, cpu::total_numel(params), [&](const cpu::Span& s) {
    const detail::Rounding rnd{stochastic_rounding, key, base[s.tensor] + static_cast<uint64_t>(s.begin)};
    if (decoupled_weight_decay)
      detail::adam_dispatch<true>(s, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies, coef, c,
                                  rnd);
    else
      detail::adam_dispatch<false>(s, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies, coef, c,
                                   rnd);
  });
}

}  // namespace llmkern::ops

LLMKERN_CPU_IMPL(m) { m.impl("fused_adamw_", &llmkern::ops::fused_adamw_cpu); }
