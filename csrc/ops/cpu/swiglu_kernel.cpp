// CPU implementation of the gated activations swiglu and geglu (schema: csrc/ops/swiglu.cpp).
//
// Element-wise, in blocks of cpu::kBlock = 512 elements converted to fp32 scratch (L1-resident):
//   forward   out = act(gate)·up
//   backward  grad_gate = grad·up·act'(gate),  grad_up = grad·act(gate)   (act recomputed from gate)
// act is silu, gelu (erf) or gelu with the tanh approximation, through the vectorizable fp32 math of
// llmkern/cpu_math.h (a loop calling libm's expf/erff stays scalar: 4-13x slower here).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <string_view>

#include "llmkern/checks.h"
#include "llmkern/cpu_float.h"
#include "llmkern/cpu_math.h"
#include "llmkern/registration.h"

namespace llmkern::ops {
namespace detail {
namespace {

enum class Gate { kSilu, kGelu, kGeluTanh };

Gate parse_approximate(c10::string_view a) {
  const std::string_view s(a.data(), a.size());
  if (s == "none") return Gate::kGelu;
  if (s == "tanh") return Gate::kGeluTanh;
  TORCH_CHECK(false, "geglu: approximate must be 'none' or 'tanh', got '", s, "'");
}

constexpr float kSqrtHalf = 0.70710678118654752f;    // 1/√2
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1/√(2π)
constexpr float kTwoSqrt2OverPi = 1.5957691216057308f;  // 2·√(2/π)
constexpr float kGeluCubic = 0.044715f;

// act(z) and act'(z). gelu_tanh uses 0.5·(1 + tanh(v)) = sigmoid(2v), which saturates cleanly.
template <Gate G>
[[gnu::always_inline]] inline void act(float z, float& a, float& da) {
  if constexpr (G == Gate::kSilu) {
    const float s = cpu::sigmoid_approx(z);
    a = z * s;
    da = s * (1.f + z * (1.f - s));
  } else if constexpr (G == Gate::kGelu) {
    const float cdf = 0.5f * (1.f + cpu::erf_approx(z * kSqrtHalf));
    a = z * cdf;
    da = cdf + z * kInvSqrt2Pi * cpu::exp_approx(-0.5f * z * z);
  } else {
    const float s = cpu::sigmoid_approx(kTwoSqrt2OverPi * (z + kGeluCubic * z * z * z));
    a = z * s;
    // d/dz [z·sigmoid(u)] = s + z·s·(1 - s)·u',  u' = 2√(2/π)·(1 + 3·0.044715·z²)
    da = s + z * s * (1.f - s) * kTwoSqrt2OverPi * (1.f + 3.f * kGeluCubic * z * z);
  }
}

template <Gate G>
[[gnu::always_inline]] inline float act_only(float z) {
  if constexpr (G == Gate::kSilu) {
    return z * cpu::sigmoid_approx(z);
  } else if constexpr (G == Gate::kGelu) {
    return 0.5f * z * (1.f + cpu::erf_approx(z * kSqrtHalf));
  } else {
    return z * cpu::sigmoid_approx(kTwoSqrt2OverPi * (z + kGeluCubic * z * z * z));
  }
}

// Blocks per task: 128 blocks of 512 = 64K elements, below which waking the OpenMP pool costs more
// than the work (rms_norm_kernel.cpp).
constexpr int64_t kGrainBlocks = 128;

template <class S, Gate G>
void forward(const cpu::raw_t<S>* gate, const cpu::raw_t<S>* up, cpu::raw_t<S>* out, int64_t n) {
  const int64_t blocks = (n + cpu::kBlock - 1) / cpu::kBlock;
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    alignas(64) float g[cpu::kBlock], u[cpu::kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * cpu::kBlock, len = std::min(cpu::kBlock, n - i0);
      const float* gp = cpu::f32_view<S>(gate, i0, len, g);
      const float* upp = cpu::f32_view<S>(up, i0, len, u);
      if constexpr (std::is_same_v<S, float>) {
        float* o = out + i0;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) o[i] = act_only<G>(gp[i]) * upp[i];
      } else {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) g[i] = act_only<G>(gp[i]) * upp[i];
        cpu::from_f32<S>(g, out + i0, len);
      }
    }
  });
}

