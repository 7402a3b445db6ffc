// LLMKERN_HD: how the element math shared by the CPU and the CUDA kernels (optim_math.h, rng.h and the
// headers built on them) is declared: host and device, and inlined into the caller on both.
#pragma once

#if defined(__CUDACC__)
#define LLMKERN_HD __host__ __device__ __forceinline__
#else
// Forced inline on the host as on the device: g++ -O3 kept adam_element a call per element inside
// the CPU kernel's `omp simd` loop (29 % of a 16 Mi-parameter step in perf, the loop scalar), and the
// fp32 step took 45 ms on one Xeon thread against torch's fused AdamW's 22 ms.
#define LLMKERN_HD inline __attribute__((always_inline))
#endif
