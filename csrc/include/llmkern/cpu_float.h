// Storage types of the CPU kernels and their fp32 conversions, written so that g++ -O3
// -march=native vectorizes them (AVX2 / AVX-512). Both 16-bit types are plain uint16_t bits
// converted with integer operations and selects: g++ 12 vectorizes neither _Float16 (it needs
// AVX512-FP16, which Zen 4 lacks: every element went through scalar vcvtph2ps) nor c10::Half or a
// struct load, and the scalar loop ran the mixed-precision AdamW step at 1.7 GB/s against 7-9 GB/s
// for fp32. Rounding is to nearest even, as torch and the CUDA intrinsics round; NaN stays NaN,
// overflow goes to inf, fp16 subnormals are exact.
#pragma once
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <bit>
#include <cstdint>
#include <type_traits>

namespace llmkern::cpu {

// Tags for the two 16-bit dtypes. Kernels index raw_t<T> arrays (uint16_t for both) and convert
// with load<T>/store<T>: g++ does not vectorize loads of a struct, only of plain integers.
struct half {};
struct bf16 {};
struct none {};  // "no tensor here" (e.g. no model copy to write)

template <class T>
struct raw {
  using type = T;
};
template <>
struct raw<half> {
  using type = uint16_t;
};
template <>
struct raw<bf16> {
  using type = uint16_t;
};
template <class T>
using raw_t = typename raw<T>::type;

template <class T>
inline float load(raw_t<T> x);

template <>
inline float load<float>(float x) { return x; }
template <>
inline float load<bf16>(uint16_t x) { return std::bit_cast<float>(static_cast<uint32_t>(x) << 16); }
template <>
inline float load<half>(uint16_t x) {
  // Move sign, exponent and mantissa into place, rebias the exponent (127 - 15), then fix the two
  // special exponents: 31 (inf/nan) needs another +112, 0 (zero/subnormal) is renormalised by
  // subtracting 2^-14 after setting the implicit bit's position.
  const uint32_t h = x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = (h & 0x7FFFu) << 13;
  const uint32_t e = em & 0x0F800000u;
  const uint32_t normal = em + (112u << 23);
  const uint32_t infnan = em + (224u << 23);
  const float sub = std::bit_cast<float>(em + (113u << 23)) - std::bit_cast<float>(113u << 23);
  const uint32_t mag = e == 0x0F800000u ? infnan : (e == 0 ? std::bit_cast<uint32_t>(sub) : normal);
  return std::bit_cast<float>(mag | sign);
}

template <class T>
inline raw_t<T> store(float f);
template <>
inline float store<float>(float f) { return f; }
template <>
inline uint16_t store<bf16>(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);  // keep NaN a NaN
}
template <>
inline uint16_t store<half>(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // |f| >= 65520 rounds to inf (nan stays nan); below 2^-14 the result is subnormal: adding 0.5
  // (2^-1) lets the FPU round the mantissa to nearest even at the right position.
  const uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;
  const uint32_t sub = std::bit_cast<uint32_t>(std::bit_cast<float>(a) + 0.5f) - 0x3F000000u;
  const uint32_t odd = (a >> 13) & 1u;
  const uint32_t norm = (a + 0xC8000FFFu + odd) >> 13;  // rebias (-112 << 23), round to nearest even
  const uint32_t mag = a >= 0x477FF000u ? big : (a < 0x38800000u ? sub : norm);
  return static_cast<uint16_t>(mag | sign);
}

// Blocked conversion. g++ 12 vectorizes these simple loops and the all-fp32 math loop, but not
// one loop that mixes 16-bit loads with the optimizer math ("no vectype for stmt" on the first
// load), so the kernels convert a block of kBlock elements into fp32 scratch, update it, and
// convert back. kBlock = 512: 4-5 scratch arrays of 2 KB stay in L1.
constexpr int64_t kBlock = 512;

template <class T>
inline void to_f32(const raw_t<T>* __restrict in, float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = load<T>(in[i]);
}
template <class T>
inline void from_f32(const float* __restrict in, raw_t<T>* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = store<T>(in[i]);
}

// fp16 blocks through the F16C / AVX-512 conversion instructions where the build has them. The
// integer paths of load/store<half> above take 10-12 integer ops per element, which made fp16
// traffic compute-bound: multi_tensor_sumsq of 64Mi fp16 gradients ran at 15 GB/s (8.3 ms), half
// the read bandwidth. (A plain cast through _Float16 is no help: without AVX512-FP16, g++ calls
// libgcc's __extendhfsf2 per element, 1.5x slower still.) Both conversions are exact / round to
// nearest even with overflow to inf, as the scalar paths, which remain for the tails.
template <>
inline void to_f32<half>(const uint16_t* __restrict in, float* __restrict out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
#endif
  for (; i < n; ++i) out[i] = load<half>(in[i]);
}
template <>
inline void from_f32<half>(const float* __restrict in, uint16_t* __restrict out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) out[i] = store<half>(in[i]);
}

// The fp32 view of block [b, b + len) of an array: the array itself when it is fp32 (no copy), else
// `scratch` filled by to_f32. Only 16-bit arrays pay a conversion pass through L1.
template <class T>
inline float* f32_view(raw_t<T>* a, int64_t b, int64_t len, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return a + b;
  } else {
    to_f32<T>(a + b, scratch, len);
    return scratch;
  }
}
template <class T>
inline const float* f32_view(const raw_t<T>* a, int64_t b, int64_t len, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return a + b;
  } else {
    to_f32<T>(a + b, scratch, len);
    return scratch;
  }
}
template <class T>
inline void f32_writeback(raw_t<T>* a, int64_t b, int64_t len, const float* scratch) {
  if constexpr (!std::is_same_v<T, float>) from_f32<T>(scratch, a + b, len);
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
inline raw_t<T>* ptr(const at::Tensor& t) {
  return reinterpret_cast<raw_t<T>*>(t.data_ptr());
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
