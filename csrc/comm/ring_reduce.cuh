// The reduction kernel of the NCCL ring (csrc/comm/nccl_comm.cu): out = recv * recv_scale + own *
// own_scale (sum, avg) or out = max(recv, own) (max; a NaN in either wins, as in torch.maximum),
// element by element, computed in fp32 (fp64 for fp64 buffers) and rounded once on store.
// No torch headers: nvcc compiles this in seconds, and the emulated build (csrc/emu) runs it on CPU
// threads, one per rank.
//
// Types: Own is the buffer's dtype (float, __half, __nv_bfloat16, double); Recv (the chunk received
// from the left neighbour) and Out are Own, or float when 16-bit partial sums travel in fp32 (see
// nccl_comm.cu, "fp32 accumulation"). The scales carry op=avg: each contribution is pre-divided by the
// world size the first time it is added, so partial sums never exceed the largest input (a sum of 8
// fp16 gradients near 10^4 would otherwise overflow 65504 on the wire).
//
// Vectorization: 16-byte packs of Own (8 halves, 4 floats, 2 doubles) and packs of as many Recv/Out
// elements. A chunk can start at any element (chunk_range cuts n into world near-equal parts), so the
// kernel takes `head` scalar elements until `own` is pack-aligned; the host places the scratch
// buffers so that recv + head and out + head are then aligned too, or passes head = -1 to run the
// scalar loop only. Offsets and counts are int64: a bucket may hold more than 2^31 elements.
#pragma once
#include "llmkern/launch.cuh"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace llmkern::comm {

template <class T>
using AccType = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class A>
__device__ __forceinline__ A to_acc(float x) { return A(x); }
template <class A>
__device__ __forceinline__ A to_acc(double x) { return A(x); }
template <class A>
__device__ __forceinline__ A to_acc(__half x) { return A(__half2float(x)); }
template <class A>
__device__ __forceinline__ A to_acc(__nv_bfloat16 x) { return A(__bfloat162float(x)); }

template <class T, class A>
__device__ __forceinline__ T from_acc(A x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(x));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(x));
  else return T(x);
}

// Elements per pack: 16 bytes of the buffer's dtype.
template <class Own>
inline constexpr int kPack = 16 / int(sizeof(Own));

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// take_max is uniform across the grid (one op per launch), so the branch never diverges.
template <class A>
__device__ __forceinline__ A combine(A recv, A own, A a, A b, bool take_max) {
  if (take_max) return recv != recv ? recv : own != own ? own : recv > own ? recv : own;
  return recv * a + own * b;
}

template <class Out, class Recv, class Own>
__device__ __forceinline__ void reduce_one(Out* out, const Recv* recv, const Own* own, int64_t i,
                                           AccType<Own> a, AccType<Own> b, bool take_max) {
  using A = AccType<Own>;
  out[i] = from_acc<Out>(combine<A>(to_acc<A>(recv[i]), to_acc<A>(own[i]), a, b, take_max));
}

// head >= 0: elements [0, head) and the tail past the last whole pack are scalar, the rest packs.
// head < 0: all scalar (the host found recv or out misaligned relative to own).
template <class Out, class Recv, class Own>
__global__ void ring_reduce_kernel(Out* out, const Recv* recv, const Own* own, int64_t n, int64_t head,
                                   AccType<Own> recv_scale, AccType<Own> own_scale, bool take_max) {
  using A = AccType<Own>;
  constexpr int N = kPack<Own>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const bool vec = head >= 0 && head < n;
  const int64_t packs = vec ? (n - head) / N : 0;
  for (int64_t p = tid; p < packs; p += stride) {
    const int64_t i = head + p * N;
    const Pack<Recv, N> r = *reinterpret_cast<const Pack<Recv, N>*>(recv + i);
    const Pack<Own, N> o = *reinterpret_cast<const Pack<Own, N>*>(own + i);
    Pack<Out, N> res;
#pragma unroll
    for (int k = 0; k < N; ++k)
      res.v[k] = from_acc<Out>(combine<A>(to_acc<A>(r.v[k]), to_acc<A>(o.v[k]), recv_scale, own_scale, take_max));
    *reinterpret_cast<Pack<Out, N>*>(out + i) = res;
  }
  // Scalar elements: the head, then everything after the packs.
  const int64_t h = vec ? head : 0, body_end = vec ? head + packs * N : 0;
  const int64_t scalars = h + (n - body_end);
  for (int64_t j = tid; j < scalars; j += stride) {
    const int64_t i = j < h ? j : body_end + (j - h);
    reduce_one(out, recv, own, i, recv_scale, own_scale, take_max);
  }
}

// Launches the kernel for n elements on `stream`. 256 threads (one pack each per iteration) and at
// most 1024 blocks in a grid-stride loop: 1024 x 256 threads x 16 B = 4 MiB per sweep, enough to fill
// an H100 (132 SMs x 2048 threads) for the chunk sizes of 25 MiB buckets.
template <class Out, class Recv, class Own>
void launch_ring_reduce(Out* out, const Recv* recv, const Own* own, int64_t n, AccType<Own> recv_scale,
                        AccType<Own> own_scale, bool take_max, cudaStream_t stream) {
  if (n <= 0) return;
  constexpr int N = kPack<Own>;
  auto residue = [](const void* p, size_t size) { return int64_t(reinterpret_cast<uintptr_t>(p) / size % N); };
  const int64_t own_res = residue(own, sizeof(Own));
  const int64_t head = (N - own_res) % N;
  const bool aligned = reinterpret_cast<uintptr_t>(own) % sizeof(Own) == 0 &&
                       reinterpret_cast<uintptr_t>(recv + head) % sizeof(Pack<Recv, N>) == 0 &&
                       reinterpret_cast<uintptr_t>(out + head) % sizeof(Pack<Out, N>) == 0;
  const int64_t work = aligned ? (n - head) / N + 2 * N : n;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>(1024, (work + threads - 1) / threads));
  LAUNCH((ring_reduce_kernel<Out, Recv, Own>), blocks, threads, 0, stream)(out, recv, own, n, aligned ? head : -1,
                                                                          recv_scale, own_scale, take_max);
  LLMKERN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace llmkern::comm