template <class S, Gate G>
void backward(const cpu::raw_t<S>* grad, const cpu::raw_t<S>* gate, const cpu::raw_t<S>* up, cpu::raw_t<S>* dgate,
              cpu::raw_t<S>* dup, int64_t n) {
  const int64_t blocks = (n + cpu::kBlock - 1) / cpu::kBlock;
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    alignas(64) float d[cpu::kBlock], g[cpu::kBlock], u[cpu::kBlock], og[cpu::kBlock], ou[cpu::kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * cpu::kBlock, len = std::min(cpu::kBlock, n - i0);
      const float* dp = cpu::f32_view<S>(grad, i0, len, d);
      const float* gp = cpu::f32_view<S>(gate, i0, len, g);
      const float* upp = cpu::f32_view<S>(up, i0, len, u);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        float a, da;
        act<G>(gp[i], a, da);
        og[i] = dp[i] * upp[i] * da;
        ou[i] = dp[i] * a;
      }
      cpu::from_f32<S>(og, dgate + i0, len);
      cpu::from_f32<S>(ou, dup + i0, len);
    }
  });
}

template <class F>
void with_gate(Gate g, F&& f) {
  switch (g) {
    case Gate::kSilu: return f(std::integral_constant<Gate, Gate::kSilu>{});
    case Gate::kGelu: return f(std::integral_constant<Gate, Gate::kGelu>{});
    default: return f(std::integral_constant<Gate, Gate::kGeluTanh>{});
  }
}

void check_pair(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn, const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", an, " and ", bn, " must have the same shape, got ", a.sizes(), " and ",
              b.sizes());
  llmkern::detail::check_same_dtype(a, an, b, bn);
  llmkern::detail::check_same_device(a, an, b, bn);
}

at::Tensor gated_forward(const at::Tensor& gate, const at::Tensor& up, Gate g, const char* op) {
  llmkern::detail::check_float_dtype(gate, op, /*allow_double=*/false);
  check_pair(gate, "gate", up, "up", op);
  const at::Tensor gc = gate.contiguous(), uc = up.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  cpu::with_float_type(gate.scalar_type(), op, [&](auto tag) {
    using S = decltype(tag);
    with_gate(g, [&](auto gt) { forward<S, decltype(gt)::value>(cpu::ptr<S>(gc), cpu::ptr<S>(uc), cpu::ptr<S>(out), gc.numel()); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                                                  Gate g, const char* op) {
  llmkern::detail::check_float_dtype(gate, op, /*allow_double=*/false);
  check_pair(gate, "gate", up, "up", op);
  check_pair(gate, "gate", grad, "grad_out", op);
  const at::Tensor dc = grad.contiguous(), gc = gate.contiguous(), uc = up.contiguous();
  at::Tensor dg = at::empty(gate.sizes(), gate.options()), du = at::empty(gate.sizes(), gate.options());
  cpu::with_float_type(gate.scalar_type(), op, [&](auto tag) {
    using S = decltype(tag);
    with_gate(g, [&](auto gt) {
      backward<S, decltype(gt)::value>(cpu::ptr<S>(dc), cpu::ptr<S>(gc), cpu::ptr<S>(uc), cpu::ptr<S>(dg),
                                       cpu::ptr<S>(du), gc.numel());
    });
  });
  return {dg, du};
}

}  // namespace
}  // namespace detail

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up) {
  return detail::gated_forward(gate, up, detail::Gate::kSilu, "swiglu");
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                       const at::Tensor& up) {
  return detail::gated_backward(grad, gate, up, detail::Gate::kSilu, "_swiglu_backward");
}

at::Tensor geglu_cpu(const at::Tensor& gate, const at::Tensor& up, c10::string_view approximate) {
  return detail::gated_forward(gate, up, detail::parse_approximate(approximate), "geglu");
}

std::tuple<at::Tensor, at::Tensor> geglu_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                      const at::Tensor& up, c10::string_view approximate) {
  return detail::gated_backward(grad, gate, up, detail::parse_approximate(approximate), "_geglu_backward");
}

LLMKERN_CPU_IMPL(m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("_swiglu_backward", &swiglu_backward_cpu);
  m.impl("geglu", &geglu_cpu);
  m.impl("_geglu_backward", &geglu_backward_cpu);
}

}  // namespace llmkern::ops
