// CPU kernel of fused_sgd_ (schema: csrc/ops/fused_sgd.cpp). One pass: grad, param and momentum
// buffer are read once, param, buffer (and the 16-bit model copy) written once.
#include <ATen/Parallel.h>

#include "llmkern/cpu_float.h"
#include "llmkern/multi_tensor.h"
#include "llmkern/optim_math.h"
#include "llmkern/registration.h"

namespace llmkern::ops {
namespace detail {

using namespace llmkern::cpu;

template <class P, class G, class B, class M>
void sgd_span(P* __restrict p, const G* __restrict g, B* __restrict buf, M* __restrict copy, int64_t n,
              float coef, const SgdCoeffs c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float pf = load(p[i]);
    float bf = 0.0f;
    if constexpr (!std::is_same_v<B, none>) bf = load(buf[i]);
    sgd_element(pf, load(g[i]) * coef, bf, c);
    p[i] = store<P>(pf);
    if constexpr (!std::is_same_v<B, none>) buf[i] = store<B>(bf);
    if constexpr (!std::is_same_v<M, none>) copy[i] = store<M>(pf);
  }
}

template <class F>
void with_optional_type(at::TensorList ts, int64_t j, const char* what, F&& f) {
  if (ts.empty()) return f(static_cast<none*>(nullptr));
  with_float_type(ts[j].scalar_type(), what, [&](auto t0) { f(ptr<decltype(t0)>(ts[j])); });
}

void sgd_dispatch(const Span& s, at::TensorList params, at::TensorList grads, at::TensorList bufs,
                  at::TensorList copies, float coef, const SgdCoeffs& c) {
  const auto j = s.tensor;
  with_float_type(params[j].scalar_type(), "fused_sgd_: params", [&](auto p0) {
    using P = decltype(p0);
    with_float_type(grads[j].scalar_type(), "fused_sgd_: grads", [&](auto g0) {
      using G = decltype(g0);
      with_optional_type(bufs, j, "fused_sgd_: momentum_buffers", [&](auto* buf) {
        using B = std::remove_pointer_t<decltype(buf)>;
        with_optional_type(copies, j, "fused_sgd_: model_copies", [&](auto* copy) {
          using M = std::remove_pointer_t<decltype(copy)>;
          sgd_span<P, G, B, M>(ptr<P>(params[j]) + s.begin, ptr<const G>(grads[j]) + s.begin,
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
  using namespace llmkern::detail;
  const at::Device device = step.device();
  check_scalar_tensor(step, "step", device);
  check_scalar_tensor(found_inf, "found_inf", device);
  check_scalar_tensor(grad_coef, "grad_coef", device);
  check_tensor_lists({params, grads, momentum_buffers, model_copies},
                     {"params", "grads", "momentum_buffers", "model_copies"}, {false, false, true, true},
                     device);
  check_hyper(lr, "lr", 0.0, false, INFINITY, true);
  check_hyper(momentum, "momentum", 0.0, false, 1.0, true);
  check_hyper(dampening, "dampening", 0.0, false, 1.0, false);
  check_hyper(weight_decay, "weight_decay", 0.0, false, INFINITY, true);
  TORCH_CHECK(!nesterov || (momentum > 0.0 && dampening == 0.0),
              "nesterov needs momentum > 0 and dampening == 0, got momentum ", momentum, ", dampening ",
              dampening);
  TORCH_CHECK((momentum == 0.0) == momentum_buffers.empty(),
              "momentum_buffers must be given exactly when momentum > 0 (momentum ", momentum, ", ",
              momentum_buffers.size(), " buffers)");
  for (size_t j = 0; j < model_copies.size(); ++j)
    TORCH_CHECK(params[j].scalar_type() == at::kFloat && model_copies[j].scalar_type() != at::kFloat,
                "with model_copies, params[", j, "] must be the float32 master and model_copies[", j,
                "] float16 or bfloat16, got ", params[j].scalar_type(), " and ", model_copies[j].scalar_type());
  if (found_inf.item<float>() != 0.0f) return;
  const double t = step.item<float>();
  TORCH_CHECK(t >= 1.0, "step must hold the 1-based number of this update, got ", t);
  const SgdCoeffs c{static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
                    static_cast<float>(weight_decay), nesterov, t == 1.0};
  const float coef = grad_coef.item<float>();
  const auto spans = cpu::make_spans(params);
  at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) detail::sgd_dispatch(spans[i], params, grads, momentum_buffers, model_copies, coef, c);
  });
}

}  // namespace llmkern::ops

LLMKERN_CPU_IMPL(m) { m.impl("fused_sgd_", &llmkern::ops::fused_sgd_cpu); }
