// The one place where the nvcc build and the CUDA-on-CPU emulation (csrc/emu) differ.
// Kernel .cu files include this header and contain no #ifdef of their own:
//   LAUNCH((kernel<T, N>), grid, block, smem_bytes, stream)(args...);
//   float* s = llmkern::dyn_smem<float>();          // dynamic shared memory of this block
//   cudaStream_t st = llmkern::current_stream();     // torch's current stream (nullptr under emulation)
//   LLMKERN_CUDA_CHECK(cudaGetLastError());          // after each launch
// Under emulation (g++, LLMKERN_EMU defined) csrc/emu is first on the include path, so
// <cuda_runtime.h> is the stand-in and a kernel error is thrown as a C++ exception that names the
// kernel; torch turns it into a Python RuntimeError.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <c10/util/Exception.h>

#if defined(__CUDACC__)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#define LAUNCH(kernel, grid, block, smem, stream) kernel<<<(grid), (block), (smem), (stream)>>>

namespace llmkern {
template <typename T>
__device__ __forceinline__ T* dyn_smem() {
  extern __shared__ __align__(16) unsigned char llmkern_dyn_smem_[];
  return reinterpret_cast<T*>(llmkern_dyn_smem_);
}
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
}  // namespace llmkern
#define LLMKERN_DEVICE_GUARD(tensor) const c10::cuda::CUDAGuard llmkern_device_guard_((tensor).device())

#else  // CUDA-on-CPU emulation
#include "cuemu.h"

#define LAUNCH(kernel, grid, block, smem, stream) \
  ::cuemu::Launcher(kernel, #kernel, (grid), (block), (smem), (stream))

namespace llmkern {
template <typename T>
inline T* dyn_smem() { return reinterpret_cast<T*>(::cuemu::dynamic_shared_memory()); }
inline cudaStream_t current_stream() { return nullptr; }
}  // namespace llmkern
#define LLMKERN_DEVICE_GUARD(tensor) (void)(tensor)
#endif

#define LLMKERN_CUDA_CHECK(expr)                                                         \
  do {                                                                                   \
    cudaError_t llmkern_err_ = (expr);                                                   \
    TORCH_CHECK(llmkern_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(llmkern_err_), \
                " (", #expr, ")");                                                        \
  } while (0)
