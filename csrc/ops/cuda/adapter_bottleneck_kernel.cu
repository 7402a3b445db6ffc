// CUDA implementation of the fused bottleneck adapter (schema: csrc/ops/adapter_bottleneck.cpp).
// Four kernels, all accumulating in fp32, with int64 element offsets (T·C may pass 2^31):
//   fwd_rows    one block per row: LN statistics, z = LN?(x)·Dᵀ + d (block reductions, kRC ranks
//               at a time), act(z) staged in shared memory, out = r + s·(act(z)·Uᵀ + u)
//   bwd_rows    one block per row: gz = s·(g·U)·act'(z), s·act(z) (both (T, R) fp32 scratch), then
//               gh = gz·D, the LN backward (two block sums) and gx (+ g in the series form)
//   wgrad       P[b, r, k] = Σ_{n in row block b} U[n, r]·v(n, k), v = g or LN(x) recomputed:
//               gUᵀ (U = s·act(z), v = g) and gD (U = gz, v = LN?(x))
//   colgrad     Q[b, :, c] = (s·Σ g, Σ gh·x̂, Σ gh) over row block b, gh recomputed from gz and D
// The weight gradients are per-row-block partials summed by one ATen reduction afterwards: no
// atomics, so the result is deterministic (the LoRA kernels use atomics; here determinism costs
// row_blocks × R × C × 4 bytes of scratch per weight, 4 MiB at T=2048, C=4096, R=64).
// act(z) and LN(x) are recomputed in the backward from z, mean and rstd, never stored. bwd_rows
// computes gh = gz·D twice with LN (once for the two row sums, once for gx) instead of keeping a
// (T, C) fp32 scratch: R multiply-adds per element against 4 bytes of traffic each way.
// Not timed yet (no GPU on the dev machines): the row kernels read all of D and Uᵀ (1 MiB each in
// fp32 at R=64, C=4096) from L2 for every row, ~4 GiB of L2 reads per forward at T=2048, so they
// are L2-bound where cuBLAS GEMMs would be compute-bound; a tiled (tensor-core) version that
// reuses each weight tile over many rows is the next step if the GPU numbers call for it.
// The same file is compiled by g++ against csrc/emu and tested on CPU tensors (llmkern_emu::).
#include <ATen/ATen.h>

#include <algorithm>
#include <type_traits>

#include "../adapter_bottleneck.h"
#include "llmkern/activation.h"
#include "llmkern/column_reduce.cuh"
#include "llmkern/element.cuh"
#include "llmkern/launch.cuh"
#include "llmkern/registration.h"

namespace llmkern::ops {
namespace detail {
namespace {

constexpr int kWarp = 32;
constexpr int kRowThreads = 256;  // row kernels: 8 warps per row
constexpr int kRowWarps = kRowThreads / kWarp;
constexpr int kRC = 8;            // ranks per register chunk
constexpr int kLanes = 8;         // wgrad/colgrad block: 32 columns × 8 row lanes
static_assert(kWarp == cuda::kColumns, "the wgrad grid is ceil(K / kWarp) blocks of kWarp columns");

struct Dev {
  int64_t N, C, R;
  Act act;
  bool ln;
  float scale, eps;
  const float *d, *db, *ut, *ub, *lnw, *lnb;  // d, ut: (R, C); lnw, lnb null without LN
};

// Sums v[0..K) over the block; the totals land in tot[0..K) (shared), valid after return until the
// next call. red is shared scratch of kRowWarps·K floats.
template <int K>
__device__ void block_sum(float (&v)[K], float* red, float* tot) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int j = 0; j < K; ++j)
    for (int off = kWarp / 2; off > 0; off /= 2) v[j] += __shfl_xor_sync(0xffffffffu, v[j], off);
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < K; ++j) red[warp * K + j] = v[j];
  }
  __syncthreads();
  if (threadIdx.x < K) {
    float s = 0.f;
    for (int w = 0; w < kRowWarps; ++w) s += red[w * K + threadIdx.x];
    tot[threadIdx.x] = s;
  }
  __syncthreads();
}

