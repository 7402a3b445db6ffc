// Ops registered with the torch dispatcher from an emulated .cu, as csrc/ops/cuda/*.cu are in
// llmkern._C_emu: a kernel error must reach Python as a RuntimeError naming the kernel, and the next
// call must work. The includes double as a check that the stand-ins coexist with torch headers before
// them and libstdc++ headers after them (a macro such as `__noinline__` would break
// <condition_variable>, which libstdc++ spells with __attribute__((__noinline__))).
#include <ATen/ATen.h>
#include <torch/library.h>
#include "llmkern/launch.cuh"
#include "llmkern/rng.h"
#include <mma.h>
#include <nccl.h>
#include <condition_variable>
#include <future>
#include <regex>
#include <shared_mutex>

namespace {

// y = a * x, then each block reverses its chunk through dynamic shared memory (needs the barrier).
template <typename T>
__global__ void scale_reverse(const T* x, T* y, float a, int64_t n) {
  float* s = llmkern::dyn_smem<float>();
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  s[threadIdx.x] = i < n ? a * float(x[i]) : 0.f;
  __syncthreads();
  int64_t j = int64_t(blockIdx.x) * blockDim.x + (blockDim.x - 1 - threadIdx.x);
  if (j < n) y[j] = T(s[threadIdx.x]);
}

__global__ void divergent_kernel(float* y) {
  if (threadIdx.x % 2) __syncthreads();
  else __syncthreads();
  y[threadIdx.x] = 1.f;
}

at::Tensor scale_reverse_op(const at::Tensor& x, double a) {
  TORCH_CHECK(x.is_contiguous() && x.numel() % 128 == 0, "contiguous, a multiple of 128 elements");
  auto y = at::empty_like(x);
  int64_t n = x.numel();
  unsigned blocks = unsigned(n / 128);
  if (x.scalar_type() == at::kHalf) {
    LAUNCH((scale_reverse<__half>), blocks, 128, 128 * sizeof(float), llmkern::current_stream())(
        reinterpret_cast<const __half*>(x.data_ptr<at::Half>()), reinterpret_cast<__half*>(y.data_ptr<at::Half>()),
        float(a), n);
  } else {
    LAUNCH((scale_reverse<float>), blocks, 128, 128 * sizeof(float), llmkern::current_stream())(
        x.data_ptr<float>(), y.data_ptr<float>(), float(a), n);
  }
  LLMKERN_CUDA_CHECK(cudaGetLastError());
  return y;
}

at::Tensor divergent_op(const at::Tensor& x) {
  auto y = at::empty({64}, x.options().dtype(at::kFloat));
  LAUNCH(divergent_kernel, 1, 64, 0, nullptr)(y.data_ptr<float>());
  return y;
}

// Compiled, not run: the intrinsics the project's kernels use, in every element type.
template <typename T, int N>
__global__ void __launch_bounds__(256) uses_everything(const T* x, T* y, unsigned* flags, int n) {
  __shared__ float partial[N];
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? float(__ldg(x + i)) : 0.f;
  v = fmaf(__expf(v), rsqrtf(1.f + v * v), 0.f);
  v += __shfl_down_sync(0xFFFFFFFFu, v, 1);
  if (__any_sync(0xFFFFFFFFu, v > 1.f)) atomicOr(flags, 1u);
  partial[threadIdx.x % N] = v;
  __syncthreads();
  if (i < n) y[i] = T(partial[(threadIdx.x + 1) % N] + float(min(i, n)) * 0.f + float(max(1, 2)));
}

[[maybe_unused]] void launch_all(const at::Tensor& x, at::Tensor& y, unsigned* flags) {
  int n = int(x.numel());
  LAUNCH((uses_everything<float, 32>), (n + 255) / 256, 256, 0, llmkern::current_stream())(
      x.data_ptr<float>(), y.data_ptr<float>(), flags, n);
  LAUNCH((uses_everything<__half, 32>), dim3((n + 255) / 256), dim3(256), 0, nullptr)(
      reinterpret_cast<const __half*>(x.data_ptr()), reinterpret_cast<__half*>(y.data_ptr()), flags, n);
  LAUNCH((uses_everything<__nv_bfloat16, 32>), 1, 256, 0, nullptr)(
      reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), flags, n);
  LLMKERN_CUDA_CHECK(cudaGetLastError());
  LLMKERN_CUDA_CHECK(cudaMemsetAsync(flags, 0, 4, llmkern::current_stream()));
  LLMKERN_CUDA_CHECK(cudaMemcpyAsync(flags, flags, 4, cudaMemcpyDeviceToDevice, llmkern::current_stream()));
}

}  // namespace

TORCH_LIBRARY(cuemu_test, m) {
  m.def("scale_reverse(Tensor x, float a) -> Tensor");
  m.def("divergent(Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(cuemu_test, CPU, m) {
  m.impl("scale_reverse", &scale_reverse_op);
  m.impl("divergent", &divergent_op);
}
