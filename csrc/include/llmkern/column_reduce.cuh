// The weight-gradient column reduction shared by the LoRA and adapter CUDA kernels
// (csrc/ops/cuda/lora_linear_kernel.cu lora_wgrad_kernel, adapter_bottleneck_kernel.cu
// adapter_wgrad_kernel). A block of kColumns columns × kLanes row lanes computes, for its columns
// k < K and the rows [n_begin, n_end),
//   S[r, k] = Σ_n U[n, r] · value(n, k)      for every rank r < R, kRC ranks at a time:
// each lane sums every kLanes-th row in registers, the lanes are then summed through shared memory in
// a fixed order (so S does not depend on the schedule), and emit(r, k, S) stores or accumulates S.
// With kLanes == kRC, thread (lane ty, column tx) finishes rank r0 + ty: every thread takes part.
// A warp of columns reads 32 consecutive elements of a row: coalesced 128-byte loads for fp32.
#pragma once
// <cuda_runtime.h> first: under emulation it is the stand-in that defines __device__ and __shared__.
#include <cuda_runtime.h>

#include <cstdint>

namespace llmkern::cuda {

constexpr int kColumns = 32;

template <int kLanes, int kRC, class A, class Value, class Emit>
__device__ __forceinline__ void column_reduce(const A* __restrict__ U, int64_t R, int64_t K, int64_t n_begin,
                                              int64_t n_end, Value value, Emit emit) {
  static_assert(kLanes == kRC, "thread (ty, tx) finishes rank r0 + ty");
  __shared__ A red[kLanes][kRC][kColumns];
  const int tx = threadIdx.x % kColumns, ty = threadIdx.x / kColumns;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kColumns + tx;
  for (int64_t r0 = 0; r0 < R; r0 += kRC) {
    A acc[kRC];
#pragma unroll
    for (int j = 0; j < kRC; ++j) acc[j] = A(0);
    if (k < K) {
      for (int64_t n = n_begin + ty; n < n_end; n += kLanes) {
        const A v = value(n, k);
#pragma unroll
        for (int j = 0; j < kRC; ++j)
          if (r0 + j < R) acc[j] += U[n * R + r0 + j] * v;
      }
    }
#pragma unroll
    for (int j = 0; j < kRC; ++j) red[ty][j][tx] = acc[j];
    __syncthreads();
    if (k < K && r0 + ty < R) {
      A s = A(0);
#pragma unroll
      for (int l = 0; l < kLanes; ++l) s += red[l][ty][tx];
      emit(r0 + ty, k, s);
    }
    __syncthreads();  // red is rewritten by the next chunk
  }
}

}  // namespace llmkern::cuda
