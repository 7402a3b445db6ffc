// Block reductions (warp shuffles, static and dynamic shared memory, atomics), votes, half/bf16
// atomics, and the warp-collective misuse the emulator must report.
#include "llmkern/launch.cuh"
#include "harness.h"
#include <cmath>

// Grid-stride sum: __shfl_xor_sync warp reduce, per-warp partials in static shared memory, one
// atomicAdd per block.
template <int BLOCK>
__global__ void block_sum(const float* x, float* out, int n) {
  __shared__ float partial[BLOCK / 32];
  float s = 0.f;
  for (int i = blockIdx.x * BLOCK + threadIdx.x; i < n; i += gridDim.x * BLOCK) s += x[i];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    s = threadIdx.x < BLOCK / 32 ? partial[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
    if (threadIdx.x == 0) atomicAdd(out, s);
  }
}

// The same with dynamic shared memory (one slot per thread) and a __shfl_down_sync tree; works for any
// blockDim.x that is a multiple of 32.
__global__ void block_sum_dyn(const float* x, float* out, int n) {
  float* sm = llmkern::dyn_smem<float>();
  float s = 0.f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) s += x[i];
  sm[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    s = 0.f;
    for (unsigned i = threadIdx.x; i < blockDim.x; i += 32) s += sm[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xFFFFFFFFu, s, o);
    if (threadIdx.x == 0) atomicAdd(out, s);
  }
}

static void check_sum(const char* what, int blocks, int threads, size_t smem, bool dyn) {
  int n = 100003;
  auto x = harness::random_vector(n, 7);
  double ref = 0;
  for (float v : x) ref += v;
  float out = 0.f;
  if (dyn) LAUNCH(block_sum_dyn, blocks, threads, smem, nullptr)(x.data(), &out, n);
  else LAUNCH((block_sum<256>), blocks, threads, smem, nullptr)(x.data(), &out, n);
  std::printf("RESULT case=%s err=%.3g ref=%.6f\n", what, std::fabs(out - ref), ref);
}

TEST_CASE(sum) { check_sum("sum", 8, 256, 0, false); }
TEST_CASE(sum_dyn) { check_sum("sum_dyn", 5, 192, 192 * sizeof(float), true); }
// Every warp reduces its own values with full-mask shuffles and adds them atomically.
__global__ void warp_sum(const float* x, float* out, int n) {
  float s = 0.f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) s += x[i];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
  if (threadIdx.x % 32 == 0) atomicAdd(out, s);
}
TEST_CASE(warp_sum_full) {
  auto x = harness::random_vector(5000, 3);
  double ref = 0;
  for (float v : x) ref += v;
  float out = 0.f;
  LAUNCH(warp_sum, 3, 224, 0, nullptr)(x.data(), &out, 5000);
  std::printf("RESULT case=warp_sum_full err=%.3g\n", std::fabs(out - ref));
}
// Planted bug: 200 threads, so the last warp has 8 lanes, but the shuffles name all 32 (on a GPU,
// lanes 0-7 would add undefined values).
TEST_CASE(sum_partial_warp) {
  auto x = harness::random_vector(5000, 3);
  float out = 0.f;
  LAUNCH(warp_sum, 3, 200, 0, nullptr)(x.data(), &out, 5000);
  std::printf("RESULT case=sum_partial_warp out=%g\n", out);
}

// Planted bug: a full-mask shuffle inside a branch taken by even lanes only.
__global__ void shfl_in_branch(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 2 == 0) v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
  out[threadIdx.x] = v;
}
TEST_CASE(shfl_divergent) {
  std::vector<float> out(64);
  LAUNCH(shfl_in_branch, 1, 64, 0, nullptr)(out.data());
}

// Planted bug: the mask excludes the calling lane.
__global__ void shfl_mask_excludes_self(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0x0000FFFFu, 1.0f, 1);
}
TEST_CASE(shfl_excludes_self) {
  std::vector<float> out(32);
  LAUNCH(shfl_mask_excludes_self, 1, 32, 0, nullptr)(out.data());
}

