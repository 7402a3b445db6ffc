// CPU implementation of RMSNorm with the optional fused residual add (schema: csrc/ops/rms_norm.cpp).
//
// One pass over the rows in each direction, every row converted to fp32 scratch once (C ≤ a few
// thousand floats: L1/L2-resident), all math in fp32:
//   forward   s = round(x + r) (written out), rstd = 1/sqrt(Σ s²/C + eps), y = the convention's scale
//   backward  n = s·rstd, g = dy·w' (w' = w, or 1 + w for Gemma), dx = rstd·(g - n·Σ(g·n)/C) (+ the
//             residual_out gradient), dw += dy·n (Llama: dy·round(n), the value the forward scaled)
// dw is summed per thread into its own fp32 row of one buffer; the rows are added in order after the
// pass: no atomics, and a result that depends only on the thread count. Within a thread, rows are
// summed in blocks of kSumRows first: a plain running sum over the 1025 rows of one thread had 4.6x
// PyTorch's error in fp32 (its reductions are cascaded), the blocked sum stays under 2x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <string_view>
#include <vector>

#include "llmkern/checks.h"
#include "llmkern/cpu_float.h"
#include "llmkern/registration.h"

namespace llmkern::ops {
namespace detail {
namespace {

enum class Convention { kLlama, kGemma };

Convention parse_convention(c10::string_view c) {
  const std::string_view s(c.data(), c.size());
  if (s == "llama") return Convention::kLlama;
  if (s == "gemma") return Convention::kGemma;
  TORCH_CHECK(false, "rms_norm: convention must be 'llama' or 'gemma', got '", s, "'");
}

// Rows per task: below ~64K elements a pass is a few microseconds, less than waking the OpenMP pool
// (for_each_span in llmkern/cpu_float.h measured 2.2 ms per wake on the shared 2-core machines).
int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(C, 1)); }

// Rows summed into a block sum before it is added to the thread's total (see the file comment).
constexpr int64_t kSumRows = 32;

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  using namespace llmkern::detail;
  TORCH_CHECK(x.dim() == 2 && x.size(1) >= 1, op, ": x must be 2-D (T, C) with C >= 1, got shape ", x.sizes());
  check_float_dtype(x, "rms_norm: x", /*allow_double=*/false);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), op, ": weight has shape ", weight.sizes(),
              "; expected (C,) = (", x.size(1), ",)");
  check_same_dtype(x, "x", weight, "weight");
  check_same_device(x, "x", weight, "weight");
}

// v[0:n] = round_S(v[0:n]): the fp32 values as the storage type would hold them.
template <class S>
inline void round_to(float* v, int64_t n, cpu::raw_t<S>* scratch) {
  if constexpr (!std::is_same_v<S, float>) {
    cpu::from_f32<S>(v, scratch, n);
    cpu::to_f32<S>(scratch, v, n);
  }
}

template <class S>
void forward(const cpu::raw_t<S>* x, const cpu::raw_t<S>* res, const float* w, int64_t T, int64_t C, float eps,
             Convention conv, cpu::raw_t<S>* y, cpu::raw_t<S>* res_out, float* rstd_out) {
  at::parallel_for(0, T, grain_rows(C), [&](int64_t t0, int64_t t1) {
    std::vector<float> s(C), o(C);
    std::vector<cpu::raw_t<S>> scratch(C);
    for (int64_t t = t0; t < t1; ++t) {
      float* sp = s.data();
      float* op = o.data();
      cpu::to_f32<S>(x + t * C, sp, C);
      if (res) {
        cpu::to_f32<S>(res + t * C, op, C);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) sp[c] += op[c];
        cpu::from_f32<S>(sp, res_out + t * C, C);  // the rounded sum is both the output and the input
        cpu::to_f32<S>(res_out + t * C, sp, C);
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < C; ++c) ss += sp[c] * sp[c];
      const float r = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
      rstd_out[t] = r;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) op[c] = sp[c] * r;
      if (conv == Convention::kLlama) round_to<S>(op, C, scratch.data());
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) op[c] *= w[c];  // w is 1 + weight for Gemma (prepared below)
      cpu::from_f32<S>(op, y + t * C, C);
    }
  });
}

template <class S>
void backward(const cpu::raw_t<S>* dy, const cpu::raw_t<S>* dres, const cpu::raw_t<S>* xs, const float* w,
              const float* rstd, int64_t T, int64_t C, Convention conv, cpu::raw_t<S>* dx, float* partials) {
  at::parallel_for(0, T, grain_rows(C), [&](int64_t t0, int64_t t1) {
    float* total = partials + static_cast<int64_t>(at::get_thread_num()) * C;
    std::vector<float> n(C), g(C), d(C), block(C, 0.f);
    std::vector<cpu::raw_t<S>> scratch(C);
    float* dw = block.data();
    for (int64_t t = t0; t < t1; ++t) {
      float* np = n.data();
      float* gp = g.data();
      float* dp = d.data();
      const float r = rstd[t];
      cpu::to_f32<S>(xs + t * C, np, C);
      cpu::to_f32<S>(dy + t * C, dp, C);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) np[c] *= r;
      if (conv == Convention::kLlama) {
        // dw sees the rounded normalized value the forward multiplied; g uses the exact one.
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) gp[c] = np[c];
        round_to<S>(gp, C, scratch.data());
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dw[c] += dp[c] * gp[c];
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dw[c] += dp[c] * np[c];
      }
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < C; ++c) {
        gp[c] = dp[c] * w[c];
        dot += gp[c] * np[c];
      }
      const float k = dot / static_cast<float>(C);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dp[c] = r * (gp[c] - np[c] * k);
      if (dres) {
        cpu::to_f32<S>(dres + t * C, gp, C);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dp[c] += gp[c];
      }
      cpu::from_f32<S>(dp, dx + t * C, C);
      if ((t - t0) % kSumRows == kSumRows - 1 || t == t1 - 1) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          total[c] += dw[c];
          dw[c] = 0.f;
        }
      }
    }
  });
}

