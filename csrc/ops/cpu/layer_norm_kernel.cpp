// CPU implementation of LayerNorm (schema: csrc/ops/layer_norm.cpp).
//
// One pass over the rows in each direction, each row converted to fp32 scratch once:
//   forward   mean, var = Σ(x - mean)²/C (around the mean, as torch: no E[x²] - mean² cancellation),
//             rstd = 1/sqrt(var + eps), y = (x - mean)·rstd·w + b
//   backward  x̂ = (x - mean)·rstd, g = dy·w, dx = rstd·(g - mean_c(g) - x̂·mean_c(g·x̂)),
//             dw += dy·x̂, db += dy
// dw and db are summed per thread into its own fp32 rows of one buffer, added in order afterwards,
// and within a thread over blocks of kSumRows rows first (as in rms_norm_kernel.cpp: a plain running
// sum over a thread's rows is several times less accurate than PyTorch's cascaded reductions).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "llmkern/checks.h"
#include "llmkern/cpu_float.h"
#include "llmkern/registration.h"

namespace llmkern::ops {
namespace detail {
namespace {

// Rows per task: below ~64K elements a pass costs less than waking the OpenMP pool (rms_norm_kernel.cpp).
int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(C, 1)); }

constexpr int64_t kSumRows = 32;

void check_vec(const at::Tensor& x, const std::optional<at::Tensor>& v, const char* name) {
  if (!v.has_value()) return;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == x.size(1), "layer_norm: ", name, " has shape ", v->sizes(),
              "; expected (C,) = (", x.size(1), ",)");
  llmkern::detail::check_same_dtype(x, "x", *v, name);
  llmkern::detail::check_same_device(x, "x", *v, name);
}

void check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) >= 1, op, ": x must be 2-D (T, C) with C >= 1, got shape ", x.sizes());
  llmkern::detail::check_float_dtype(x, "layer_norm: x", /*allow_double=*/false);
  check_vec(x, weight, "weight");
  check_vec(x, bias, "bias");
  TORCH_CHECK(!bias.has_value() || weight.has_value(), op, ": a bias needs a weight (as nn.LayerNorm's "
              "elementwise_affine)");
}

template <class S>
void forward(const cpu::raw_t<S>* x, const float* w, const float* b, int64_t T, int64_t C, float eps,
             cpu::raw_t<S>* y, float* mean_out, float* rstd_out) {
  at::parallel_for(0, T, grain_rows(C), [&](int64_t t0, int64_t t1) {
    std::vector<float> v(C);
    for (int64_t t = t0; t < t1; ++t) {
      float* vp = v.data();
      cpu::to_f32<S>(x + t * C, vp, C);
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < C; ++c) s += vp[c];
      const float mean = s / static_cast<float>(C);
      float q = 0.f;
#pragma omp simd reduction(+ : q)
      for (int64_t c = 0; c < C; ++c) q += (vp[c] - mean) * (vp[c] - mean);
      const float r = 1.f / std::sqrt(q / static_cast<float>(C) + eps);
      mean_out[t] = mean;
      rstd_out[t] = r;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) vp[c] = (vp[c] - mean) * r * w[c] + b[c];
      cpu::from_f32<S>(vp, y + t * C, C);
    }
  });
}

// partials: one row of 2·C floats per thread, [dw | db].
template <class S>
void backward(const cpu::raw_t<S>* dy, const cpu::raw_t<S>* x, const float* w, const float* mean, const float* rstd,
              int64_t T, int64_t C, cpu::raw_t<S>* dx, float* partials) {
  at::parallel_for(0, T, grain_rows(C), [&](int64_t t0, int64_t t1) {
    float* total = partials + static_cast<int64_t>(at::get_thread_num()) * 2 * C;
    std::vector<float> xh(C), d(C), block(2 * C, 0.f);
    float* dw = block.data();
    float* db = dw + C;
    for (int64_t t = t0; t < t1; ++t) {
      float* xp = xh.data();
      float* dp = d.data();
      const float m = mean[t], r = rstd[t];
      cpu::to_f32<S>(x + t * C, xp, C);
      cpu::to_f32<S>(dy + t * C, dp, C);
      float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t c = 0; c < C; ++c) {
        const float xn = (xp[c] - m) * r;
        xp[c] = xn;
        dw[c] += dp[c] * xn;
        db[c] += dp[c];
        const float g = dp[c] * w[c];
        dp[c] = g;
        s1 += g;
        s2 += g * xn;
      }
      const float k1 = s1 / static_cast<float>(C), k2 = s2 / static_cast<float>(C);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dp[c] = r * (dp[c] - k1 - xp[c] * k2);
      cpu::from_f32<S>(dp, dx + t * C, C);
      if ((t - t0) % kSumRows == kSumRows - 1 || t == t1 - 1) {
#pragma omp simd
        for (int64_t c = 0; c < 2 * C; ++c) {
          total[c] += dw[c];
          dw[c] = 0.f;
        }
      }
    }
  });
}

