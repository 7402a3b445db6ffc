// CPU implementation of LayerNorm (schema: csrc/ops/layer_norm.cpp).
//
//   forward   mean, var = Σ(x - mean)²/C (around the mean, as torch: no E[x²] - mean² cancellation),
//             rstd = 1/sqrt(var + eps), y = (x - mean)·rstd·w + b
//   backward  x̂ = (x - mean)·rstd, g = dy·w, dx = rstd·(g - mean_c(g) - x̂·mean_c(g·x̂)),
//             dw += dy·x̂, db += dy
// Every loop reads the storage type directly (load/store of llmkern/cpu_float.h inside the math: g++
// 12 vectorizes these loops for fp32, fp16 and bf16 alike), so no row is copied to fp32 scratch:
// fp32 eager (ATen's fused kernel) runs at the copy bandwidth, and a scratch copy of each row made
// ours 14 % slower in the forward and 35 % in forward+backward at T = C = 4096.
//   forward   three passes over a row: the first reads it from memory, the other two from L1
//             (a 4096-float row is 16 KB), y is written once; the two sums run over 64 lanes
//             (llmkern/cpu_reduce.h), not one vector accumulator's add chain.
//   backward  kRows rows at a time: per row one pass for the two sums of dx (dy and x from memory
//             into L2), then one pass over the columns of the kRows rows that recomputes x̂ and
//             writes dx and adds the rows' dy·x̂ and dy to dw and db: the dw/db accumulators are
//             read and written once per kRows rows, not once per row.
// dw and db are summed per thread in blocks of kSumRows rows, the threads' rows added in order
// afterwards (llmkern/cpu_reduce.h: row_blocks, sum_thread_rows, and why).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "llmkern/checks.h"
#include "llmkern/cpu_float.h"
#include "llmkern/cpu_reduce.h"
#include "llmkern/registration.h"

namespace llmkern::ops {
namespace detail {
namespace {

// Rows per task: below ~64K elements a pass costs less than waking the OpenMP pool (rms_norm_kernel.cpp).
int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(C, 1)); }

using cpu::kRows;

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

// A (C) parameter as fp32: the tensor's own data for fp32, else converted once per call into `own`
// (C values on the host: the inner loops then load one fp32 value, not a 16-bit load and a conversion);
// `fill` in `own` when the parameter is absent.
template <class S>
const float* param(const std::optional<at::Tensor>& v, at::Tensor& keep, std::vector<float>& own, int64_t C,
                   float fill) {
  if (!v.has_value()) {
    own.assign(C, fill);
    return own.data();
  }
  keep = v->contiguous();
  if constexpr (std::is_same_v<S, float>) {
    return keep.data_ptr<float>();
  } else {
    own.resize(C);
    cpu::to_f32<S>(cpu::ptr<S>(keep), own.data(), C);
    return own.data();
  }
}

// fp16 rows go through fp32 scratch converted with F16C (to_f32/from_f32<half>): load/store<half>
// inside the loops are 10-12 integer ops each (llmkern/cpu_float.h) and made the fp16 forward 2.2x
// slower than with the scratch (1.85 vs 0.85 ns per element at T = C = 4096, one thread). bf16's load
// is one shift and its store a few integer ops: bf16 stays inline.
template <class S>
constexpr bool kViaF32 = std::is_same_v<S, cpu::half>;

template <class S>
inline void forward_row(const cpu::raw_t<S>* __restrict xr, const float* __restrict w, const float* __restrict b,
                        int64_t C, float eps, cpu::raw_t<S>* __restrict yr, float& mean_out, float& rstd_out) {
  using cpu::load;
  const float mean = cpu::lane_sum(C, [&](int64_t c) { return load<S>(xr[c]); }) / static_cast<float>(C);
  const float q = cpu::lane_sum(C, [&](int64_t c) {
    const float d = load<S>(xr[c]) - mean;
    return d * d;
  });
  const float r = 1.f / std::sqrt(q / static_cast<float>(C) + eps);
  mean_out = mean;
  rstd_out = r;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) yr[c] = cpu::store<S>((load<S>(xr[c]) - mean) * r * w[c] + b[c]);
}

template <class S>
void forward(const cpu::raw_t<S>* x, const float* w, const float* b, int64_t T, int64_t C, float eps,
             cpu::raw_t<S>* y, float* mean_out, float* rstd_out) {
  at::parallel_for(0, T, grain_rows(C), [&](int64_t t0, int64_t t1) {
    std::vector<float> xs(kViaF32<S> ? C : 0), ys(kViaF32<S> ? C : 0);
    for (int64_t t = t0; t < t1; ++t) {
      if constexpr (kViaF32<S>) {
        cpu::to_f32<S>(x + t * C, xs.data(), C);
        forward_row<float>(xs.data(), w, b, C, eps, ys.data(), mean_out[t], rstd_out[t]);
        cpu::from_f32<S>(ys.data(), y + t * C, C);
      } else {
        forward_row<S>(x + t * C, w, b, C, eps, y + t * C, mean_out[t], rstd_out[t]);
      }
    }
  });
}

