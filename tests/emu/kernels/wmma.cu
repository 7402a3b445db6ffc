// wmma 16x16x16 GEMM (half inputs, fp32 accumulation, an element-wise op on the accumulator fragment)
// and the misuse the emulated <mma.h> must report.
#include <mma.h>
#include "llmkern/launch.cuh"
#include "harness.h"
#include <cmath>

using namespace nvcuda;

// C = alpha * A[M,K] * B[K,N] (+ beta * C): one warp per 16x16 tile of C; A row-major, B column-major.
// Blocks of 64 threads hold two warps side by side in N.
__global__ void wmma_gemm(const __half* A, const __half* B, float* C, int M, int N, int K, float alpha,
                          float beta) {
  int warp = threadIdx.x / 32;
  int tm = blockIdx.y * 16, tn = (blockIdx.x * 2 + warp) * 16;
  if (tn >= N) return;  // whole warps only: no barrier below
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc, c;
  wmma::fill_fragment(acc, 0.0f);
  for (int k = 0; k < K; k += 16) {
    wmma::load_matrix_sync(a, A + size_t(tm) * K + k, K);
    wmma::load_matrix_sync(b, B + size_t(tn) * K + k, K);
    wmma::mma_sync(acc, a, b, acc);
  }
  wmma::load_matrix_sync(c, C + size_t(tm) * N + tn, N, wmma::mem_row_major);
  for (int i = 0; i < c.num_elements; i++) c.x[i] = alpha * acc.x[i] + beta * c.x[i];
  wmma::store_matrix_sync(C + size_t(tm) * N + tn, c, N, wmma::mem_row_major);
}

static void run_gemm(const char* name, int offset) {
  int M = 48, N = 80, K = 64;
  auto a = harness::random_vector(size_t(M) * K + 16, 11), b = harness::random_vector(size_t(N) * K, 12);
  auto c0 = harness::random_vector(size_t(M) * N, 13);
  // 32-byte aligned buffers; `offset` elements in to plant a misaligned pointer.
  __half* ha = static_cast<__half*>(::operator new((a.size()) * 2, std::align_val_t(64)));
  __half* hb = static_cast<__half*>(::operator new(b.size() * 2, std::align_val_t(64)));
  float* hc = static_cast<float*>(::operator new(c0.size() * 4, std::align_val_t(64)));
  for (size_t i = 0; i < a.size(); i++) ha[i] = __float2half_rn(a[i]);
  for (size_t i = 0; i < b.size(); i++) hb[i] = __float2half_rn(b[i]);
  for (size_t i = 0; i < c0.size(); i++) hc[i] = c0[i];
  float alpha = 0.5f, beta = -2.0f;
  dim3 grid((N / 16 + 1) / 2, M / 16);
  LAUNCH(wmma_gemm, grid, 64, 0, nullptr)(ha + offset, hb, hc, M, N, K, alpha, beta);
  double err = 0;
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      double r = 0;
      for (int k = 0; k < K; k++)
        r += double(__half2float(ha[offset + size_t(i) * K + k])) * __half2float(hb[size_t(j) * K + k]);
      r = alpha * r + beta * c0[size_t(i) * N + j];
      err = std::max(err, std::fabs(r - hc[size_t(i) * N + j]));
    }
  std::printf("RESULT case=%s err=%.3g\n", name, err);
  ::operator delete(ha, std::align_val_t(64));
  ::operator delete(hb, std::align_val_t(64));
  ::operator delete(hc, std::align_val_t(64));
}
TEST_CASE(gemm) { run_gemm("gemm", 0); }
// Planted bug: A starts 4 halves (8 bytes) past a 32-byte boundary.
TEST_CASE(gemm_misaligned) { run_gemm("gemm_misaligned", 4); }

// Planted bug: only 16 lanes of the warp exist (a 16-thread block), wmma needs all 32.
__global__ void wmma_half_warp(float* C) {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 1.0f);
  wmma::store_matrix_sync(C, acc, 16, wmma::mem_row_major);
}
TEST_CASE(wmma_partial_warp) {
  float* c = static_cast<float*>(::operator new(256 * 4, std::align_val_t(64)));
  LAUNCH(wmma_half_warp, 1, 16, 0, nullptr)(c);
  ::operator delete(c, std::align_val_t(64));
}