template <typename T>
__device__ float ln_value(const Dev& p, const T* row, int64_t c, float mu, float rs) {
  const float v = Elem<T>::load(row[c]);
  return p.ln ? (v - mu) * rs * p.lnw[c] + p.lnb[c] : v;
}

template <typename T>
__global__ void adapter_fwd_rows_kernel(Dev p, const T* __restrict__ x, const T* __restrict__ res,
                                        T* __restrict__ out, float* __restrict__ z, float* __restrict__ mean,
                                        float* __restrict__ rstd) {
  __shared__ float red[kRowWarps * kRC];
  __shared__ float tot[kRC];
  float* as = dyn_smem<float>();  // [R]: act(z) of this row
  const int64_t C = p.C, R = p.R;
  for (int64_t n = blockIdx.x; n < p.N; n += gridDim.x) {
    const T* xr = x + n * C;
    float mu = 0.f, rs = 1.f;
    if (p.ln) {
      float s[1] = {0.f};
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s[0] += Elem<T>::load(xr[c]);
      block_sum<1>(s, red, tot);
      mu = tot[0] / static_cast<float>(C);
      float q[1] = {0.f};
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
        const float dv = Elem<T>::load(xr[c]) - mu;
        q[0] += dv * dv;
      }
      block_sum<1>(q, red, tot);
      rs = rsqrtf(tot[0] / static_cast<float>(C) + p.eps);
      if (threadIdx.x == 0) {
        mean[n] = mu;
        rstd[n] = rs;
      }
    }
    for (int64_t r0 = 0; r0 < R; r0 += kRC) {
      float acc[kRC];
#pragma unroll
      for (int j = 0; j < kRC; ++j) acc[j] = 0.f;
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
        const float h = ln_value(p, xr, c, mu, rs);
#pragma unroll
        for (int j = 0; j < kRC; ++j)
          if (r0 + j < R) acc[j] += h * p.d[(r0 + j) * C + c];
      }
      block_sum<kRC>(acc, red, tot);
      const int64_t r = r0 + threadIdx.x;
      if (threadIdx.x < kRC && r < R) {
        const float zz = tot[threadIdx.x] + p.db[r];
        z[n * R + r] = zz;
        as[r] = act_fwd(p.act, zz);
      }
    }
    __syncthreads();  // as[] complete
    const T* rr = (res ? res : x) + n * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      float acc = 0.f;
      for (int64_t r = 0; r < R; ++r) acc += as[r] * p.ut[r * C + c];
      out[n * C + c] = Elem<T>::store(Elem<T>::load(rr[c]) + p.scale * (acc + p.ub[c]));
    }
    __syncthreads();  // as[] and tot[] are rewritten by the next row
  }
}

