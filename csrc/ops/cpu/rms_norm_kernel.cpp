// CPU implementation of RMSNorm with the optional fused residual add (schema: csrc/ops/rms_norm.cpp).
//
// All math in fp32, every loop reading and writing the storage type directly (load/store of
// llmkern/cpu_float.h inside the math; g++ 12 vectorizes them for fp32, fp16 and bf16): no row is
// copied to fp32 scratch (the scratch copies made the backward 2x slower than layer_norm's at T = C = 4096).
//   forward   s = round(x + r) (written out), rstd = 1/sqrt(Σ s²/C + eps), y = the convention's scale;
//             a row is read from memory once, its second pass hits L1 (a 4096-float row is 16 KB)
//   backward  n = s·rstd, g = dy·w' (w' = w, or 1 + w for Gemma), dx = rstd·(g - n·Σ(g·n)/C) (+ the
//             residual_out gradient), dw += dy·n (Llama: dy·round(n), the value the forward scaled);
//             kRows rows at a time: one pass per row for Σ(g·n), then one pass over the columns of the
//             kRows rows (in L2) writing dx and adding to dw, read and written once per kRows rows
// dw is summed per thread in blocks of kSumRows rows, the threads' rows added in order after the pass
// (llmkern/cpu_reduce.h: row_blocks, sum_thread_rows, and why).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <string_view>
#include <type_traits>
#include <vector>

#include "llmkern/checks.h"
#include "llmkern/cpu_float.h"
#include "llmkern/cpu_reduce.h"
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

using cpu::kRows;

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  using namespace llmkern::detail;
  TORCH_CHECK(x.dim() == 2 && x.size(1) >= 1, op, ": x must be 2-D (T, C) with C >= 1, got shape ", x.sizes());
  check_float_dtype(x, "rms_norm: x", /*allow_double=*/false);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), op, ": weight has shape ", weight.sizes(),
              "; expected (C,) = (", x.size(1), ",)");
  check_same_dtype(x, "x", weight, "weight");
  check_same_device(x, "x", weight, "weight");
}

// v as the storage type would hold it (identity for fp32).
template <class S>
inline float rounded(float v) {
  return cpu::load<S>(cpu::store<S>(v));
}

// fp16 goes through fp32 scratch converted with F16C (to_f32/from_f32<half>): load/store<half> inside
// the loops are 10-12 integer ops each (llmkern/cpu_float.h), and the inline fp16 forward (with the
// rounding of x + r and of the Llama x̂ inline too) ran at 1.20 ns per element against 0.98 for the
// scratch copies, 2.54 against 1.53 with a residual (T = C = 4096, one thread). bf16's load is one shift
// and its store a few integer ops: bf16 stays inline. The backward row functions load the array type
// row_t<S> (S, or float for fp16 scratch) and round as the storage type S.
template <class S>
constexpr bool kViaF32 = std::is_same_v<S, cpu::half>;
template <class S>
using row_t = std::conditional_t<kViaF32<S>, float, S>;

// One row, inline loads and stores of S (fp32 and bf16).
template <class S, bool kLlama, bool kRes>
inline void forward_row(const cpu::raw_t<S>* __restrict xr, const cpu::raw_t<S>* __restrict rr,
                        const float* __restrict w, int64_t C, float eps, cpu::raw_t<S>* __restrict yr,
                        cpu::raw_t<S>* __restrict ro, float& rstd_out) {
  using cpu::load;
  using cpu::store;
  // s: x, or the rounded sum x + r, written out as residual_out and read back from L1 below.
  const cpu::raw_t<S>* __restrict sr = xr;
  float ss = 0.f;
  if constexpr (kRes) {
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < C; ++c) {
      const cpu::raw_t<S> v = store<S>(load<S>(xr[c]) + load<S>(rr[c]));
      ro[c] = v;
      ss += load<S>(v) * load<S>(v);
    }
    sr = ro;
  } else {
    ss = cpu::lane_sum(C, [&](int64_t c) { return load<S>(xr[c]) * load<S>(xr[c]); });
  }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
  rstd_out = r;
  if constexpr (kLlama) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yr[c] = store<S>(w[c] * rounded<S>(load<S>(sr[c]) * r));
  } else {  // w is 1 + weight (prepared below)
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yr[c] = store<S>(load<S>(sr[c]) * r * w[c]);
  }
}

