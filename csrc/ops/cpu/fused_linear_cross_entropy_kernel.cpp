// CPU implementation of the LM head matmul fused with the cross-entropy
// (schema: csrc/ops/fused_linear_cross_entropy.cpp).
//
// Per chunk of `chunk_size` tokens, in one (chunk, V) buffer reused by every chunk:
//   logits   = hidden_c·Wᵀ                      ATen GEMM in the input dtype (MKL / oneDNN), as lm_head
//   losses, and the gradient d written over the logits in place (cross_entropy_rows_cpu, fp32 math)
//   grad_hidden_c = d·W                         ATen GEMM into the chunk's rows of grad_hidden
//   grad_weight  += dᵀ·hidden_c                 ATen GEMM accumulating into grad_weight (beta = 1)
// The whole (T, V) logits never exist: the extra memory is the one (chunk, V) buffer. The three
// GEMMs are the unfused forward's one and backward's two, so the FLOPs are the same.
// A 16-bit grad_weight summed over several chunks carries a compensation term (see chunks()).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <string_view>

#include "../cross_entropy.h"
#include "llmkern/checks.h"
#include "llmkern/cpu_float.h"
#include "llmkern/registration.h"

namespace llmkern::ops {
namespace detail {
namespace {

struct Shapes {
  int64_t T, C, V;
};

Shapes check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, double smoothing,
                    double z_loss, int64_t chunk_size, const char* op) {
  using namespace llmkern::detail;
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be 2-D (T, C), got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.size(0) >= 1, op, ": weight has shape ",
              weight.sizes(), "; expected (V, C) = (V, ", hidden.size(1), ") with V >= 1");
  check_float_dtype(hidden, "fused_linear_cross_entropy: hidden", /*allow_double=*/false);
  check_same_dtype(hidden, "hidden", weight, "weight");
  check_same_device(hidden, "hidden", weight, "weight");
  check_same_device(hidden, "hidden", labels, "labels");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), op, ": labels has shape ", labels.sizes(),
              "; expected (T,) = (", hidden.size(0), ",)");
  TORCH_CHECK(smoothing >= 0.0 && smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ", smoothing);
  TORCH_CHECK(z_loss >= 0.0, op, ": z_loss must be >= 0, got ", z_loss);
  TORCH_CHECK(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
  return {hidden.size(0), hidden.size(1), weight.size(0)};
}

// hi + lo += part for 16-bit hi, lo, part (n elements): the sum in fp32, hi its rounding, lo the
// rounding of what hi misses. The pair carries ~16 significant bits in bf16 (22 in fp16), so
// grad_weight is rounded to its dtype once in effect, however many chunks add to it.
template <class S>
void add_compensated(cpu::raw_t<S>* hi, cpu::raw_t<S>* lo, const cpu::raw_t<S>* part, int64_t n) {
  constexpr int64_t B = cpu::kBlock;
  at::parallel_for(0, (n + B - 1) / B, 128, [&](int64_t b0, int64_t b1) {
    alignas(64) float a[B], b[B], c[B];
    alignas(64) cpu::raw_t<S> r[B];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * B, len = std::min(B, n - i0);
      cpu::to_f32<S>(hi + i0, a, len);
      cpu::to_f32<S>(lo + i0, b, len);
      cpu::to_f32<S>(part + i0, c, len);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) a[i] += b[i] + c[i];
      cpu::from_f32<S>(a, r, len);
      cpu::to_f32<S>(r, b, len);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) c[i] = a[i] - b[i];
      std::copy(r, r + len, hi + i0);
      cpu::from_f32<S>(c, lo + i0, len);
    }
  });
}

// Rows of grad_weight per compensated update: a (kVocabBlock, C) 16-bit GEMM output at a time, 16 MiB
// at C = 4096, instead of a whole second (V, C) tensor; the GEMMs stay large (kVocabBlock·chunk·C).
constexpr int64_t kVocabBlock = 2048;

// Up to this many chunks a 16-bit grad_weight accumulates without the compensation term: k roundings
// of partial sums add about sqrt(k) half-ulps, within the 3x rule at 4 (the 4-chunk cases of
// tests/ops/test_fused_linear_cross_entropy.py pass uncompensated in fp16 and bf16), and the term
// (V·C·2 bytes: 0.5 GB at V = 128K, C = 2048) would double the op's memory at the chunk sizes
// chunk_size_for picks for T <= C (llmkern/ops/fused_linear_cross_entropy.py).
constexpr int64_t kPlainChunks = 4;

