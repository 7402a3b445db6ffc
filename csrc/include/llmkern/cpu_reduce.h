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
#include <type_traits>

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

// Column sums over rows (the norms' weight and bias gradients): each thread adds its rows into its own
// fp32 row, within the thread over blocks of kSumRows rows first, and the thread rows are added in
// thread order afterwards: no atomics, a result that depends only on the thread count, and under 2x
// PyTorch's error (a plain running sum over the 1025 rows of one thread had 4.6x in fp32: PyTorch's
// reductions are cascaded). The backward of layer_norm and rms_norm takes kRows rows per step (4 rows
// of x and dy at C = 4096 fp32 are 128 KB, in L2), so the block sums are read and written once per
// kRows rows.
constexpr int64_t kSumRows = 32;
constexpr int kRows = 4;
static_assert(kSumRows % kRows == 0);

// Rows [t0, t1) in blocks of kSumRows: step(std::integral_constant<int, R>{}, t) for rows [t, t + R)
// (R = kRows, then 1 for the block's remainder), and flush() after each block.
template <class Step, class Flush>
inline void row_blocks(int64_t t0, int64_t t1, Step&& step, Flush&& flush) {
  for (int64_t t = t0; t < t1;) {
    const int64_t end = t1 < t + kSumRows ? t1 : t + kSumRows;
    for (; t + kRows <= end; t += kRows) step(std::integral_constant<int, kRows>{}, t);
    for (; t < end; ++t) step(std::integral_constant<int, 1>{}, t);
    flush();
  }
}

// Adds `block` (n floats) into `total` and zeroes it: a block's flush.
inline void flush_block(float* __restrict total, float* __restrict block, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    total[c] += block[c];
    block[c] = 0.f;
  }
}

// Adds rows 1..threads-1 of `partials` (rows of n floats) into row 0, in thread order.
inline void sum_thread_rows(float* partials, int64_t threads, int64_t n) {
  float* __restrict acc = partials;
  for (int64_t k = 1; k < threads; ++k) {
    const float* __restrict p = partials + k * n;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) acc[c] += p[c];
  }
}

}  // namespace llmkern::cpu
