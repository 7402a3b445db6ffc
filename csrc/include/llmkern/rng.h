// Counter-based dropout RNG shared bit-for-bit by every backend: this header (C++ CPU and CUDA),
// triton_kernels/lora_linear.py and llmkern/ops/_rng.py (the reference). Nothing is stored: the
// mask of element i of a (N, C) row-major view is a pure function of (seed, offset + i), so the
// backward pass regenerates exactly the forward mask.
//   key  = dropout_key(seed)                          32-bit, computed once on the host
//   c    = offset + i                                 64-bit counter, i = n * C + k
//   h    = fmix32(fmix32(lo32(c) ^ key) ^ hi32(c) ^ 0x85EBCA6B)
//   keep = (h >> 8) >= threshold,  threshold = round(p * 2^24)
//   dropout(x) = keep ? x / (1 - p) : 0
// fmix32 is MurmurHash3's finalizer: every input bit flips each output bit with probability ~1/2.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LLMKERN_HD __host__ __device__ __forceinline__
#else
#define LLMKERN_HD inline
#endif

namespace llmkern {

LLMKERN_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

inline uint32_t dropout_key(int64_t seed) {
  uint64_t s = static_cast<uint64_t>(seed);
  return fmix32(static_cast<uint32_t>(s) ^ fmix32(static_cast<uint32_t>(s >> 32) ^ 0x9E3779B9u));
}

inline uint32_t dropout_threshold(double p) {
  double t = p * 16777216.0 + 0.5;  // round(p * 2^24)
  return t >= 16777216.0 ? 16777216u : static_cast<uint32_t>(t);
}

LLMKERN_HD bool dropout_keep(uint32_t key, uint64_t counter, uint32_t threshold) {
  uint32_t h = fmix32(fmix32(static_cast<uint32_t>(counter) ^ key) ^ static_cast<uint32_t>(counter >> 32) ^
                      0x85EBCA6Bu);
  return (h >> 8) >= threshold;
}

// Everything a kernel needs to regenerate a mask, passed by value (CPU and CUDA kernels alike).
struct DropoutParams {
  uint64_t offset;
  uint32_t key;
  uint32_t threshold;
  double inv_keep;  // 1/(1-p)
  bool on;          // p > 0
};

inline DropoutParams make_dropout_params(double p, int64_t seed, int64_t offset) {
  return {static_cast<uint64_t>(offset), dropout_key(seed), dropout_threshold(p), 1.0 / (1.0 - p), p > 0.0};
}

}  // namespace llmkern
