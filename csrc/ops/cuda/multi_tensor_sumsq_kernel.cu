// CUDA kernel of multi_tensor_sumsq (schema: csrc/ops/multi_tensor_sumsq.cpp; launch scheme:
// csrc/include/llmkern/multi_tensor_apply.cuh). Also compiled for the CPU under csrc/emu.
//
// fp32 only for short runs of squares, double above them, one float64 result (as the CPU kernel,
// which sums 512-element blocks in fp32). A thread's run whose fp32 sum is not finite (a square past
// FLT_MAX: |x| > 1.8e19, or an inf/nan) is summed again in double, so that only an inf or nan element
// makes the result non-finite. Two kernels, no atomics and no host sync:
//   multi_tensor_sumsq_kernel   one block per 64Ki chunk: each of the 512 threads sums its 128
//                               squares in fp32, then a warp-shuffle + shared-memory tree sums the
//                               block in double; thread 0 writes the chunk's partial to its slot.
//                               An fp32 tree was 5x plain PyTorch's error on a 64Ki chunk of bf16
//                               values (15 vs 2.8 on a sum of 6.3e7); 2 x 5 double shuffles per
//                               warp cost nothing next to the 64Ki loads.
//   sumsq_finalize_kernel       one block sums the partials in double, in a fixed order.
// The result is therefore bit-identical from run to run and under any block or thread schedule
// (fp32 atomics would make it depend on the order blocks finish). Non-finite inputs need no flag:
// the sum of squares of any inf is inf and of any nan is nan (squares are >= 0, so inf - inf never
// occurs), which is what the optimizers read as the overflow flag.
//
// Partials: one double per 64Ki elements (7B parameters: 107K partials, 0.9 MB), so the finalize
// kernel reads 0.01 % of what the main kernel reads.
#include "llmkern/launch.cuh"  // first: under emulation it brings the cuda_runtime.h stand-in
#include "../multi_tensor_sumsq.h"
#include "llmkern/cuda_float.cuh"
#include "llmkern/multi_tensor_apply.cuh"
#include "llmkern/registration.h"

#include <cfloat>

namespace llmkern::ops {
namespace detail {

using namespace llmkern::cuda;
// 1 list: 96 x 8 B pointers, sizes and bases + block map (1600 B) = 3.9 KB of kernel parameters.
using SumsqTable = mta::Table<1, 96>;
constexpr int kWarp = 32;
constexpr int kWarps = mta::kThreads / kWarp;

// Sum of v over the block, valid in thread 0. red: kWarps shared slots. Every thread must call it.
template <class A>
__device__ __forceinline__ A block_sum(A v, A* red) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? red[lane] : A(0);
    for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

template <class T>
__global__ void multi_tensor_sumsq_kernel(SumsqTable table, double* partial) {
  __shared__ double red[kWarps];
  int t;
  int64_t begin, end;
  mta::block_range(table, t, begin, end);
  const T* x = static_cast<const T*>(table.ptr[0][t]);
  float acc = 0.0f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float f = to_float(x[i]);
    acc += f * f;
  }
  double run = acc;
  if (!(fabsf(acc) <= FLT_MAX)) {  // rare: the divergence costs nothing on the fast path
    run = 0.0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const double f = to_float(x[i]);
      run += f * f;
    }
  }
  const double sum = block_sum(run, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

__global__ void sumsq_finalize_kernel(const double* partial, int64_t n, double* out) {
  __shared__ double red[kWarps];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) out[0] = acc;
}

}  // namespace detail

at::Tensor multi_tensor_sumsq_device(at::TensorList tensors) {
  using namespace detail;
  check_multi_tensor_sumsq(tensors);
  LLMKERN_DEVICE_GUARD(tensors[0]);
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(tensors[0].device());
  int64_t chunks = 0;
  for (const auto& t : tensors) chunks += (t.numel() + mta::kChunk - 1) / mta::kChunk;
  at::Tensor partial = at::empty({chunks > 0 ? chunks : 1}, opts.dtype(at::kDouble));
  at::Tensor out = at::empty({1}, opts.dtype(at::kDouble));
  double* part = partial.data_ptr<double>();
  int64_t written = 0;  // partials of earlier launches; each launch writes the next `blocks` slots
  mta::apply<1, 96>(
      {tensors}, [&](size_t j) { return tensors[j].scalar_type(); },
      [&](const SumsqTable& table, int blocks, size_t j) {
        with_type(tensors[j].scalar_type(), "multi_tensor_sumsq: tensors", [&](auto t0) {
          using T = decltype(t0);
          LAUNCH((multi_tensor_sumsq_kernel<T>), blocks, mta::kThreads, 0, llmkern::current_stream())(
              table, part + written);
          LLMKERN_CUDA_CHECK(cudaGetLastError());
        });
        written += blocks;
      });
  TORCH_CHECK(written == chunks, "multi_tensor_sumsq: launched ", written, " blocks for ", chunks, " chunks");
  LAUNCH(sumsq_finalize_kernel, 1, mta::kThreads, 0, llmkern::current_stream())(part, written,
                                                                                  out.data_ptr<double>());
  LLMKERN_CUDA_CHECK(cudaGetLastError());
  return out;
}

}  // namespace llmkern::ops

LLMKERN_DEVICE_IMPL(m) { m.impl("multi_tensor_sumsq", &llmkern::ops::multi_tensor_sumsq_device); }
