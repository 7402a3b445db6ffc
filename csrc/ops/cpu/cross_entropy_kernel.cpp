// CPU implementation of the cross-entropy (schema: csrc/ops/cross_entropy.cpp) and its row kernel,
// which fused_linear_cross_entropy_kernel.cpp reuses (csrc/ops/cross_entropy.h).
//
// Per row of V logits, in blocks of cpu::kBlock = 512 converted to fp32 scratch (L1-resident):
//   pass 1  online softmax: running max m and Σ exp(x - m), rescaled when the max grows, plus Σ x
//           for label smoothing; lse = m + log Σ
//   pass 2  (the gradient) d[v] = exp(x[v] - lse)·(1 + 2z·lse) - ε/V - (1-ε)·[v == y], times the
//           row's scale, written in the logits' dtype: by the backward op from the saved lse, or by
//           fused_linear_cross_entropy right after pass 1 over its logits chunk (then from L2: a bf16
//           row at V = 128K is 256 KiB). exp is cpu::exp_approx (llmkern/cpu_math.h): with libm's expf the loop stays
// scalar.
#include "../cross_entropy.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "llmkern/checks.h"
#include "llmkern/cpu_float.h"
#include "llmkern/cpu_math.h"
#include "llmkern/registration.h"

namespace llmkern::ops {
namespace detail {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rows per task: ≥ 64K elements (below, waking the OpenMP pool costs more; rms_norm_kernel.cpp).
int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

// Pass 1 over one row: losses and lse.
template <class S>
inline void loss_row(const cpu::raw_t<S>* row, int64_t V, int64_t y, const CrossEntropyParams& p, float* buf,
                     float& loss, float& lse) {
  constexpr int64_t B = cpu::kBlock;
  float m = kNegInf, s = 0.f, sx = 0.f;
  for (int64_t v0 = 0; v0 < V; v0 += B) {
    const int64_t len = std::min(B, V - v0);
    const float* xb = cpu::f32_view<S>(row, v0, len, buf);
    float bm = kNegInf, bx = 0.f;
#pragma omp simd reduction(max : bm) reduction(+ : bx)
    for (int64_t i = 0; i < len; ++i) {
      bm = std::max(bm, xb[i]);
      bx += xb[i];
    }
    sx += bx;
    if (bm == kNegInf) continue;  // an all -inf block adds exp(-inf) = 0 (and would make -inf - -inf)
    if (bm > m) {
      s *= cpu::exp_approx(m - bm);
      m = bm;
    }
    float bs = 0.f;
    const float mm = m;
#pragma omp simd reduction(+ : bs)
    for (int64_t i = 0; i < len; ++i) bs += cpu::exp_approx(xb[i] - mm);
    s += bs;
  }
  const float eps = p.label_smoothing, z = p.z_loss;
  lse = m + std::log(s);
  const float xy = cpu::load<S>(row[y]);
  loss = (1.f - eps) * (lse - xy) + (eps > 0.f ? eps * (lse - sx / static_cast<float>(V)) : 0.f) +
         (z > 0.f ? z * lse * lse : 0.f);
}

// Pass 2 over one row: out = scale·(exp(x - lse)·(1 + 2z·lse) - ε/V - (1-ε)·[v == y]), rounded once.
// out may be the row itself: each block is read before it is written.
template <class S>
inline void grad_row(const cpu::raw_t<S>* row, int64_t V, int64_t y, float lse, float scale,
                     const CrossEntropyParams& p, float* buf, float* tmp, cpu::raw_t<S>* out) {
  constexpr int64_t B = cpu::kBlock;
  const float eps = p.label_smoothing;
  const float coef = (1.f + 2.f * p.z_loss * lse) * scale, shift = eps / static_cast<float>(V) * scale;
  for (int64_t v0 = 0; v0 < V; v0 += B) {
    const int64_t len = std::min(B, V - v0);
    const float* xb = cpu::f32_view<S>(row, v0, len, buf);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) tmp[i] = cpu::exp_approx(xb[i] - lse) * coef - shift;
    if (y >= v0 && y < v0 + len) tmp[y - v0] -= (1.f - eps) * scale;
    cpu::from_f32<S>(tmp, out + v0, len);
  }
}

template <class S>
void rows(const cpu::raw_t<S>* logits, int64_t ld, const int64_t* labels, int64_t T, int64_t V,
          const CrossEntropyParams& p, float* losses, float* lse_out, cpu::raw_t<S>* grad, int64_t ldg,
          const float* row_scale) {
  at::parallel_for(0, T, grain_rows(V), [&](int64_t t0, int64_t t1) {
    alignas(64) float buf[cpu::kBlock], tmp[cpu::kBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t y = labels[t];
      if (y == p.ignore_index) {
        losses[t] = 0.f;
        lse_out[t] = 0.f;
        if (grad) std::fill(grad + t * ldg, grad + t * ldg + V, cpu::store<S>(0.f));
        continue;
      }
      loss_row<S>(logits + t * ld, V, y, p, buf, losses[t], lse_out[t]);
      if (grad) grad_row<S>(logits + t * ld, V, y, lse_out[t], row_scale ? row_scale[t] : 1.f, p, buf, tmp,
                            grad + t * ldg);
    }
  });
}

template <class S>
void grad_rows(const cpu::raw_t<S>* logits, int64_t ld, const int64_t* labels, const float* lse, int64_t T, int64_t V,
               const CrossEntropyParams& p, cpu::raw_t<S>* grad, int64_t ldg, const float* row_scale) {
  at::parallel_for(0, T, grain_rows(V), [&](int64_t t0, int64_t t1) {
    alignas(64) float buf[cpu::kBlock], tmp[cpu::kBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t y = labels[t];
      if (y == p.ignore_index) {
        std::fill(grad + t * ldg, grad + t * ldg + V, cpu::store<S>(0.f));
        continue;
      }
      grad_row<S>(logits + t * ld, V, y, lse[t], row_scale ? row_scale[t] : 1.f, p, buf, tmp, grad + t * ldg);
    }
  });
}

}  // namespace