at::Tensor f32_or(const std::optional<at::Tensor>& v, const at::Tensor& x, double fill) {
  return v.has_value() ? v->to(at::kFloat).contiguous() : at::full({x.size(1)}, fill, x.options().dtype(at::kFloat));
}

}  // namespace
}  // namespace detail

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                             const std::optional<at::Tensor>& bias, double eps) {
  using namespace detail;
  check_inputs(x, weight, bias, "layer_norm");
  TORCH_CHECK(eps >= 0.0, "layer_norm: eps must be >= 0, got ", eps);
  const int64_t T = x.size(0), C = x.size(1);
  const at::Tensor xc = x.contiguous(), w = f32_or(weight, x, 1.0), b = f32_or(bias, x, 0.0);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty({T, C}, x.options()), mean = at::empty({T}, f32), rstd = at::empty({T}, f32);
  cpu::with_float_type(x.scalar_type(), "layer_norm_cpu", [&](auto tag) {
    using S = decltype(tag);
    forward<S>(cpu::ptr<S>(xc), w.data_ptr<float>(), b.data_ptr<float>(), T, C, static_cast<float>(eps),
               cpu::ptr<S>(y), mean.data_ptr<float>(), rstd.data_ptr<float>());
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                                      const std::optional<at::Tensor>& weight,
                                                                      const at::Tensor& mean, const at::Tensor& rstd,
                                                                      bool has_bias) {
  using namespace detail;
  check_inputs(x, weight, std::nullopt, "_layer_norm_backward");
  const int64_t T = x.size(0), C = x.size(1);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "_layer_norm_backward: grad_y has shape ", grad_y.sizes(), "; expected ",
              x.sizes());
  llmkern::detail::check_same_dtype(x, "x", grad_y, "grad_y");
  llmkern::detail::check_same_device(x, "x", grad_y, "grad_y");
  for (const auto& [s, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    TORCH_CHECK(s->dim() == 1 && s->size(0) == T && s->scalar_type() == at::kFloat, "_layer_norm_backward: ", name,
                " has shape ", s->sizes(), " and dtype ", s->scalar_type(), "; expected (T,) = (", T, ",) and float32");
    llmkern::detail::check_same_device(x, "x", *s, name);
  }
  TORCH_CHECK(!has_bias || weight.has_value(), "_layer_norm_backward: has_bias needs a weight");
  const at::Tensor dyc = grad_y.contiguous(), xc = x.contiguous(), mc = mean.contiguous(), rc = rstd.contiguous();
  const at::Tensor w = f32_or(weight, x, 1.0);
  at::Tensor dx = at::empty({T, C}, x.options());
  const int64_t threads = T * C < (int64_t{1} << 16) ? 1 : at::get_num_threads();
  at::Tensor partials = at::zeros({threads, 2 * C}, x.options().dtype(at::kFloat));
  cpu::with_float_type(x.scalar_type(), "layer_norm_backward_cpu", [&](auto tag) {
    using S = decltype(tag);
    backward<S>(cpu::ptr<S>(dyc), cpu::ptr<S>(xc), w.data_ptr<float>(), mc.data_ptr<float>(), rc.data_ptr<float>(), T,
                C, cpu::ptr<S>(dx), partials.data_ptr<float>());
  });
  const at::Tensor sum = threads == 1 ? partials[0] : partials.sum(0);
  const auto cast = [&](const at::Tensor& t) { return t.to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true); };
  at::Tensor gw = weight.has_value() ? cast(sum.narrow(0, 0, C)) : at::empty({0}, x.options());
  at::Tensor gb = has_bias ? cast(sum.narrow(0, C, C)) : at::empty({0}, x.options());
  return {dx, gw, gb};
}

LLMKERN_CPU_IMPL(m) {
  m.impl("layer_norm", &layer_norm_cpu);
  m.impl("_layer_norm_backward", &layer_norm_backward_cpu);
}

}  // namespace llmkern::ops