// Half-warp shuffles with disjoint masks and width 16 run as two independent groups.
__global__ void half_warp_sum(int* out) {
  unsigned mask = threadIdx.x % 32 < 16 ? 0x0000FFFFu : 0xFFFF0000u;
  int v = int(threadIdx.x);
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o, 16);
  out[threadIdx.x] = v;
}
TEST_CASE(half_warps) {
  std::vector<int> out(64);
  LAUNCH(half_warp_sum, 1, 64, 0, nullptr)(out.data());
  int bad = 0;
  for (int t = 0; t < 64; t++) {
    int base = t / 16 * 16, ref = 16 * base + 120;
    bad += out[t] != ref;
  }
  std::printf("RESULT case=half_warps bad=%d\n", bad);
}

// Votes and counting barriers.
__global__ void votes(unsigned* ballots, int* flags, int* counts) {
  int pred = threadIdx.x % 3 == 0;
  unsigned b = __ballot_sync(0xFFFFFFFFu, pred);
  int any = __any_sync(0xFFFFFFFFu, threadIdx.x == 37);
  int all = __all_sync(0xFFFFFFFFu, threadIdx.x < 1000);
  int count = __syncthreads_count(pred);
  int orv = __syncthreads_or(threadIdx.x == 5);
  int andv = __syncthreads_and(threadIdx.x != 5);
  if (threadIdx.x % 32 == 0) ballots[threadIdx.x / 32] = b;
  flags[threadIdx.x] = any * 4 + all * 2 + (orv && !andv);
  counts[threadIdx.x] = count;
}
TEST_CASE(vote) {
  std::vector<unsigned> ballots(4);
  std::vector<int> flags(128), counts(128);
  LAUNCH(votes, 1, 128, 0, nullptr)(ballots.data(), flags.data(), counts.data());
  int bad = 0;
  for (int w = 0; w < 4; w++) {
    unsigned ref = 0;
    for (int l = 0; l < 32; l++) ref |= unsigned((w * 32 + l) % 3 == 0) << l;
    bad += ballots[w] != ref;
  }
  for (int t = 0; t < 128; t++) bad += flags[t] != ((t / 32 == 1) * 4 + 2 + 1) || counts[t] != 43;
  std::printf("RESULT case=vote bad=%d\n", bad);
}

// Atomics on half, bf16, float, and integer or/max/min/CAS from many blocks.
__global__ void atomics(__half* h, __nv_bfloat16* b, float* f, unsigned* bits, int* mx, int* mn) {
  int t = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&h[t % 8], __float2half_rn(1.0f));
  atomicAdd(&b[t % 8], __float2bfloat16_rn(0.5f));
  atomicAdd(&f[t % 8], 0.25f);
  atomicOr(&bits[t % 4], 1u << (t % 32));
  atomicMax(mx, (t * 7919) % 1021);
  atomicMin(mn, (t * 7919) % 1021 - 500);
}
TEST_CASE(atomics_half) {
  std::vector<__half> h(8, __float2half_rn(0.f));
  std::vector<__nv_bfloat16> b(8, __float2bfloat16_rn(0.f));
  std::vector<float> f(8, 0.f);
  std::vector<unsigned> bits(4, 0);
  int mx = -1, mn = 1 << 30;
  LAUNCH(atomics, 4, 256, 0, nullptr)(h.data(), b.data(), f.data(), bits.data(), &mx, &mn);
  int bad = 0;
  int rmx = -1, rmn = 1 << 30;
  for (int t = 0; t < 1024; t++) rmx = std::max(rmx, (t * 7919) % 1021), rmn = std::min(rmn, (t * 7919) % 1021 - 500);
  // 128 adds per slot: exact in half (1.0 each) and bf16 (0.5 each: 64 < 256).
  for (int i = 0; i < 8; i++)
    bad += __half2float(h[i]) != 128.f || __bfloat162float(b[i]) != 64.f || f[i] != 32.f;
  for (int i = 0; i < 4; i++) {
    unsigned ref = 0;
    for (int t = i; t < 1024; t += 4) ref |= 1u << (t % 32);
    bad += bits[i] != ref;
  }
  bad += mx != rmx || mn != rmn;
  std::printf("RESULT case=atomics_half bad=%d\n", bad);
}
