// CPU kernel of multi_tensor_sumsq (schema: csrc/ops/multi_tensor_sumsq.cpp). fp32 accumulation
// within a 64Ki-element span (vectorized), double across spans.
#include "llmkern/cpu_float.h"
#include "llmkern/multi_tensor.h"
#include "llmkern/registration.h"

namespace llmkern::ops {
namespace detail {

using namespace llmkern::cpu;

template <class T>
float sumsq_span(const raw_t<T>* __restrict x, int64_t n) {
  float acc = 0.0f;
  if constexpr (std::is_same_v<T, float>) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += x[i] * x[i];
    return acc;
  }
  alignas(64) float t[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    to_f32<T>(x + b, t, len);
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < len; ++i) acc += t[i] * t[i];
  }
  return acc;
}

}  // namespace detail

at::Tensor multi_tensor_sumsq_cpu(at::TensorList tensors) {
  for (size_t j = 0; j < tensors.size(); ++j) {
    TORCH_CHECK(tensors[j].device().is_cpu(), "tensors[", j, "] must be a CPU tensor, got ", tensors[j].device());
    TORCH_CHECK(llmkern::detail::is_optim_float(tensors[j].scalar_type()), "tensors[", j,
                "] must be float32, float16 or bfloat16, got ", tensors[j].scalar_type());
    TORCH_CHECK(tensors[j].numel() <= 1 || tensors[j].is_non_overlapping_and_dense(), "tensors[", j,
                "] must be dense (non-overlapping); got strides ", tensors[j].strides());
  }
  const auto spans = cpu::make_spans(tensors);
  std::vector<double> partial(spans.size(), 0.0);
  cpu::for_each_span(spans, cpu::total_numel(tensors), [&](const cpu::Span& s) {
    const auto& t = tensors[s.tensor];
    float v = 0.0f;
    cpu::with_float_type(t.scalar_type(), "multi_tensor_sumsq", [&](auto t0) {
      using T = decltype(t0);
      v = detail::sumsq_span<T>(cpu::ptr<T>(t) + s.begin, s.count);
    });
    partial[&s - spans.data()] = v;
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return at::full({1}, static_cast<float>(total), at::TensorOptions().dtype(at::kFloat));
}

}  // namespace llmkern::ops

LLMKERN_CPU_IMPL(m) { m.impl("multi_tensor_sumsq", &llmkern::ops::multi_tensor_sumsq_cpu); }
