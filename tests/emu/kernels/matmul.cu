// Tiled half x half -> fp32 matmul with block barriers, its two racy variants (the planted missing
// __syncthreads), and the barrier misuse the emulator must report.
#include "llmkern/launch.cuh"
#include "harness.h"
#include <cmath>
#include <cstdlib>

constexpr int TILE = 16;

// C[M,N] = A[M,K] * B[K,N], row-major. Each 16x16 block computes one tile of C.
template <bool SYNC_AFTER_LOAD, bool SYNC_AFTER_COMPUTE>
__global__ void matmul_tiled(const __half* A, const __half* B, float* C, int M, int N, int K) {
  __shared__ __half As[TILE][TILE];
  __shared__ __half Bs[TILE][TILE];
  int row = blockIdx.y * TILE + threadIdx.y, col = blockIdx.x * TILE + threadIdx.x;
  float acc = 0.f;
  for (int k0 = 0; k0 < K; k0 += TILE) {
    int ka = k0 + threadIdx.x, kb = k0 + threadIdx.y;
    As[threadIdx.y][threadIdx.x] = row < M && ka < K ? A[size_t(row) * K + ka] : __float2half_rn(0.f);
    Bs[threadIdx.y][threadIdx.x] = kb < K && col < N ? B[size_t(kb) * N + col] : __float2half_rn(0.f);
    if (SYNC_AFTER_LOAD) __syncthreads();
    for (int k = 0; k < TILE; k++) acc = fmaf(__half2float(As[threadIdx.y][k]), __half2float(Bs[k][threadIdx.x]), acc);
    if (SYNC_AFTER_COMPUTE) __syncthreads();
  }
  if (row < M && col < N) C[size_t(row) * N + col] = acc;
}

template <bool L, bool C>
static void run_matmul(const char* name) {
  int M = 80, N = 96, K = 112;  // 7 k-tiles; not all multiples of the grid
  auto a = harness::random_vector(size_t(M) * K, 1), b = harness::random_vector(size_t(K) * N, 2);
  std::vector<__half> ha(a.size()), hb(b.size());
  for (size_t i = 0; i < a.size(); i++) ha[i] = __float2half_rn(a[i]);
  for (size_t i = 0; i < b.size(); i++) hb[i] = __float2half_rn(b[i]);
  std::vector<float> c(size_t(M) * N, -1.f);
  dim3 grid((N + TILE - 1) / TILE, (M + TILE - 1) / TILE), block(TILE, TILE);
  LAUNCH((matmul_tiled<L, C>), grid, block, 0, nullptr)(ha.data(), hb.data(), c.data(), M, N, K);
  double err = 0;
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      double r = 0;
      for (int k = 0; k < K; k++) r += double(__half2float(ha[size_t(i) * K + k])) * __half2float(hb[size_t(k) * N + j]);
      err = std::max(err, std::fabs(r - c[size_t(i) * N + j]));
    }
  std::printf("RESULT case=%s err=%.3g\n", name, err);
}
TEST_CASE(matmul) { run_matmul<true, true>("matmul"); }
TEST_CASE(matmul_no_sync_after_load) { run_matmul<false, true>("matmul_no_sync_after_load"); }
TEST_CASE(matmul_no_sync_after_compute) { run_matmul<true, false>("matmul_no_sync_after_compute"); }

// Each thread reads its left neighbour's slot: right in forward order without the barrier, wrong in
// reverse order. With the barrier it is right in every order.
template <bool SYNC>
__global__ void shift_left(const int* in, int* out) {
  __shared__ int s[64];
  s[threadIdx.x] = in[threadIdx.x];
  if (SYNC) __syncthreads();
  out[threadIdx.x] = threadIdx.x ? s[threadIdx.x - 1] : 0;
}
template <bool SYNC>
static void run_shift(const char* name) {
  std::vector<int> in(64), out(64, -1);
  for (int i = 0; i < 64; i++) in[i] = 1000 + i * 7;
  LAUNCH((shift_left<SYNC>), 1, 64, 0, nullptr)(in.data(), out.data());
  int bad = 0;
  for (int i = 0; i < 64; i++) bad += out[i] != (i ? in[i - 1] : 0);
  std::printf("RESULT case=%s bad=%d\n", name, bad);
}
TEST_CASE(shift) { run_shift<true>("shift"); }
TEST_CASE(shift_no_sync) { run_shift<false>("shift_no_sync"); }

