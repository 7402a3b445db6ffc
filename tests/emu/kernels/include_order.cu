// Compile-only check (g++ -fsyntax-only): the stand-ins coexist with torch and libstdc++ headers
// included before and after them. A macro such as `__noinline__` would break <condition_variable>,
// which libstdc++ spells with __attribute__((__noinline__)).
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
#include <torch/torch.h>

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

void launch_all(const at::Tensor& x, at::Tensor& y, unsigned* flags) {
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
