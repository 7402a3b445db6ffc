// Counter-based dropout RNG shared bit-for-bit by every backend: this header (C++ CPU and CUDA),
// triton_kernels/lora_linear.py and llmkern/_rng.py (the reference). Nothing is stored: the
// mask of element (n, k) of a (N, C) row-major view is a pure function of (seed, its counter), so the
// backward pass regenerates exactly the forward mask.
//   key  = dropout_key(seed)                          32-bit, computed once on the host
//   c    = offset + col_offset + n * row_stride + k   64-bit counter; single device: col_offset = 0,
//                                                     row_stride = C. A tensor-parallel shard holding
//                                                     columns [a, a + C) of a C_full-wide input passes
//                                                     col_offset = a, row_stride = C_full: its mask is
//                                                     the slice of the single-device mask.
//   h    = fmix32(fmix32(lo32(c) ^ key) ^ hi32(c) ^ 0x85EBCA6B)
//   keep = (h >> 8) >= threshold,  threshold = round(p * 2^24)
//   dropout(x) = keep ? x / (1 - p) : 0
// fmix32 is MurmurHash3's finalizer: every input bit flips each output bit with probability ~1/2.
//
// Stochastic rounding of the optimizers' bf16 states draws from the same hash (counter_hash):
//   key  = rounding_key(seed_key(seed), step)        per launch and step; step read on the device
//   c    = base_j + i                                element i (storage order) of tensor j, base_j =
//                                                    numel of tensors 0..j-1 of the call's lists
//   h    = counter_hash(key, c); m uses h & 0xFFFF, v (and AMSGrad's max) h >> 16
//   bf16 = (bits(x) + r16) >> 16                     round up with probability (dropped bits)/2^16
#pragma once
#include <cstdint>
#include <cstring>

#include "llmkern/host_device.h"

namespace llmkern {

LLMKERN_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// 32-bit key of a 64-bit seed (host side).
inline uint32_t seed_key(int64_t seed) {
  uint64_t s = static_cast<uint64_t>(seed);
  return fmix32(static_cast<uint32_t>(s) ^ fmix32(static_cast<uint32_t>(s >> 32) ^ 0x9E3779B9u));
}
inline uint32_t dropout_key(int64_t seed) { return seed_key(seed); }

// 32 random bits for a 64-bit counter under a key.
LLMKERN_HD uint32_t counter_hash(uint32_t key, uint64_t counter) {
  return fmix32(fmix32(static_cast<uint32_t>(counter) ^ key) ^ static_cast<uint32_t>(counter >> 32) ^ 0x85EBCA6Bu);
}

inline uint32_t dropout_threshold(double p) {
  double t = p * 16777216.0 + 0.5;  // round(p * 2^24)
  return t >= 16777216.0 ? 16777216u : static_cast<uint32_t>(t);
}

LLMKERN_HD bool dropout_keep(uint32_t key, uint64_t counter, uint32_t threshold) {
  return (counter_hash(key, counter) >> 8) >= threshold;
}

// The key of one stochastic-rounding step: a fresh stream per step from one seed. The step is a
// float32 on the device (exact up to 2^24 steps).
LLMKERN_HD uint32_t rounding_key(uint32_t seed_key, uint32_t step) {
  return fmix32(seed_key ^ fmix32(step ^ 0x9E3779B9u));
}

// fp32 -> bf16 bits, rounded stochastically: add 16 random bits r16 below bf16's last mantissa bit
// and truncate, so x rounds up (away from zero) with probability (its 16 dropped bits) / 2^16 and
// E[result] = x exactly. A carry moves to the next binade or, past the largest finite bf16, to inf
// (the next value up); inf stays inf (its low 16 bits are 0); NaN becomes the quiet NaN 0x7FC0, as
// the round-to-nearest conversions of every backend do.
LLMKERN_HD uint16_t bf16_bits_stochastic(float x, uint32_t r16) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return x != x ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>((u + (r16 & 0xFFFFu)) >> 16);
}

// Everything a kernel needs to regenerate a mask, passed by value (CPU and CUDA kernels alike).
struct DropoutParams {
  uint64_t offset;      // offset + col_offset
  uint64_t row_stride;  // counter distance between rows
  uint32_t key;
  uint32_t threshold;
  double inv_keep;  // 1/(1-p)
  bool on;          // p > 0

  // The counter of local element (n, k), less `offset` (which dropout_mult and the CPU tiles add).
  LLMKERN_HD uint64_t local(int64_t n, int64_t k) const {
    return static_cast<uint64_t>(n) * row_stride + static_cast<uint64_t>(k);
  }
};

inline DropoutParams make_dropout_params(double p, int64_t seed, int64_t offset, int64_t col_offset,
                                         int64_t row_stride) {
  return {static_cast<uint64_t>(offset) + static_cast<uint64_t>(col_offset), static_cast<uint64_t>(row_stride),
          dropout_key(seed), dropout_threshold(p), 1.0 / (1.0 - p), p > 0.0};
}
inline DropoutParams no_dropout() { return make_dropout_params(0.0, 0, 0, 0, 0); }

}  // namespace llmkern