// Planted bug: __syncthreads in both arms of a divergent branch.
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = 1.f;
    __syncthreads();
  } else {
    __syncthreads();
    out[threadIdx.x] = 2.f;
  }
}
TEST_CASE(divergent) {
  std::vector<float> out(64);
  LAUNCH(divergent_barrier, 2, 64, 0, nullptr)(out.data());
}

// Planted bug: early return before a barrier (undefined behaviour in CUDA).
__global__ void early_return(const float* x, float* out, int n) {
  __shared__ float s[128];
  int i = threadIdx.x;
  if (i >= n) return;
  s[i] = x[i];
  __syncthreads();
  out[i] = s[n - 1 - i];
}
TEST_CASE(early_exit) {
  std::vector<float> x(128, 1.f), out(128);
  LAUNCH(early_return, 1, 128, 0, nullptr)(x.data(), out.data(), 100);
}

// Planted bug: lane 0 waits in __syncwarp while its warp waits at __syncthreads.
__global__ void warp_vs_block(int* out) {
  if (threadIdx.x == 0) __syncwarp();
  __syncthreads();
  out[threadIdx.x] = 1;
}
TEST_CASE(deadlock) {
  std::vector<int> out(64);
  LAUNCH(warp_vs_block, 1, 64, 0, nullptr)(out.data());
}

__global__ void traps(int* out) {
  if (threadIdx.x == 3) __trap();
  out[threadIdx.x] = 1;
}
TEST_CASE(trap) {
  std::vector<int> out(32);
  LAUNCH(traps, 1, 32, 0, nullptr)(out.data());
}

__global__ void throws_in_kernel(int* out) {
  if (blockIdx.x == 1 && threadIdx.x == 9) throw std::runtime_error("boom from kernel code");
  out[threadIdx.x] = 1;
}
TEST_CASE(exception) {
  std::vector<int> out(32);
  LAUNCH(throws_in_kernel, 2, 32, 0, nullptr)(out.data());
}

TEST_CASE(too_many_threads) {
  std::vector<int> out(2048);
  LAUNCH(warp_vs_block, 1, 1025, 0, nullptr)(out.data());
}

// Dynamic shared memory: exactly the requested bytes, 0xFF-filled (NaN) before each block; more than
// 48 KiB needs the opt-in attribute, as on a GPU.
__global__ void dyn_smem_probe(float* out, int n) {
  float* s = llmkern::dyn_smem<float>();
  out[blockIdx.x * 2] = s[threadIdx.x];  // unwritten: NaN
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = float(i);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x * 2 + 1] = s[n - 1];
}
TEST_CASE(dyn_smem) {
  int n = (64 << 10) / 4;
  std::vector<float> out(4);
  try {
    LAUNCH(dyn_smem_probe, 2, 64, n * sizeof(float), nullptr)(out.data(), n);
    std::printf("RESULT case=dyn_smem missed_limit=1\n");
  } catch (const cuemu::KernelError& e) {
    std::printf("RESULT case=dyn_smem limit_reported=%d\n", std::strstr(e.what(), "cudaFuncSetAttribute") != nullptr);
  }
  cudaFuncSetAttribute(dyn_smem_probe, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10);
  LAUNCH(dyn_smem_probe, 2, 64, n * sizeof(float), nullptr)(out.data(), n);
  std::printf("RESULT case=dyn_smem nan=%d last=%g\n", int(std::isnan(out[0]) && std::isnan(out[2])), out[3]);
}

// After a failed launch (stacks abandoned mid-kernel), the next launches work and give right results.
TEST_CASE(recover) {
  for (int round = 0; round < 3; round++) {
    try {
      std::vector<float> out(64);
      LAUNCH(divergent_barrier, 2, 64, 0, nullptr)(out.data());
      std::printf("RESULT case=recover missed_error=1\n");
    } catch (const cuemu::KernelError&) {
    }
    try {
      std::vector<int> out(64);
      LAUNCH(warp_vs_block, 1, 64, 0, nullptr)(out.data());
    } catch (const cuemu::KernelError&) {
    }
    run_shift<true>("recover_shift");
  }
  run_matmul<true, true>("recover_matmul");
}