// One fp16 row through fp32 scratch sp, op (C each) and hp (C halves), every conversion a block one.
template <class S, bool kLlama, bool kRes>
inline void forward_row_f16(const cpu::raw_t<S>* xr, const cpu::raw_t<S>* rr, const float* __restrict w, int64_t C,
                            float eps, cpu::raw_t<S>* yr, cpu::raw_t<S>* ro, float& rstd_out,
                            float* __restrict sp, float* __restrict op, cpu::raw_t<S>* hp) {
  cpu::to_f32<S>(xr, sp, C);
  if constexpr (kRes) {
    cpu::to_f32<S>(rr, op, C);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) sp[c] += op[c];
    cpu::from_f32<S>(sp, ro, C);  // the rounded sum is both the output and the input
    cpu::to_f32<S>(ro, sp, C);
  }
  const float ss = cpu::lane_sum(C, [&](int64_t c) { return sp[c] * sp[c]; });
  const float r = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
  rstd_out = r;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) op[c] = sp[c] * r;
  if constexpr (kLlama) {  // x̂ as fp16 holds it
    cpu::from_f32<S>(op, hp, C);
    cpu::to_f32<S>(hp, op, C);
  }
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) op[c] *= w[c];
  cpu::from_f32<S>(op, yr, C);
}

template <class S, bool kLlama, bool kRes>
void forward(const cpu::raw_t<S>* x, const cpu::raw_t<S>* res, const float* w, int64_t T, int64_t C, float eps,
             cpu::raw_t<S>* y, cpu::raw_t<S>* res_out, float* rstd_out) {
  at::parallel_for(0, T, grain_rows(C), [&](int64_t t0, int64_t t1) {
    const int64_t n = kViaF32<S> ? C : 0;
    std::vector<float> sp(n), op(n);
    std::vector<cpu::raw_t<S>> hp(n);
    for (int64_t t = t0; t < t1; ++t) {
      const cpu::raw_t<S>* rr = kRes ? res + t * C : nullptr;
      cpu::raw_t<S>* ro = kRes ? res_out + t * C : nullptr;
      if constexpr (kViaF32<S>) {
        forward_row_f16<S, kLlama, kRes>(x + t * C, rr, w, C, eps, y + t * C, ro, rstd_out[t], sp.data(), op.data(),
                                         hp.data());
      } else {
        forward_row<S, kLlama, kRes>(x + t * C, rr, w, C, eps, y + t * C, ro, rstd_out[t]);
      }
    }
  });
}

// Rows [t, t + R) of the backward (arrays of type row_t<S>); dw is the thread's current block sum.
// dres: the gradient reaching residual_out from its other uses (kRes), added to dx.
template <class S, int R, bool kLlama, bool kRes>
inline void backward_rows(const cpu::raw_t<row_t<S>>* dy, const cpu::raw_t<row_t<S>>* dres,
                          const cpu::raw_t<row_t<S>>* xs, const float* __restrict w, const float* rstd, int64_t t,
                          int64_t C, cpu::raw_t<row_t<S>>* dx, float* __restrict dw) {
  using L = row_t<S>;
  using cpu::load;
  float r[R], k[R];
  for (int j = 0; j < R; ++j) {
    const cpu::raw_t<L>* __restrict sr = xs + (t + j) * C;
    const cpu::raw_t<L>* __restrict dr = dy + (t + j) * C;
    const float dot = cpu::lane_sum(C, [&](int64_t c) { return load<L>(dr[c]) * w[c] * load<L>(sr[c]); });
    r[j] = rstd[t + j];
    k[j] = dot * r[j] / static_cast<float>(C);
  }
  const cpu::raw_t<L>* __restrict sb = xs + t * C;
  const cpu::raw_t<L>* __restrict dyb = dy + t * C;
  const cpu::raw_t<L>* __restrict drb = kRes ? dres + t * C : nullptr;
  cpu::raw_t<L>* __restrict dxb = dx + t * C;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float wc = w[c];
    float a = 0.f;
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      const float d = load<L>(dyb[j * C + c]);
      const float n = load<L>(sb[j * C + c]) * r[j];
      // dw sees the rounded normalized value the Llama forward multiplied; dx the exact one.
      a += d * (kLlama ? rounded<S>(n) : n);
      float g = r[j] * (d * wc - n * k[j]);
      if constexpr (kRes) g += load<L>(drb[j * C + c]);
      dxb[j * C + c] = cpu::store<L>(g);
    }
    dw[c] += a;
  }
}

