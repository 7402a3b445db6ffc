// Built with -fsanitize=address -DCUEMU_SHARED_STATIC: a clean run of barrier and shuffle code (the
// fiber switches are annotated for ASan), an off-by-one global write and an overflowing shared index.
#include "llmkern/launch.cuh"
#include "harness.h"

__global__ void reduce_and_shift(const float* x, float* out, int n) {
  __shared__ float s[64];
  float v = threadIdx.x < unsigned(n) ? x[threadIdx.x] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  s[threadIdx.x] = v;
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 32) % 64];
}
TEST_CASE(clean) {
  float *x, *out;
  cudaMalloc(&x, 64 * sizeof(float));
  cudaMalloc(&out, 64 * sizeof(float));
  for (int i = 0; i < 64; i++) x[i] = 1.f;
  for (int round = 0; round < 3; round++) LAUNCH(reduce_and_shift, 4, 64, 0, nullptr)(x, out, 64);
  std::printf("RESULT case=clean out0=%g\n", out[0]);
  cudaFree(x);
  cudaFree(out);
}

// Planted bug: `i <= n` writes one element past the end.
__global__ void scale_off_by_one(float* y, const float* x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) y[i] = 2.f * x[i < n ? i : 0];
}
TEST_CASE(oob_global) {
  int n = 100;
  float *x, *y;
  cudaMalloc(&x, n * sizeof(float));
  cudaMalloc(&y, n * sizeof(float));
  for (int i = 0; i < n; i++) x[i] = float(i);
  LAUNCH(scale_off_by_one, 2, 64, 0, nullptr)(y, x, n);
  std::printf("RESULT case=oob_global y1=%g\n", y[1]);
  cudaFree(x);
  cudaFree(y);
}

// Planted bug: a 65th thread indexes a 64-element shared array.
__global__ void shared_overflow(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}
TEST_CASE(oob_shared) {
  std::vector<float> out(65);
  LAUNCH(shared_overflow, 1, 65, 0, nullptr)(out.data());
  std::printf("RESULT case=oob_shared out=%g\n", out[64]);
}