// The weight as the kernels use it, in fp32: w (Llama) or 1 + w (Gemma).
at::Tensor scale_of(const at::Tensor& weight, Convention conv) {
  at::Tensor w = weight.to(at::kFloat);
  return (conv == Convention::kGemma ? w + 1.0 : w).contiguous();
}

}  // namespace
}  // namespace detail

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                           c10::string_view convention,
                                                           const std::optional<at::Tensor>& residual) {
  using namespace detail;
  check_inputs(x, weight, "rms_norm");
  const Convention conv = parse_convention(convention);
  TORCH_CHECK(eps >= 0.0, "rms_norm: eps must be >= 0, got ", eps);
  const int64_t T = x.size(0), C = x.size(1);
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "rms_norm: residual has shape ", residual->sizes(),
                "; expected x's shape ", x.sizes());
    llmkern::detail::check_same_dtype(x, "x", *residual, "residual");
    llmkern::detail::check_same_device(x, "x", *residual, "residual");
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor rc = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::Tensor w = scale_of(weight, conv);
  at::Tensor y = at::empty({T, C}, x.options());
  at::Tensor res_out = at::empty({residual.has_value() ? T : 0, residual.has_value() ? C : 0}, x.options());
  at::Tensor rstd = at::empty({T}, x.options().dtype(at::kFloat));
  cpu::with_float_type(x.scalar_type(), "rms_norm_cpu", [&](auto tag) {
    using S = decltype(tag);
    forward<S>(cpu::ptr<S>(xc), rc.defined() ? cpu::ptr<S>(rc) : nullptr, w.data_ptr<float>(), T, C,
               static_cast<float>(eps), conv, cpu::ptr<S>(y), rc.defined() ? cpu::ptr<S>(res_out) : nullptr,
               rstd.data_ptr<float>());
  });
  return {y, res_out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y,
                                                         const std::optional<at::Tensor>& grad_residual_out,
                                                         const at::Tensor& xs, const at::Tensor& weight,
                                                         const at::Tensor& rstd, c10::string_view convention) {
  using namespace detail;
  using llmkern::detail::check_same_device;
  using llmkern::detail::check_same_dtype;
  check_inputs(xs, weight, "_rms_norm_backward");
  const Convention conv = parse_convention(convention);
  const int64_t T = xs.size(0), C = xs.size(1);
  TORCH_CHECK(grad_y.sizes() == xs.sizes(), "_rms_norm_backward: grad_y has shape ", grad_y.sizes(),
              "; expected ", xs.sizes());
  check_same_dtype(xs, "xs", grad_y, "grad_y");
  check_same_device(xs, "xs", grad_y, "grad_y");
  if (grad_residual_out.has_value()) {
    TORCH_CHECK(grad_residual_out->sizes() == xs.sizes(), "_rms_norm_backward: grad_residual_out has shape ",
                grad_residual_out->sizes(), "; expected ", xs.sizes());
    check_same_dtype(xs, "xs", *grad_residual_out, "grad_residual_out");
    check_same_device(xs, "xs", *grad_residual_out, "grad_residual_out");
  }
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == T && rstd.scalar_type() == at::kFloat,
              "_rms_norm_backward: rstd has shape ", rstd.sizes(), " and dtype ", rstd.scalar_type(),
              "; expected (T,) = (", T, ",) and float32");
  check_same_device(xs, "xs", rstd, "rstd");
  const at::Tensor dyc = grad_y.contiguous(), xsc = xs.contiguous(), rc = rstd.contiguous();
  const at::Tensor drc = grad_residual_out.has_value() ? grad_residual_out->contiguous() : at::Tensor();
  const at::Tensor w = scale_of(weight, conv);
  at::Tensor dx = at::empty({T, C}, xs.options());
  const int64_t threads = T * C < (int64_t{1} << 16) ? 1 : at::get_num_threads();
  at::Tensor partials = at::zeros({threads, C}, xs.options().dtype(at::kFloat));
  cpu::with_float_type(xs.scalar_type(), "rms_norm_backward_cpu", [&](auto tag) {
    using S = decltype(tag);
    backward<S>(cpu::ptr<S>(dyc), drc.defined() ? cpu::ptr<S>(drc) : nullptr, cpu::ptr<S>(xsc),
                w.data_ptr<float>(), rc.data_ptr<float>(), T, C, conv, cpu::ptr<S>(dx), partials.data_ptr<float>());
  });
  at::Tensor dw = threads == 1 ? partials[0] : partials.sum(0);
  return {dx, dw.to(xs.scalar_type(), /*non_blocking=*/false, /*copy=*/true)};
}

LLMKERN_CPU_IMPL(m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("_rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace llmkern::ops
