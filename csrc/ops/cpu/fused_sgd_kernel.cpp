// CPU kernel of fused_sgd_ (schema: csrc/ops/fused_sgd.cpp). One pass: grad, param and momentum
// buffer are read once, param, buffer (and the 16-bit model copy) written once.
#include <ATen/Parallel.h>

#include "../fused_sgd.h"
#include "llmkern/cpu_float.h"
#include "llmkern/optim_math.h"
#include "llmkern/registration.h"

namespace llmkern::ops {
namespace detail {

using namespace llmkern::cpu;

template <class P, class G, class B, class M>
void sgd_span(raw_t<P>* __restrict p, const raw_t<G>* __restrict g, raw_t<B>* __restrict buf,
              raw_t<M>* __restrict copy, int64_t n, float coef, const SgdCoeffs c) {
  // fp32 scratch blocks, as in fused_adamw_kernel.cpp (see kBlock in cpu_float.h)
  alignas(64) float tp[kBlock], tg[kBlock], tb[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    float* __restrict fp = f32_view<P>(p, b, len, tp);
    const float* __restrict fg = f32_view<G>(g, b, len, tg);
    float* __restrict fb = tb;
    if constexpr (!std::is_same_v<B, none>) fb = f32_view<B>(buf, b, len, tb);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) sgd_element(fp[i], fg[i] * coef, fb[i], c);
    f32_writeback<P>(p, b, len, fp);
    if constexpr (!std::is_same_v<B, none>) f32_writeback<B>(buf, b, len, fb);
    if constexpr (!std::is_same_v<M, none>) from_f32<M>(fp, copy + b, len);
  }
}

// f(T{}, pointer) for tensor j of ts, or f(none{}, nullptr) when ts is empty.
template <class F>
void with_optional_type(at::TensorList ts, int64_t j, const char* what, F&& f) {
  if (ts.empty()) return f(none{}, static_cast<raw_t<none>*>(nullptr));
  with_float_type(ts[j].scalar_type(), what, [&](auto t0) { f(t0, ptr<decltype(t0)>(ts[j])); });
}

void sgd_dispatch(const Span& s, at::TensorList params, at::TensorList grads, at::TensorList bufs,
                  at::TensorList copies, float coef, const SgdCoeffs& c) {
  const auto j = s.tensor;
  with_float_type(params[j].scalar_type(), "fused_sgd_: params", [&](auto p0) {
    using P = decltype(p0);
    with_float_type(grads[j].scalar_type(), "fused_sgd_: grads", [&](auto g0) {
      using G = decltype(g0);
      with_optional_type(bufs, j, "fused_sgd_: momentum_buffers", [&](auto b0, auto* buf) {
        using B = decltype(b0);
        with_optional_type(copies, j, "fused_sgd_: model_copies", [&](auto m0, auto* copy) {
          using M = decltype(m0);
          sgd_span<P, G, B, M>(ptr<P>(params[j]) + s.begin, ptr<G>(grads[j]) + s.begin,
                               buf == nullptr ? nullptr : buf + s.begin,
                               copy == nullptr ? nullptr : copy + s.begin, s.count, coef, c);
        });
      });
    });
  });
}

}  // namespace detail

void fused_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList model_copies, const at::Tensor& step, const at::Tensor& found_inf,
                   const at::Tensor& grad_coef, double lr, double momentum, double dampening,
                   double weight_decay, bool nesterov) {
  check_fused_sgd(params, grads, momentum_buffers, model_copies, step, found_inf, grad_coef, lr, momentum,
                  dampening, weight_decay, nesterov);
  if (found_inf.item<float>() != 0.0f) return;
  const double t = step.item<float>();  // >= 1 (check_step)
  const SgdCoeffs c{static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
                    static_cast<float>(weight_decay), nesterov, t == 1.0};
  const float coef = grad_coef.item<float>();
  const auto spans = cpu::make_spans(params);
  cpu::for_each_span(spans, cpu::total_numel(params), [&](const cpu::Span& s) {
    detail::sgd_dispatch(s, params, grads, momentum_buffers, model_copies, coef, c);
  });
}

}  // namespace llmkern::ops

LLMKERN_CPU_IMPL(m) { m.impl("fused_sgd_", &llmkern::ops::fused_sgd_cpu); }
