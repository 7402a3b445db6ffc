// Row reductions with several independent partial sums, for the CPU kernels (layer_norm_kernel.cpp,
// rms_norm_kernel.cpp).
//
// `#pragma omp simd reduction(+ : s)` gives g++ one vector accumulator: every add waits for the
// previous one (4 cycles), so a sum over a 4096-float row in L1 takes ~1000 cycles while its loads
// need ~130. kLanes = 64 floats are four AVX-512 (eight AVX2) accumulators, whose adds overlap; the
// layer_norm forward's variance pass (its row already in L1) was the largest cost after the memory
// traffic. The order of the additions differs from a plain loop's, as any vectorized sum's does.
#pragma once
#include <cstdint>

namespace llmkern::cpu {

constexpr int kLanes = 64;

// Σ_c f(c) for c in [0, n): f is inlined into a vectorized loop over blocks of kLanes.
template <class F>
inline float lane_sum(int64_t n, F&& f) {
  float acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) acc[k] += f(c + k);
  }
  float s = 0.f;
  for (; c < n; ++c) s += f(c);
#pragma omp simd reduction(+ : s)
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// The two sums Σ f(c) and Σ g(c) in one pass (the layer_norm backward's Σ g and Σ g·x̂).
template <class F>
inline void lane_sum2(int64_t n, F&& f, float& s1, float& s2) {
  float a[kLanes] = {}, b[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      float u, v;
      f(c + k, u, v);
      a[k] += u;
      b[k] += v;
    }
  }
  float x = 0.f, y = 0.f;
  for (; c < n; ++c) {
    float u, v;
    f(c, u, v);
    x += u;
    y += v;
  }
#pragma omp simd reduction(+ : x, y)
  for (int k = 0; k < kLanes; ++k) {
    x += a[k];
    y += b[k];
  }
  s1 = x;
  s2 = y;
}

}  // namespace llmkern::cpu