template <typename T>
__global__ void adapter_bwd_rows_kernel(Dev p, const T* __restrict__ g, const T* __restrict__ x,
                                        const float* __restrict__ z, const float* __restrict__ mean,
                                        const float* __restrict__ rstd, bool residual_is_x, T* __restrict__ gx,
                                        float* __restrict__ gz, float* __restrict__ sa) {
  __shared__ float red[kRowWarps * kRC];
  __shared__ float tot[kRC];
  float* gzs = dyn_smem<float>();  // [R]: gz of this row
  const int64_t C = p.C, R = p.R;
  for (int64_t n = blockIdx.x; n < p.N; n += gridDim.x) {
    const T* gr = g + n * C;
    for (int64_t r0 = 0; r0 < R; r0 += kRC) {
      float acc[kRC];
#pragma unroll
      for (int j = 0; j < kRC; ++j) acc[j] = 0.f;
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
        const float gv = Elem<T>::load(gr[c]);
#pragma unroll
        for (int j = 0; j < kRC; ++j)
          if (r0 + j < R) acc[j] += gv * p.ut[(r0 + j) * C + c];
      }
      block_sum<kRC>(acc, red, tot);
      const int64_t r = r0 + threadIdx.x;
      if (threadIdx.x < kRC && r < R) {
        const float zz = z[n * R + r];
        const float v = p.scale * tot[threadIdx.x] * act_grad(p.act, zz);
        gzs[r] = v;
        gz[n * R + r] = v;
        sa[n * R + r] = p.scale * act_fwd(p.act, zz);
      }
    }
    __syncthreads();  // gzs[] complete
    const T* xr = x + n * C;
    float mu = 0.f, rs = 1.f, m1 = 0.f, m2 = 0.f;
    if (p.ln) {
      mu = mean[n];
      rs = rstd[n];
      float s[2] = {0.f, 0.f};
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
        float gh = 0.f;
        for (int64_t r = 0; r < R; ++r) gh += gzs[r] * p.d[r * C + c];
        const float gxh = gh * p.lnw[c];
        s[0] += gxh;
        s[1] += gxh * (Elem<T>::load(xr[c]) - mu) * rs;
      }
      block_sum<2>(s, red, tot);
      m1 = tot[0] / static_cast<float>(C);
      m2 = tot[1] / static_cast<float>(C);
    }
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      float gh = 0.f;
      for (int64_t r = 0; r < R; ++r) gh += gzs[r] * p.d[r * C + c];
      float v = p.ln ? rs * (gh * p.lnw[c] - m1 - (Elem<T>::load(xr[c]) - mu) * rs * m2) : gh;
      if (residual_is_x) v += Elem<T>::load(gr[c]);
      gx[n * C + c] = Elem<T>::store(v);
    }
    __syncthreads();  // gzs[] and tot[] are rewritten by the next row
  }
}

// P[blockIdx.y, r, k] = Σ_{n in this block's rows} U[n, r]·v(n, k); v = src, or LN(src) when ln_src.
template <typename T>
__global__ void adapter_wgrad_kernel(Dev p, const float* __restrict__ U, const T* __restrict__ src, bool ln_src,
                                     const float* __restrict__ mean, const float* __restrict__ rstd,
                                     int64_t rows_per_block, float* __restrict__ P) {
  const int64_t C = p.C;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t n_end = n_begin + rows_per_block < p.N ? n_begin + rows_per_block : p.N;
  float* Pb = P + static_cast<int64_t>(blockIdx.y) * p.R * C;
  cuda::column_reduce<kLanes, kRC>(
      U, p.R, C, n_begin, n_end,
      [&](int64_t n, int64_t k) {
        const float v = Elem<T>::load(src[n * C + k]);
        return ln_src ? (v - mean[n]) * rstd[n] * p.lnw[k] + p.lnb[k] : v;
      },
      [&](int64_t r, int64_t k, float s) { Pb[r * C + k] = s; });
}