// The chunk loop. row_scale: per-row factors of the gradient (null: 1). Writes losses (T) and,
// where defined, grad_hidden (T, C) and grad_weight (V, C).
// grad_weight sums one GEMM per chunk. In fp32 it accumulates in place (addmm). A 16-bit grad_weight
// rounded once per chunk had 3.9x PyTorch's error in fp16 at 33 chunks (T = 1025, chunks of 32;
// tests/ops/test_fused_linear_cross_entropy.py), so with more than kPlainChunks chunks it carries a
// second 16-bit term (add_compensated): 2 bytes per head parameter more, where an fp32 accumulator
// (and the cast at the end) would take 6.
void chunks(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
            const CrossEntropyParams& p, int64_t chunk_size, const float* row_scale, float* losses,
            const at::Tensor& grad_hidden, const at::Tensor& grad_weight) {
  const int64_t T = hidden.size(0), V = weight.size(0), C = hidden.size(1);
  const bool grads = grad_hidden.defined() || grad_weight.defined();
  if (grad_weight.defined()) grad_weight.zero_();
  if (T == 0) return;
  const int64_t rows = std::min(chunk_size, T);
  const bool compensate =
      grad_weight.defined() && hidden.scalar_type() != at::kFloat && (T + rows - 1) / rows > kPlainChunks;
  at::Tensor buf = at::empty({rows, V}, hidden.options());
  at::Tensor lse = at::empty({rows}, hidden.options().dtype(at::kFloat));
  at::Tensor lo = compensate ? at::zeros({V, C}, hidden.options()) : at::Tensor();
  at::Tensor part = compensate ? at::empty({std::min(kVocabBlock, V), C}, hidden.options()) : at::Tensor();
  const at::Tensor wt = weight.t();
  for (int64_t t0 = 0; t0 < T; t0 += rows) {
    const int64_t n = std::min(rows, T - t0);
    const at::Tensor h = hidden.narrow(0, t0, n);
    at::Tensor logits = buf.narrow(0, 0, n);
    at::mm_out(logits, h, wt);
    cross_entropy_rows_cpu(logits, labels.narrow(0, t0, n), p, losses + t0, lse.data_ptr<float>(),
                           grads ? logits : at::Tensor(), row_scale ? row_scale + t0 : nullptr);
    if (grad_hidden.defined()) {
      at::Tensor gh = grad_hidden.narrow(0, t0, n);
      at::mm_out(gh, logits, weight);
    }
    if (!grad_weight.defined()) continue;
    if (!compensate) {
      grad_weight.addmm_(logits.t(), h);
      continue;
    }
    for (int64_t v0 = 0; v0 < V; v0 += kVocabBlock) {
      const int64_t nv = std::min(kVocabBlock, V - v0);
      at::Tensor pb = part.narrow(0, 0, nv);
      at::mm_out(pb, logits.narrow(1, v0, nv).t(), h);
      cpu::with_float_type(hidden.scalar_type(), "fused_linear_cross_entropy_cpu", [&](auto tag) {
        using S = decltype(tag);
        if constexpr (!std::is_same_v<S, float>) {
          add_compensated<S>(cpu::ptr<S>(grad_weight) + v0 * C, cpu::ptr<S>(lo) + v0 * C, cpu::ptr<S>(pb), nv * C);
        }
      });
    }
  }
}

CrossEntropyParams params_of(int64_t ignore_index, double smoothing, double z_loss) {
  return {ignore_index, static_cast<float>(smoothing), static_cast<float>(z_loss)};
}

}  // namespace
}  // namespace detail

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_cross_entropy_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, int64_t ignore_index,
    double label_smoothing, double z_loss, c10::string_view reduction, int64_t chunk_size, bool grad_hidden,
    bool grad_weight) {
  using namespace detail;
  const Shapes sh = check_inputs(hidden, weight, labels, label_smoothing, z_loss, chunk_size,
                                 "fused_linear_cross_entropy");
  const std::string_view red(reduction.data(), reduction.size());
  TORCH_CHECK(red == "sum" || red == "none", "fused_linear_cross_entropy: reduction must be 'sum' or 'none' (the "
              "Python wrapper forms 'mean'), got '", red, "'");
  check_labels(labels, sh.V, ignore_index, "fused_linear_cross_entropy");
  const bool sum = red == "sum";
  const at::Tensor h = hidden.contiguous(), w = weight.contiguous(), lab = labels.contiguous();
  at::Tensor losses = at::empty({sh.T}, hidden.options().dtype(at::kFloat));
  at::Tensor gh = sum && grad_hidden ? at::empty({sh.T, sh.C}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor gw = sum && grad_weight ? at::empty({sh.V, sh.C}, hidden.options()) : at::empty({0}, hidden.options());
  chunks(h, w, lab, params_of(ignore_index, label_smoothing, z_loss), chunk_size, nullptr, losses.data_ptr<float>(),
         sum && grad_hidden ? gh : at::Tensor(), sum && grad_weight ? gw : at::Tensor());
  return {sum ? losses.sum() : losses, gh, gw};
}

std::tuple<at::Tensor, at::Tensor> fused_linear_cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    int64_t ignore_index, double label_smoothing, double z_loss, int64_t chunk_size, bool grad_hidden,
    bool grad_weight) {
  using namespace detail;
  const Shapes sh = check_inputs(hidden, weight, labels, label_smoothing, z_loss, chunk_size,
                                 "_fused_linear_cross_entropy_backward");
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == sh.T && grad_loss.scalar_type() == at::kFloat,
              "_fused_linear_cross_entropy_backward: grad_loss has shape ", grad_loss.sizes(), " and dtype ",
              grad_loss.scalar_type(), "; expected (T,) = (", sh.T, ",) and float32 (reduction 'none')");
  check_labels(labels, sh.V, ignore_index, "_fused_linear_cross_entropy_backward");
  const at::Tensor h = hidden.contiguous(), w = weight.contiguous(), lab = labels.contiguous();
  const at::Tensor go = grad_loss.contiguous();
  at::Tensor losses = at::empty({sh.T}, hidden.options().dtype(at::kFloat));
  at::Tensor gh = grad_hidden ? at::empty({sh.T, sh.C}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor gw = grad_weight ? at::empty({sh.V, sh.C}, hidden.options()) : at::empty({0}, hidden.options());
  chunks(h, w, lab, params_of(ignore_index, label_smoothing, z_loss), chunk_size, go.data_ptr<float>(),
         losses.data_ptr<float>(), grad_hidden ? gh : at::Tensor(), grad_weight ? gw : at::Tensor());
  return {gh, gw};
}

