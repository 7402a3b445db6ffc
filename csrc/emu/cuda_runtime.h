// Stand-in for <cuda_runtime.h> under the CUDA-on-CPU emulation (csrc/emu is first on the include
// path; nvcc builds never see this directory). Types come from the real CUDA headers (vector_types.h,
// driver_types.h, cuda_fp16.h, cuda_bf16.h, which work on the host); kernels run under cuemu.h; the
// runtime API is a synchronous host version: "device" memory is host memory and every stream is the
// calling thread.
#pragma once
// Make the real cuda_runtime.h and cuda_runtime_api.h empty if a quoted include reaches them: their
// extern "C" prototypes would clash with the inline definitions below.
#define __CUDA_RUNTIME_H__
#define __CUDA_RUNTIME_API_H__

#include <vector_types.h>
#include <vector_functions.h>
#include <driver_types.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdlib>
#include <cstring>

// Static __shared__ variables: one copy per OS thread, shared by the fibers (threads of a block) that
// thread runs. -DCUEMU_SHARED_STATIC makes them plain statics for sanitizer builds (ASan puts no
// redzones on TLS, and g++'s TLS init guard is a false race for TSan); that forces one worker.
// host_defines.h defined __shared__ as nothing, which would silently make each thread's copy private.
#undef __shared__
#if defined(CUEMU_SHARED_STATIC)
#define __shared__ static
#else
#define __shared__ thread_local
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

#include "cuemu.h"

inline cudaError_t cudaMalloc(void** p, size_t n) {
  // Exactly n bytes (not rounded up to 256 as the CUDA allocator does), so ASan sees an overflow.
  *p = std::malloc(n ? n : 1);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
template <typename T>
inline cudaError_t cudaMalloc(T** p, size_t n) { return cudaMalloc(reinterpret_cast<void**>(p), n); }
inline cudaError_t cudaMallocHost(void** p, size_t n) { return cudaMalloc(p, n); }
inline cudaError_t cudaMallocManaged(void** p, size_t n, unsigned = 1) { return cudaMalloc(p, n); }
inline cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaFreeHost(void* p) { std::free(p); return cudaSuccess; }

inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind = cudaMemcpyDefault) {
  if (n) std::memmove(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind = cudaMemcpyDefault,
                                   cudaStream_t = nullptr) {
  return cudaMemcpy(dst, src, n, kind);
}
inline cudaError_t cudaMemset(void* p, int v, size_t n) {
  if (n) std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) { return cudaMemset(p, v, n); }
template <typename T>
inline cudaError_t cudaMemcpyToSymbol(T& symbol, const void* src, size_t n, size_t offset = 0,
                                      cudaMemcpyKind = cudaMemcpyHostToDevice) {
  if (offset + n > sizeof(T)) return cudaErrorInvalidValue;
  std::memcpy(reinterpret_cast<char*>(&symbol) + offset, src, n);
  return cudaSuccess;
}

// Launches are synchronous and their errors are thrown, so there is never anything to wait for or
// a pending error to return.
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaStreamCreate(cudaStream_t* s) { *s = nullptr; return cudaSuccess; }
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { *s = nullptr; return cudaSuccess; }
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }

inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    default: return "cudaError (emulated)";
  }
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "unknown error (emulated runtime)";
  }
}

// Only the dynamic-shared-memory opt-in is recorded: launches above 48 KiB without it fail, as on a GPU.
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > (227 << 10)) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(cuemu::detail::attr_mutex());
  auto& v = cuemu::detail::smem_attrs();
  const void* key = reinterpret_cast<const void*>(func);
  for (auto& [f, n] : v)
    if (f == key) return n = size_t(value), cudaSuccess;
  v.emplace_back(key, size_t(value));
  return cudaSuccess;
}
