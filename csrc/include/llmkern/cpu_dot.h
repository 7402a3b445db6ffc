// The register-blocked dot micro-kernel shared by the CPU LoRA and adapter kernels
// (csrc/ops/cpu/lora_linear_kernel.cpp, adapter_bottleneck_kernel.cpp): kDotRows rows of an activation
// tile against every row of a thin weight matrix (R rows). Each weight row is loaded once per 8
// activation rows, and the 8 running sums stay in vector registers (8 accumulators × 16 fp32 lanes
// under AVX-512), so the loop is bound by the loads of the 8 activation rows, which stay in L1.
#pragma once
#include <cstdint>

namespace llmkern::cpu {

constexpr int64_t kDotRows = 8;

// part[j*R + r] += Σ_{k < n} rows[j*ld + k] · M[r*ldm + k]   for j < kDotRows, r < R.
template <typename A>
inline void dot_rows8(const A* rows, int64_t ld, int64_t n, const A* M, int64_t ldm, int64_t R, A* part) {
  const A *b0 = rows, *b1 = rows + ld, *b2 = rows + 2 * ld, *b3 = rows + 3 * ld;
  const A *b4 = rows + 4 * ld, *b5 = rows + 5 * ld, *b6 = rows + 6 * ld, *b7 = rows + 7 * ld;
  for (int64_t r = 0; r < R; ++r) {
    const A* m = M + r * ldm;
    A s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
    for (int64_t k = 0; k < n; ++k) {
      const A mk = m[k];
      s0 += b0[k] * mk;
      s1 += b1[k] * mk;
      s2 += b2[k] * mk;
      s3 += b3[k] * mk;
      s4 += b4[k] * mk;
      s5 += b5[k] * mk;
      s6 += b6[k] * mk;
      s7 += b7[k] * mk;
    }
    const A s[kDotRows] = {s0, s1, s2, s3, s4, s5, s6, s7};
    for (int64_t j = 0; j < kDotRows; ++j) part[j * R + r] += s[j];
  }
}

}  // namespace llmkern::cpu
