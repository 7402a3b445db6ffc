// fp32 <-> storage-type conversions of the CUDA kernels (round to nearest even), and the dtype
// dispatch from at::ScalarType to float / __half / __nv_bfloat16.
// (The lead's element.cuh has the same conversions as Elem<T>; this file adds the dtype switches.)
#pragma once
// <cuda_runtime.h> first: under emulation it is the stand-in, which must precede the real
// cuda_fp16.h/cuda_bf16.h (see element.cuh).
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ATen/ATen.h>

#include "llmkern/rng.h"

namespace llmkern::cuda {

struct None {};  // "no tensor here"

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Stochastic rounding to bf16 with the random bits r16 (rng.h bf16_bits_stochastic); other storage
// types are not rounded stochastically and never reach it.
template <class T>
__device__ __forceinline__ T from_float_stochastic(float x, uint32_t r16);
template <>
__device__ __forceinline__ float from_float_stochastic<float>(float x, uint32_t) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float_stochastic<__nv_bfloat16>(float x, uint32_t r16) {
  __nv_bfloat16_raw raw;
  raw.x = bf16_bits_stochastic(x, r16);
  return __nv_bfloat16(raw);
}

template <class F>
void with_type(at::ScalarType d, const char* what, F&& f) {
  switch (d) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(__half{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    default: TORCH_CHECK(false, what, ": unsupported dtype ", d);
  }
}

// Optimizer moments: float32 or bfloat16 (the op's checks refuse other dtypes before any launch).
template <class F>
void with_state_type(at::ScalarType d, F&& f) {
  if (d == at::kBFloat16) return f(__nv_bfloat16{});
  f(float{});
}

// A 16-bit model copy, or None when there is none (the checks refuse an fp32 copy). Instantiating
// only the types the checks allow keeps the kernel count at 108 instead of 216 (compile time).
template <class F>
void with_copy_type(bool has, at::ScalarType d, F&& f) {
  if (!has) return f(None{});
  if (d == at::kHalf) return f(__half{});
  f(__nv_bfloat16{});
}

}  // namespace llmkern::cuda