namespace detail {
namespace {

// The incoming gradient of a "sum" forward as an fp32 scalar (the scale ops' checks).
float scale_of(const at::Tensor& grad_loss, const char* op) {
  TORCH_CHECK(grad_loss.dim() == 0 && grad_loss.scalar_type() == at::kFloat, op,
              ": grad_loss must be a 0-d float32 tensor, got shape ", grad_loss.sizes(), " and dtype ",
              grad_loss.scalar_type());
  return grad_loss.item<float>();
}

// out = t·g in fp32, rounded once to t's dtype; with g inf or NaN zeros stay zero. out may be t.
void scale_into(const at::Tensor& t, float g, at::Tensor& out) {
  const at::Tensor src = t.contiguous();
  const int64_t n = src.numel();
  const bool finite = std::isfinite(g);
  cpu::with_float_type(src.scalar_type(), "fused_linear_cross_entropy_scale_cpu", [&](auto tag) {
    using S = decltype(tag);
    constexpr int64_t B = cpu::kBlock;
    const cpu::raw_t<S>* x = cpu::ptr<S>(src);
    cpu::raw_t<S>* y = cpu::ptr<S>(out);
    at::parallel_for(0, (n + B - 1) / B, 256, [&](int64_t b0, int64_t b1) {
      alignas(64) float a[B];
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t i0 = blk * B, len = std::min(B, n - i0);
        cpu::to_f32<S>(x + i0, a, len);
        if (finite) {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) a[i] *= g;
        } else {
          for (int64_t i = 0; i < len; ++i) a[i] = a[i] == 0.0f ? 0.0f : a[i] * g;
        }
        cpu::from_f32<S>(a, y + i0, len);
      }
    });
  });
}

}  // namespace
}  // namespace detail

std::tuple<at::Tensor, at::Tensor> fused_linear_cross_entropy_scale_cpu(const at::Tensor& grad_hidden,
                                                                         const at::Tensor& grad_weight,
                                                                         const at::Tensor& grad_loss) {
  const float g = detail::scale_of(grad_loss, "_fused_linear_cross_entropy_scale");
  at::Tensor gh = at::empty(grad_hidden.sizes(), grad_hidden.options());
  at::Tensor gw = at::empty(grad_weight.sizes(), grad_weight.options());
  detail::scale_into(grad_hidden, g, gh);
  detail::scale_into(grad_weight, g, gw);
  return {gh, gw};
}

void fused_linear_cross_entropy_scale_inplace_cpu(at::Tensor& grad_hidden, at::Tensor& grad_weight,
                                                  const at::Tensor& grad_loss) {
  const float g = detail::scale_of(grad_loss, "_fused_linear_cross_entropy_scale_");
  for (at::Tensor* t : {&grad_hidden, &grad_weight}) {
    TORCH_CHECK(t->is_contiguous(), "_fused_linear_cross_entropy_scale_: the gradients must be contiguous (the "
                "forward's outputs), got strides ", t->strides());
  }
  detail::scale_into(grad_hidden, g, grad_hidden);
  detail::scale_into(grad_weight, g, grad_weight);
}

LLMKERN_CPU_IMPL(m) {
  m.impl("_fused_linear_cross_entropy_scale", &fused_linear_cross_entropy_scale_cpu);
  m.impl("_fused_linear_cross_entropy_scale_", &fused_linear_cross_entropy_scale_inplace_cpu);
  m.impl("fused_linear_cross_entropy", &fused_linear_cross_entropy_cpu);
  m.impl("_fused_linear_cross_entropy_backward", &fused_linear_cross_entropy_backward_cpu);
}

}  // namespace llmkern::ops