// partials: one row of C floats per thread, zero on entry.
template <class S, bool kLlama, bool kRes>
void backward(const cpu::raw_t<S>* dy, const cpu::raw_t<S>* dres, const cpu::raw_t<S>* xs, const float* w,
              const float* rstd, int64_t T, int64_t C, cpu::raw_t<S>* dx, float* partials, int64_t threads) {
  at::parallel_for(0, T, grain_rows(C), [&](int64_t t0, int64_t t1) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "_rms_norm_backward: thread ", tid, " of ", threads);
    float* __restrict total = partials + tid * C;
    std::vector<float> block(C, 0.f);
    float* __restrict dw = block.data();
    // fp16: the rows of a step through fp32 scratch (kViaF32).
    const int64_t n = kViaF32<S> ? kRows * C : 0;
    std::vector<float> ss(n), ds(n), drs(kRes ? n : 0), dxs(n);
    const auto rows = [&](auto rn, int64_t t) {
      constexpr int R = decltype(rn)::value;
      if constexpr (kViaF32<S>) {
        cpu::to_f32<S>(xs + t * C, ss.data(), R * C);
        cpu::to_f32<S>(dy + t * C, ds.data(), R * C);
        if constexpr (kRes) cpu::to_f32<S>(dres + t * C, drs.data(), R * C);
        backward_rows<S, R, kLlama, kRes>(ds.data(), drs.data(), ss.data(), w, rstd + t, 0, C, dxs.data(), dw);
        cpu::from_f32<S>(dxs.data(), dx + t * C, R * C);
      } else {
        backward_rows<S, R, kLlama, kRes>(dy, dres, xs, w, rstd, t, C, dx, dw);
      }
    };
    cpu::row_blocks(t0, t1, rows, [&] { cpu::flush_block(total, dw, C); });
  });
}

// Calls f(std::bool_constant<llama>, std::bool_constant<residual>) for the run-time flags.
template <class F>
void with_flags(bool llama, bool residual, F&& f) {
  if (llama) {
    residual ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  } else {
    residual ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
  }
}

// The weight as the kernels use it, in fp32 host memory: w (Llama) or 1 + w (Gemma). A host loop over
// C values, not tensor ops: at C = 512 the .to(float) and + 1 ops were a visible share of a call.
template <class S>
std::vector<float> scale_of(const at::Tensor& weight, Convention conv) {
  const at::Tensor wc = weight.contiguous();
  const cpu::raw_t<S>* p = cpu::ptr<S>(wc);
  const int64_t C = wc.numel();
  std::vector<float> w(C);
  const float add = conv == Convention::kGemma ? 1.f : 0.f;
  for (int64_t c = 0; c < C; ++c) w[c] = cpu::load<S>(p[c]) + add;
  return w;
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
  at::Tensor y = at::empty({T, C}, x.options());
  at::Tensor res_out = at::empty({residual.has_value() ? T : 0, residual.has_value() ? C : 0}, x.options());
  at::Tensor rstd = at::empty({T}, x.options().dtype(at::kFloat));
  cpu::with_float_type(x.scalar_type(), "rms_norm_cpu", [&](auto tag) {
    using S = decltype(tag);
    const std::vector<float> w = scale_of<S>(weight, conv);
    with_flags(conv == Convention::kLlama, rc.defined(), [&](auto llama, auto res) {
      forward<S, llama, res>(cpu::ptr<S>(xc), res ? cpu::ptr<S>(rc) : nullptr, w.data(), T, C, static_cast<float>(eps),
                             cpu::ptr<S>(y), res ? cpu::ptr<S>(res_out) : nullptr, rstd.data_ptr<float>());
    });
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
  at::Tensor dx = at::empty({T, C}, xs.options());
  at::Tensor dw = at::empty({C}, xs.options());
  const int64_t threads = at::get_num_threads();
  // Per-thread dw rows, summed in thread order below: plain host memory, no tensor ops per call.
  std::vector<float> partials(threads * C, 0.f);
  cpu::with_float_type(xs.scalar_type(), "rms_norm_backward_cpu", [&](auto tag) {
    using S = decltype(tag);
    const std::vector<float> w = scale_of<S>(weight, conv);
    with_flags(conv == Convention::kLlama, drc.defined(), [&](auto llama, auto res) {
      backward<S, llama, res>(cpu::ptr<S>(dyc), res ? cpu::ptr<S>(drc) : nullptr, cpu::ptr<S>(xsc), w.data(),
                              rc.data_ptr<float>(), T, C, cpu::ptr<S>(dx), partials.data(), threads);
    });
    cpu::sum_thread_rows(partials.data(), threads, C);
    cpu::from_f32<S>(partials.data(), cpu::ptr<S>(dw), C);
  });
  return {dx, dw};
}

LLMKERN_CPU_IMPL(m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("_rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace llmkern::ops
