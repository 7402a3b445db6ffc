// Storage types of the CPU kernels and their fp32 conversions, written so that g++ -O3
// -march=native vectorizes them: fp16 is the compiler's _Float16 (vcvtph2ps / vcvtps2ph with F16C
// or AVX-512), bf16 is a 16-bit shift with round-to-nearest-even, as torch and the CUDA intrinsics
// round. c10::Half's bit-twiddling conversion does not vectorize: with it the fp16 AdamW step ran
// at about a third of the fp32 step's bandwidth.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <bit>
#include <cstdint>
#include <type_traits>

namespace llmkern::cpu {

using half = _Float16;
struct bf16 {
  uint16_t bits;
};
struct none {};  // "no tensor here" (e.g. no model copy to write)

inline float load(float x) { return x; }
inline float load(half x) { return static_cast<float>(x); }
inline float load(bf16 x) { return std::bit_cast<float>(static_cast<uint32_t>(x.bits) << 16); }

template <class T>
inline T store(float f);
template <>
inline float store<float>(float f) { return f; }
template <>
inline half store<half>(float f) { return static_cast<half>(f); }
template <>
inline bf16 store<bf16>(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return bf16{static_cast<uint16_t>(f != f ? 0x7FC0u : rounded)};  // keep NaN a NaN
}

// Calls f(T{}) with T the storage type of dtype d.
template <class F>
inline void with_float_type(at::ScalarType d, const char* what, F&& f) {
  switch (d) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(half{});
    case at::kBFloat16: return f(bf16{});
    default: TORCH_CHECK(false, what, ": unsupported dtype ", d);
  }
}

template <class T>
inline T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Work items: (tensor index, first element, element count). 64Ki elements is 1.8 MB of AdamW
// traffic at 28 B/param: large enough that scheduling costs nothing, small enough to balance
// many small tensors across threads.
struct Span {
  int64_t tensor, begin, count;
};
constexpr int64_t kSpan = 1 << 16;

// Runs body(span) over all spans: on the calling thread when the whole step is small, else on
// torch's OpenMP pool. Waking the pool costs ~10 us on an idle machine but measured 2.2 ms per
// call on this (oversubscribed, 2-core) one, 180x the 12 us a 5k-parameter step takes on one
// thread. Below 2^18 elements (~7 MB of AdamW traffic, ~0.3 ms at 25 GB/s) one thread wins.
constexpr int64_t kSerialBelow = 1 << 18;

template <class F>
inline void for_each_span(const std::vector<Span>& spans, int64_t total, F&& body) {
  if (total < kSerialBelow) {
    for (const Span& s : spans) body(s);
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) body(spans[i]);
  });
}

inline int64_t total_numel(at::TensorList ts) {
  int64_t n = 0;
  for (const auto& t : ts) n += t.numel();
  return n;
}

inline std::vector<Span> make_spans(at::TensorList ts) {
  std::vector<Span> spans;
  for (int64_t j = 0; j < static_cast<int64_t>(ts.size()); ++j) {
    const int64_t n = ts[j].numel();
    for (int64_t b = 0; b < n; b += kSpan) spans.push_back({j, b, std::min(kSpan, n - b)});
  }
  return spans;
}

}  // namespace llmkern::cpu