void check_labels(const at::Tensor& labels, int64_t V, int64_t ignore_index, const char* op) {
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  const at::Tensor bad = (labels != ignore_index) & ((labels < 0) | (labels >= V));
  if (bad.any().item<bool>()) {
    const int64_t i = bad.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK(false, op, ": labels[", i, "] = ", labels[i].item<int64_t>(), " is outside [0, V) = [0, ", V,
                ") and is not ignore_index (", ignore_index, ")");
  }
}

void cross_entropy_grad_rows_cpu(const at::Tensor& logits, const at::Tensor& labels, const float* lse,
                                 const CrossEntropyParams& p, const at::Tensor& grad, const float* row_scale) {
  const int64_t T = logits.size(0), V = logits.size(1);
  const at::Tensor lab = labels.contiguous();
  cpu::with_float_type(logits.scalar_type(), "cross_entropy_backward_cpu", [&](auto tag) {
    using S = decltype(tag);
    grad_rows<S>(cpu::ptr<S>(logits), logits.stride(0), lab.data_ptr<int64_t>(), lse, T, V, p, cpu::ptr<S>(grad),
                 grad.stride(0), row_scale);
  });
}

void cross_entropy_rows_cpu(const at::Tensor& logits, const at::Tensor& labels, const CrossEntropyParams& p,
                            float* losses, float* lse, const at::Tensor& grad, const float* row_scale) {
  const int64_t T = logits.size(0), V = logits.size(1);
  const at::Tensor lab = labels.contiguous();
  cpu::with_float_type(logits.scalar_type(), "cross_entropy_cpu", [&](auto tag) {
    using S = decltype(tag);
    rows<S>(cpu::ptr<S>(logits), logits.stride(0), lab.data_ptr<int64_t>(), T, V, p, losses, lse,
            grad.defined() ? cpu::ptr<S>(grad) : nullptr, grad.defined() ? grad.stride(0) : 0, row_scale);
  });
}

namespace {

CrossEntropyParams params_of(int64_t ignore_index, double smoothing, double z_loss) {
  return {ignore_index, static_cast<float>(smoothing), static_cast<float>(z_loss)};
}

void check_options(double label_smoothing, double z_loss, const char* op) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  TORCH_CHECK(z_loss >= 0.0, op, ": z_loss must be >= 0, got ", z_loss);
}

void check_logits(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  using namespace llmkern::detail;
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, op, ": logits must be 2-D (T, V) with V >= 1, got shape ",
              logits.sizes());
  check_float_dtype(logits, "cross_entropy: logits", /*allow_double=*/false);
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, op, ": logits must have a unit last stride, got strides ",
              logits.strides());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op, ": labels has shape ", labels.sizes(),
              "; expected (T,) = (", logits.size(0), ",)");
  check_same_device(logits, "logits", labels, "labels");
}

}  // namespace
}  // namespace detail

std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                     int64_t ignore_index, double label_smoothing, double z_loss) {
  using namespace detail;
  check_logits(logits, labels, "cross_entropy");
  check_options(label_smoothing, z_loss, "cross_entropy");
  const int64_t T = logits.size(0), V = logits.size(1);
  check_labels(labels, V, ignore_index, "cross_entropy");
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor losses = at::empty({T}, f32), lse = at::empty({T}, f32);
  cross_entropy_rows_cpu(logits, labels, params_of(ignore_index, label_smoothing, z_loss), losses.data_ptr<float>(),
                         lse.data_ptr<float>(), at::Tensor(), nullptr);
  return {losses, lse};
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_losses, const at::Tensor& logits, const at::Tensor& labels,
                                      const at::Tensor& lse, int64_t ignore_index, double label_smoothing,
                                      double z_loss) {
  using namespace detail;
  check_logits(logits, labels, "_cross_entropy_backward");
  check_options(label_smoothing, z_loss, "_cross_entropy_backward");
  const int64_t T = logits.size(0), V = logits.size(1);
  for (const auto& [t, name] : {std::pair{&grad_losses, "grad_losses"}, std::pair{&lse, "lse"}}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == T && t->scalar_type() == at::kFloat, "_cross_entropy_backward: ", name,
                " has shape ", t->sizes(), " and dtype ", t->scalar_type(), "; expected (T,) = (", T,
                ",) and float32");
    llmkern::detail::check_same_device(logits, "logits", *t, name);
  }
  check_labels(labels, V, ignore_index, "_cross_entropy_backward");
  const at::Tensor go = grad_losses.contiguous(), ls = lse.contiguous();
  at::Tensor grad = at::empty({T, V}, logits.options());
  cross_entropy_grad_rows_cpu(logits, labels, ls.data_ptr<float>(), params_of(ignore_index, label_smoothing, z_loss),
                              grad, go.data_ptr<float>());
  return grad;
}

LLMKERN_CPU_IMPL(m) {
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("_cross_entropy_backward", &cross_entropy_backward_cpu);
}

}  // namespace llmkern::ops
