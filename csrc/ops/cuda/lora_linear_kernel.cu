// CUDA implementation of the fused LoRA linear (schema: csrc/ops/lora_linear.cpp). The base GEMMs
// (x·Wᵀ + b, gy·W) go to cuBLAS through ATen; the LoRA path is three kernels of ours, all
// accumulating in fp32 (fp64 for fp64) with the dropout mask regenerated from (seed, offset) at the
// counters of csrc/include/llmkern/rng.h (DropoutParams::local), a dropped NaN staying NaN (0·NaN):
//   rows_dot      out[n, r] = α·Σ_k mult(n,k)·src[n, k]·M[r, k]       one warp per row
//   add_lowrank   dst[n, c] += α·mult(n,c)·Σ_r U[n, r]·Mt[r, c]       U rows staged in shared memory
//   wgrad         G[r, k] += α·Σ_n U[n, r]·mult(n,k)·src[n, k]         N split over blocks, atomics in A
// Forward:  xa = rows_dot(x, A, dropout); y += s·add_lowrank(xa, Bᵀ)
// Backward: gu = rows_dot(gy, Bᵀ, α=s); Gᵦ = wgrad(xa, gy, α=s); G_A = wgrad(gu, x, dropout);
//           gx = gy·W (cuBLAS) then gx += add_lowrank(gu, A, dropout)
// Every kernel uses int64 element offsets: x may exceed 2^31 elements (T=1M tokens × C=4096).
// The same file is compiled by g++ against csrc/emu and tested on CPU tensors (llmkern_emu::).
#include <ATen/ATen.h>

#include <algorithm>

#include "../lora_linear.h"
#include "llmkern/column_reduce.cuh"
#include "llmkern/element.cuh"
#include "llmkern/launch.cuh"
#include "llmkern/registration.h"

