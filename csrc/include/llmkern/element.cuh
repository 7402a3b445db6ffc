// Element types of CUDA kernels: the CUDA spelling of torch's scalar types, and loads/stores
// that convert to and from the accumulation type (fp32, or fp64 for fp64 tensors). Compiles
// under nvcc and under the CPU emulation (csrc/emu), where cuda_fp16.h/cuda_bf16.h give host
// versions of the conversions.
#pragma once
// <cuda_runtime.h> first: under emulation it is the stand-in, which must come before the real
// cuda_fp16.h/cuda_bf16.h pull in the real runtime API declarations.
#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "llmkern/rng.h"

namespace llmkern {

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using acc = float;
  static LLMKERN_HD float load(float v) { return v; }
  static LLMKERN_HD float store(float v) { return v; }
};
template <>
struct Elem<double> {
  using acc = double;
  static LLMKERN_HD double load(double v) { return v; }
  static LLMKERN_HD double store(double v) { return v; }
};
template <>
struct Elem<__half> {
  using acc = float;
  static LLMKERN_HD float load(__half v) { return __half2float(v); }
  static LLMKERN_HD __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  using acc = float;
  static LLMKERN_HD float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static LLMKERN_HD __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// The dropout multiplier of element `counter`: 0 when dropped, 1/(1-p) when kept, 1 without dropout.
template <typename A>
LLMKERN_HD A dropout_mult(const DropoutParams& d, uint64_t counter) {
  if (!d.on) return A(1);
  return dropout_keep(d.key, d.offset + counter, d.threshold) ? static_cast<A>(d.inv_keep) : A(0);
}

}  // namespace llmkern