// Rows [t, t + R) of the backward; dw and db are the thread's current block sums.
template <class S, int R>
inline void backward_rows(const cpu::raw_t<S>* dy, const cpu::raw_t<S>* x, const float* __restrict w,
                          const float* mean, const float* rstd, int64_t t, int64_t C, cpu::raw_t<S>* dx,
                          float* __restrict dw, float* __restrict db) {
  using cpu::load;
  float m[R], r[R], k1[R], k2[R];
  for (int j = 0; j < R; ++j) {
    const cpu::raw_t<S>* __restrict xr = x + (t + j) * C;
    const cpu::raw_t<S>* __restrict dr = dy + (t + j) * C;
    const float mj = mean[t + j], rj = rstd[t + j];
    float s1, s2;
    cpu::lane_sum2(
        C,
        [&](int64_t c, float& g, float& gx) {
          g = load<S>(dr[c]) * w[c];
          gx = g * ((load<S>(xr[c]) - mj) * rj);
        },
        s1, s2);
    m[j] = mj;
    r[j] = rj;
    k1[j] = s1 / static_cast<float>(C);
    k2[j] = s2 / static_cast<float>(C);
  }
  const cpu::raw_t<S>* __restrict xb = x + t * C;
  const cpu::raw_t<S>* __restrict dyb = dy + t * C;
  cpu::raw_t<S>* __restrict dxb = dx + t * C;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float wc = w[c];
    float a = 0.f, e = 0.f;
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      const float d = load<S>(dyb[j * C + c]);
      const float xh = (load<S>(xb[j * C + c]) - m[j]) * r[j];
      a += d * xh;
      e += d;
      dxb[j * C + c] = cpu::store<S>(r[j] * (d * wc - k1[j] - xh * k2[j]));
    }
    dw[c] += a;
    db[c] += e;
  }
}

// partials: one row of 2·C floats per thread, [dw | db], zero on entry.
template <class S>
void backward(const cpu::raw_t<S>* dy, const cpu::raw_t<S>* x, const float* w, const float* mean,
              const float* rstd, int64_t T, int64_t C, cpu::raw_t<S>* dx, float* partials, int64_t threads) {
  at::parallel_for(0, T, grain_rows(C), [&](int64_t t0, int64_t t1) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "_layer_norm_backward: thread ", tid, " of ", threads);
    float* __restrict total = partials + tid * 2 * C;
    std::vector<float> block(2 * C, 0.f);
    float* dw = block.data();
    float* db = dw + C;
    // fp16: the rows of a step through fp32 scratch (kViaF32).
    std::vector<float> xs(kViaF32<S> ? kRows * C : 0), ds(xs.size()), dxs(xs.size());
    const auto rows = [&](auto n, int64_t t) {
      constexpr int R = decltype(n)::value;
      if constexpr (kViaF32<S>) {
        cpu::to_f32<S>(x + t * C, xs.data(), R * C);
        cpu::to_f32<S>(dy + t * C, ds.data(), R * C);
        backward_rows<float, R>(ds.data(), xs.data(), w, mean + t, rstd + t, 0, C, dxs.data(), dw, db);
        cpu::from_f32<S>(dxs.data(), dx + t * C, R * C);
      } else {
        backward_rows<S, R>(dy, x, w, mean, rstd, t, C, dx, dw, db);
      }
    };
    cpu::row_blocks(t0, t1, rows, [&] { cpu::flush_block(total, block.data(), 2 * C); });
  });
}

}  // namespace
}  // namespace detail

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                             const std::optional<at::Tensor>& bias, double eps) {
  using namespace detail;
  check_inputs(x, weight, bias, "layer_norm");
  TORCH_CHECK(eps >= 0.0, "layer_norm: eps must be >= 0, got ", eps);
  const int64_t T = x.size(0), C = x.size(1);
  const at::Tensor xc = x.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty({T, C}, x.options()), mean = at::empty({T}, f32), rstd = at::empty({T}, f32);
  cpu::with_float_type(x.scalar_type(), "layer_norm_cpu", [&](auto tag) {
    using S = decltype(tag);
    at::Tensor wk, bk;
    std::vector<float> wo, bo;
    const auto* w = param<S>(weight, wk, wo, C, 1.f);
    const auto* b = param<S>(bias, bk, bo, C, 0.f);
    forward<S>(cpu::ptr<S>(xc), w, b, T, C, static_cast<float>(eps), cpu::ptr<S>(y), mean.data_ptr<float>(),
               rstd.data_ptr<float>());
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
  at::Tensor dx = at::empty({T, C}, x.options());
  at::Tensor gw = at::empty({weight.has_value() ? C : 0}, x.options());
  at::Tensor gb = at::empty({has_bias ? C : 0}, x.options());
  const int64_t threads = at::get_num_threads();
  // Per-thread [dw | db] rows, summed in thread order below: plain host memory, no tensor ops per call.
  std::vector<float> partials(threads * 2 * C, 0.f);
  cpu::with_float_type(x.scalar_type(), "layer_norm_backward_cpu", [&](auto tag) {
    using S = decltype(tag);
    at::Tensor wk;
    std::vector<float> wo;
    const auto* w = param<S>(weight, wk, wo, C, 1.f);
    backward<S>(cpu::ptr<S>(dyc), cpu::ptr<S>(xc), w, mc.data_ptr<float>(), rc.data_ptr<float>(), T, C,
                cpu::ptr<S>(dx), partials.data(), threads);
    cpu::sum_thread_rows(partials.data(), threads, 2 * C);
    if (gw.numel()) cpu::from_f32<S>(partials.data(), cpu::ptr<S>(gw), C);
    if (gb.numel()) cpu::from_f32<S>(partials.data() + C, cpu::ptr<S>(gb), C);
  });
  return {dx, gw, gb};
}

LLMKERN_CPU_IMPL(m) {
  m.impl("layer_norm", &layer_norm_cpu);
  m.impl("_layer_norm_backward", &layer_norm_backward_cpu);
}

}  // namespace llmkern::ops