namespace llmkern::ops {
namespace detail {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsDotWarps = 8;  // 256 threads: one row per warp
constexpr int kRC = 8;            // ranks per register chunk in rows_dot and wgrad
constexpr int kUpRows = 4;        // rows per block iteration in add_lowrank
constexpr int kUpThreads = 256;
constexpr int kWgradLanes = 8;    // wgrad block: 32 columns × 8 row lanes (= kRC; llmkern/column_reduce.cuh)
static_assert(kWarp == cuda::kColumns, "the wgrad grid is ceil(K / kWarp) blocks of kWarp columns");

template <typename T, typename A>
__global__ void lora_rows_dot_kernel(const T* __restrict__ src, int64_t N, int64_t K, const A* __restrict__ M,
                                     int64_t R, A alpha, DropoutParams d, A* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kRowsDotWarps + threadIdx.x / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowsDotWarps;
  for (int64_t n = warp; n < N; n += warps) {  // uniform per warp: full-mask shuffles are valid
    const T* row = src + n * K;
    for (int64_t r0 = 0; r0 < R; r0 += kRC) {
      A acc[kRC];
#pragma unroll
      for (int j = 0; j < kRC; ++j) acc[j] = A(0);
      for (int64_t k = lane; k < K; k += kWarp) {
        const A v = Elem<T>::load(row[k]) * dropout_mult<A>(d, d.local(n, k));
#pragma unroll
        for (int j = 0; j < kRC; ++j)
          if (r0 + j < R) acc[j] += v * M[(r0 + j) * K + k];
      }
#pragma unroll
      for (int j = 0; j < kRC; ++j) {
        A s = acc[j];
        for (int off = kWarp / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0 && r0 + j < R) out[n * R + r0 + j] = alpha * s;
      }
    }
  }
}

template <typename T, typename A>
__global__ void lora_add_lowrank_kernel(T* __restrict__ dst, int64_t N, int64_t C, const A* __restrict__ U,
                                        const A* __restrict__ Mt, int64_t R, A alpha, DropoutParams d) {
  A* us = dyn_smem<A>();  // [kUpRows][R]
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t groups = (N + kUpRows - 1) / kUpRows;
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    const int64_t n0 = g * kUpRows;
    __syncthreads();  // the previous iteration's readers are done with us
    for (int64_t i = threadIdx.x; i < kUpRows * R; i += blockDim.x) {
      const int64_t n = n0 + i / R;
      us[i] = n < N ? alpha * U[n * R + i % R] : A(0);
    }
    __syncthreads();
    if (c < C) {
      A acc[kUpRows];
#pragma unroll
      for (int j = 0; j < kUpRows; ++j) acc[j] = A(0);
      for (int64_t r = 0; r < R; ++r) {
        const A m = Mt[r * C + c];
#pragma unroll
        for (int j = 0; j < kUpRows; ++j) acc[j] += us[j * R + r] * m;
      }
#pragma unroll
      for (int j = 0; j < kUpRows; ++j) {
        const int64_t n = n0 + j;
        if (n < N) {
          T* p = dst + n * C + c;
          *p = Elem<T>::store(Elem<T>::load(*p) + dropout_mult<A>(d, d.local(n, c)) * acc[j]);
        }
      }
    }
  }
}

template <typename T, typename A>
__global__ void lora_wgrad_kernel(const A* __restrict__ U, const T* __restrict__ src, int64_t N, int64_t K,
                                  int64_t R, A alpha, DropoutParams d, int64_t rows_per_block, A* __restrict__ G) {
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t n_end = n_begin + rows_per_block < N ? n_begin + rows_per_block : N;
  cuda::column_reduce<kWgradLanes, kRC>(
      U, R, K, n_begin, n_end,
      [&](int64_t n, int64_t k) {
        return Elem<T>::load(src[n * K + k]) * dropout_mult<A>(d, d.local(n, k));
      },
      [&](int64_t r, int64_t k, A s) { atomicAdd(G + r * K + k, alpha * s); });
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, typename A>
void rows_dot(const at::Tensor& src, const at::Tensor& M, double alpha, const DropoutParams& d, at::Tensor& out) {
  const int64_t N = src.size(0), K = src.size(1), R = M.size(0);
  if (N == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(N, kRowsDotWarps), 65535);
  LAUNCH((lora_rows_dot_kernel<T, A>), dim3(static_cast<unsigned>(blocks)), dim3(kRowsDotWarps * kWarp), 0,
         current_stream())(reinterpret_cast<const T*>(src.data_ptr()), N, K, M.data_ptr<A>(), R,
                           static_cast<A>(alpha), d, out.data_ptr<A>());
  LLMKERN_CUDA_CHECK(cudaGetLastError());
}

template <typename T, typename A>
void add_lowrank(at::Tensor& dst, const at::Tensor& U, const at::Tensor& Mt, double alpha, const DropoutParams& d) {
  const int64_t N = dst.size(0), C = dst.size(1), R = U.size(1);
  if (N == 0 || C == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(C, kUpThreads)),
                  static_cast<unsigned>(std::min<int64_t>(ceil_div(N, kUpRows), 65535)));
  const size_t smem = sizeof(A) * kUpRows * R;
  LAUNCH((lora_add_lowrank_kernel<T, A>), grid, dim3(kUpThreads), smem, current_stream())(
      reinterpret_cast<T*>(dst.data_ptr()), N, C, U.data_ptr<A>(), Mt.data_ptr<A>(), R, static_cast<A>(alpha), d);
  LLMKERN_CUDA_CHECK(cudaGetLastError());
}

// G (R, K) in the accumulation dtype, zero-initialised by the caller.
template <typename T, typename A>
void wgrad(const at::Tensor& U, const at::Tensor& src, double alpha, const DropoutParams& d, at::Tensor& G) {
  const int64_t N = src.size(0), K = src.size(1), R = U.size(1);
  if (N == 0 || K == 0) return;
  // About 4 blocks per SM on a 132-SM H100 in total; each block reduces >= 64 rows before its atomics.
  const int64_t col_blocks = ceil_div(K, kWarp);
  const int64_t row_blocks = std::clamp<int64_t>(512 / std::max<int64_t>(col_blocks, 1), 1, ceil_div(N, 64));
  const int64_t rows_per_block = ceil_div(N, row_blocks);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(ceil_div(N, rows_per_block)));
  LAUNCH((lora_wgrad_kernel<T, A>), grid, dim3(kWgradLanes * kWarp), 0, current_stream())(
      U.data_ptr<A>(), reinterpret_cast<const T*>(src.data_ptr()), N, K, R, static_cast<A>(alpha), d, rows_per_block,
      G.data_ptr<A>());
  LLMKERN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace detail

std::tuple<at::Tensor, at::Tensor> lora_linear_device(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                      double scale, double dropout_p, const at::Tensor& seed,
                                                      int64_t offset, int64_t col_offset, int64_t row_stride) {
  using namespace detail;
  LLMKERN_DEVICE_GUARD(x);
  LoraForward f = prepare_lora_forward(x, weight, bias, lora_a, lora_b, dropout_p);
  const DropoutParams d = lora_dropout_params(dropout_p, seed, offset, col_offset, row_stride, f.sh);
  const DropoutParams none = no_dropout();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_linear_device", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = typename Elem<T>::acc;
    rows_dot<T, A>(f.x2, f.a, 1.0, d, f.xa);
    add_lowrank<T, A>(f.y2, f.xa, f.bt, scale, none);
  });
  return f.outputs(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_device(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& xa, double scale, double dropout_p, const at::Tensor& seed,
    int64_t offset, int64_t col_offset, int64_t row_stride) {
  using namespace detail;
  LLMKERN_DEVICE_GUARD(x);
  // wgrad accumulates into the zeroed gbt/ga with atomics in the accumulation dtype (fp64 atomicAdd: sm_60+).
  LoraBackward b = prepare_lora_backward(grad_y, x, weight, lora_a, lora_b, xa, dropout_p);
  const DropoutParams d = lora_dropout_params(dropout_p, seed, offset, col_offset, row_stride, b.sh);
  const DropoutParams none = no_dropout();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_linear_backward_device", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = typename Elem<T>::acc;
    rows_dot<T, A>(b.gy2, b.bt, scale, none, b.gu);
    wgrad<T, A>(b.xa2, b.gy2, scale, none, b.gbt);
    wgrad<T, A>(b.gu, b.x2, 1.0, d, b.ga);
    add_lowrank<T, A>(b.gx2, b.gu, b.a, 1.0, d);
  });
  return b.outputs(x);
}

LLMKERN_DEVICE_IMPL(m) {
  m.impl("lora_linear", &lora_linear_device);
  m.impl("_lora_linear_backward", &lora_linear_backward_device);
}

}  // namespace llmkern::ops