// Q[blockIdx.y, 0..3, c] = (s·Σ g, Σ gh·x̂, Σ gh) over this block's rows; gh = gz·D. Rows 1-2 only with LN.
template <typename T>
__global__ void adapter_colgrad_kernel(Dev p, const T* __restrict__ g, const T* __restrict__ x,
                                       const float* __restrict__ gz, const float* __restrict__ mean,
                                       const float* __restrict__ rstd, int64_t rows_per_block, float* __restrict__ Q) {
  __shared__ float red[kLanes][3][kWarp];
  const int tx = threadIdx.x % kWarp, ty = threadIdx.x / kWarp;
  const int64_t C = p.C, R = p.R;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + tx;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t n_end = n_begin + rows_per_block < p.N ? n_begin + rows_per_block : p.N;
  float sg = 0.f, sw = 0.f, sb = 0.f;
  if (c < C) {
    for (int64_t n = n_begin + ty; n < n_end; n += kLanes) {
      sg += Elem<T>::load(g[n * C + c]);
      if (p.ln) {
        float gh = 0.f;
        for (int64_t r = 0; r < R; ++r) gh += gz[n * R + r] * p.d[r * C + c];
        sw += gh * (Elem<T>::load(x[n * C + c]) - mean[n]) * rstd[n];
        sb += gh;
      }
    }
  }
  red[ty][0][tx] = sg;
  red[ty][1][tx] = sw;
  red[ty][2][tx] = sb;
  __syncthreads();
  if (c < C && ty < 3) {
    float s = 0.f;
#pragma unroll
    for (int l = 0; l < kLanes; ++l) s += red[l][ty][tx];
    Q[(static_cast<int64_t>(blockIdx.y) * 3 + ty) * C + c] = ty == 0 ? p.scale * s : s;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Dev dev_of(const AdapterShapes& sh, const AdapterParams& q, double scale, double eps) {
  return {sh.t, sh.c, sh.r, sh.act, sh.ln, static_cast<float>(scale), static_cast<float>(eps),
          q.d.data_ptr<float>(), q.db.data_ptr<float>(), q.ut.data_ptr<float>(), q.ub.data_ptr<float>(),
          sh.ln ? q.lnw.data_ptr<float>() : nullptr, sh.ln ? q.lnb.data_ptr<float>() : nullptr};
}

// Calls f(static_cast<T*>(nullptr)) with T the CUDA element type of x (fp32, fp16 or bf16; the
// checks refuse fp64, so it is not instantiated).
template <class F>
void dispatch_float(at::ScalarType d, F&& f) {
  switch (d) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kHalf: return f(static_cast<__half*>(nullptr));
    case at::kBFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
    default: TORCH_CHECK(false, "adapter_bottleneck: unsupported dtype ", d);
  }
}

unsigned row_grid(int64_t n) { return static_cast<unsigned>(std::min<int64_t>(n, 65535)); }

// Row blocks for the column reductions: about 512 blocks in total (~4 per SM on a 132-SM H100),
// each reducing >= 64 rows, so the partial buffer stays a few copies of (R, C).
int64_t rows_per_block(int64_t n, int64_t c) {
  const int64_t col_blocks = ceil_div(c, kWarp);
  const int64_t row_blocks = std::clamp<int64_t>(512 / std::max<int64_t>(col_blocks, 1), 1, ceil_div(n, 64));
  return ceil_div(n, row_blocks);
}

}  // namespace
}  // namespace detail

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_bottleneck_device(
    const at::Tensor& x, const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
    const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias, double scale, c10::string_view activation,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, double eps,
    const std::optional<at::Tensor>& residual) {
  using namespace detail;
  LLMKERN_DEVICE_GUARD(x);
  AdapterForward f = prepare_adapter_forward(x, down_weight, down_bias, up_weight, up_bias,
                                             std::string_view(activation.data(), activation.size()), ln_weight,
                                             ln_bias, eps, residual);
  const Dev p = dev_of(f.sh, f.p, scale, eps);
  if (p.N == 0) return f.outputs();
  dispatch_float(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    LAUNCH((adapter_fwd_rows_kernel<T>), dim3(row_grid(p.N)), dim3(kRowThreads), sizeof(float) * p.R,
           current_stream())(p, reinterpret_cast<const T*>(f.x.data_ptr()),
                             f.res.defined() ? reinterpret_cast<const T*>(f.res.data_ptr()) : nullptr,
                             reinterpret_cast<T*>(f.out.data_ptr()), f.z.data_ptr<float>(),
                             p.ln ? f.mean.data_ptr<float>() : nullptr, p.ln ? f.rstd.data_ptr<float>() : nullptr);
    LLMKERN_CUDA_CHECK(cudaGetLastError());
  });
  return f.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adapter_bottleneck_backward_device(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& down_weight,
                                   const std::optional<at::Tensor>& down_bias, const at::Tensor& up_weight,
                                   double scale, c10::string_view activation,
                                   const std::optional<at::Tensor>& ln_weight,
                                   const std::optional<at::Tensor>& ln_bias, const at::Tensor& z,
                                   const at::Tensor& mean, const at::Tensor& rstd, bool residual_is_x) {
  using namespace detail;
  LLMKERN_DEVICE_GUARD(x);
  AdapterBackward b = prepare_adapter_backward(grad_out, x, down_weight, down_bias, up_weight,
                                               std::string_view(activation.data(), activation.size()), ln_weight,
                                               ln_bias, z, mean, rstd);
  const auto& sh = b.sh;
  const Dev p = dev_of(sh, b.p, scale, 0.0);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor gz = at::empty({sh.t, sh.r}, f32), sa = at::empty({sh.t, sh.r}, f32);
  const int64_t rpb = sh.t > 0 ? rows_per_block(sh.t, sh.c) : 1;
  const int64_t row_blocks = sh.t == 0 ? 0 : ceil_div(sh.t, rpb);
  at::Tensor P = at::empty({2, row_blocks, sh.r, sh.c}, f32);  // [0]: gUᵀ partials, [1]: gD partials
  at::Tensor Q = at::empty({row_blocks, 3, sh.c}, f32);
  if (sh.t > 0) {
    const dim3 cgrid(static_cast<unsigned>(ceil_div(sh.c, kWarp)), static_cast<unsigned>(row_blocks));
    dispatch_float(x.scalar_type(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const T* g = reinterpret_cast<const T*>(b.g.data_ptr());
      const T* xp = reinterpret_cast<const T*>(b.x.data_ptr());
      const float* mp = p.ln ? b.mean.data_ptr<float>() : nullptr;
      const float* rp = p.ln ? b.rstd.data_ptr<float>() : nullptr;
      LAUNCH((adapter_bwd_rows_kernel<T>), dim3(row_grid(p.N)), dim3(kRowThreads), sizeof(float) * p.R,
             current_stream())(p, g, xp, b.z.data_ptr<float>(), mp, rp, residual_is_x,
                               reinterpret_cast<T*>(b.gx.data_ptr()), gz.data_ptr<float>(), sa.data_ptr<float>());
      LLMKERN_CUDA_CHECK(cudaGetLastError());
      LAUNCH((adapter_wgrad_kernel<T>), cgrid, dim3(kLanes * kWarp), 0, current_stream())(
          p, sa.data_ptr<float>(), g, false, mp, rp, rpb, P[0].data_ptr<float>());
      LLMKERN_CUDA_CHECK(cudaGetLastError());
      LAUNCH((adapter_wgrad_kernel<T>), cgrid, dim3(kLanes * kWarp), 0, current_stream())(
          p, gz.data_ptr<float>(), xp, p.ln, mp, rp, rpb, P[1].data_ptr<float>());
      LLMKERN_CUDA_CHECK(cudaGetLastError());
      LAUNCH((adapter_colgrad_kernel<T>), cgrid, dim3(kLanes * kWarp), 0, current_stream())(
          p, g, xp, gz.data_ptr<float>(), mp, rp, rpb, Q.data_ptr<float>());
      LLMKERN_CUDA_CHECK(cudaGetLastError());
    });
  }
  const at::Tensor ps = P.sum(1), qs = Q.sum(0);
  b.gut = ps[0];
  b.gd = ps[1];
  b.gdb = gz.sum(0);
  b.gub = qs[0];
  b.glnw = qs[1];
  b.glnb = qs[2];
  return b.outputs();
}

LLMKERN_DEVICE_IMPL(m) {
  m.impl("adapter_bottleneck", &adapter_bottleneck_device);
  m.impl("_adapter_bottleneck_backward", &adapter_bottleneck_backward_device);
}

}  // namespace llmkern::ops
