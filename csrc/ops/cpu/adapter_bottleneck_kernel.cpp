// CPU implementation of the fused bottleneck adapter (schema: csrc/ops/adapter_bottleneck.cpp).
//
// Rows are processed in blocks of RB = 8 tokens, each block by one OpenMP thread, with every
// intermediate of the block in fp32 scratch (RB×C per buffer, 128 KiB at C=4096: L2-resident):
//   forward   h = LN?(x)                        (row statistics -> mean, rstd)
//             z = h·Dᵀ + d                      (RB×R, written out: the one saved activation)
//             out = r + s·(act(z)·Uᵀ + u)
//   backward  ga = s·g·U,  gz = ga·act'(z)     act(z) recomputed from z, never stored
//             gu += s·Σ g,  gd += Σ gz;  h recomputed from x, mean, rstd;  gh = gz·D
//             LN backward per row (glnw += gh·x̂, glnb += gh) and gx (+ g in the series form)
//             then, per chunk of 512 rows, gUᵀ += (s·act(z))ᵀ·g and gD += gzᵀ·h by ATen GEMMs
// The vector gradients are summed per thread into its own slice of one fp32 buffer, and the
// slices are added by one ATen sum over the thread dimension afterwards: no atomics, no locks, and
// a result that depends only on the thread count.
// Column loops run over chunks of CB = 512 (a 2 KiB fp32 row chunk; RB rows = 16 KiB stay in the
// 32 KiB L1d) so that each parameter row chunk is reused by the RB rows of the block.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../adapter_bottleneck.h"
#include "llmkern/activation.h"
#include "llmkern/cpu_dot.h"
#include "llmkern/cpu_float.h"
#include "llmkern/registration.h"

namespace llmkern::ops {
namespace detail {
namespace {

constexpr int64_t RB = cpu::kDotRows;
constexpr int64_t CB = 512;

// Threads for a pass of `work` multiply-adds: below ~64K the OpenMP fork costs more than it saves
// (as for lora_linear).
int threads_for(int64_t work) { return work < (1 << 16) ? 1 : at::get_num_threads(); }

struct Params {
  int64_t T, C, R;
  Act act;
  bool ln;
  float scale, eps;
  const float *d, *db, *ut, *ub, *lnw, *lnb;  // d, ut: (R, C); lnw/lnb null without LN
};

Params params_of(const AdapterShapes& sh, const AdapterParams& p, double scale, double eps) {
  return {sh.t, sh.c, sh.r, sh.act, sh.ln, static_cast<float>(scale), static_cast<float>(eps),
          p.d.data_ptr<float>(), p.db.data_ptr<float>(), p.ut.data_ptr<float>(), p.ub.data_ptr<float>(),
          sh.ln ? p.lnw.data_ptr<float>() : nullptr, sh.ln ? p.lnb.data_ptr<float>() : nullptr};
}

// part[j*R + r] = Σ_c buf[j*C + c] · M[r*C + c] for the RB rows of a block (M is R×C), in CB-column
// chunks so that the block's rows stay in L1.
inline void block_dot(const float* buf, const float* M, int64_t C, int64_t R, float* part) {
  std::fill(part, part + RB * R, 0.f);
  for (int64_t c0 = 0; c0 < C; c0 += CB) cpu::dot_rows8(buf + c0, C, std::min(CB, C - c0), M + c0, C, R, part);
}

// out[j*C + c] = Σ_r coef[j*R + r] · M[r*C + c]  (M is R×C).
inline void block_lowrank(const float* coef, const float* M, int64_t C, int64_t R, float* out) {
  for (int64_t c0 = 0; c0 < C; c0 += CB) {
    const int64_t cc = std::min(CB, C - c0);
    for (int64_t j = 0; j < RB; ++j) std::fill(out + j * C + c0, out + j * C + c0 + cc, 0.f);
    for (int64_t r = 0; r < R; ++r) {
      const float* m = M + r * C + c0;
      float cr[RB];
      for (int64_t j = 0; j < RB; ++j) cr[j] = coef[j * R + r];
      for (int64_t j = 0; j < RB; ++j) {
        float* o = out + j * C + c0;
        const float cj = cr[j];
#pragma omp simd
        for (int64_t k = 0; k < cc; ++k) o[k] += cj * m[k];
      }
    }
  }
}

// Loads rows [n0, n0+nr) of src (T, C) into buf (RB, C) as fp32; rows past nr are zero.
template <class S>
inline void load_rows(const cpu::raw_t<S>* src, int64_t C, int64_t n0, int64_t nr, float* buf) {
  for (int64_t j = 0; j < RB; ++j) {
    if (j < nr)
      cpu::to_f32<S>(src + (n0 + j) * C, buf + j * C, C);
    else
      std::fill(buf + j * C, buf + (j + 1) * C, 0.f);
  }
}

// In place: row v (length C) -> LN(v) = (v - mean)·rstd·w + b, and xhat = (v - mean)·rstd when asked.
// The variance is taken around the mean in a second pass (as torch does), not as E[v²] - mean².
inline void layer_norm_row(float* v, int64_t C, const float* w, const float* b, float mean, float rstd,
                           float* xhat) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float xh = (v[c] - mean) * rstd;
    if (xhat) xhat[c] = xh;
    v[c] = xh * w[c] + b[c];
  }
}

inline void row_stats(const float* v, int64_t C, float eps, float& mean, float& rstd) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) s += v[c];
  mean = C > 0 ? s / static_cast<float>(C) : 0.f;
  float q = 0.f;
#pragma omp simd reduction(+ : q)
  for (int64_t c = 0; c < C; ++c) q += (v[c] - mean) * (v[c] - mean);
  rstd = 1.f / std::sqrt((C > 0 ? q / static_cast<float>(C) : 0.f) + eps);
}

template <class S>
void forward(const Params& P, const cpu::raw_t<S>* x, const cpu::raw_t<S>* res, cpu::raw_t<S>* out, float* z,
             float* mean, float* rstd) {
  const int64_t T = P.T, C = P.C, R = P.R;
  const int64_t blocks = (T + RB - 1) / RB;
#pragma omp parallel num_threads(threads_for(T * C * R))
  {
    std::vector<float> h(RB * C), acc(RB * C), rrow(C), part(RB * R), a(RB * R);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * RB, nr = std::min(RB, T - n0);
      load_rows<S>(x, C, n0, nr, h.data());
      if (P.ln) {
        for (int64_t j = 0; j < nr; ++j) {
          float* v = h.data() + j * C;
          row_stats(v, C, P.eps, mean[n0 + j], rstd[n0 + j]);
          layer_norm_row(v, C, P.lnw, P.lnb, mean[n0 + j], rstd[n0 + j], nullptr);
        }
      }
      block_dot(h.data(), P.d, C, R, part.data());
      for (int64_t j = 0; j < RB; ++j)
        for (int64_t r = 0; r < R; ++r) {
          const float zz = part[j * R + r] + P.db[r];
          if (j < nr) z[(n0 + j) * R + r] = zz;
          a[j * R + r] = j < nr ? act_fwd(P.act, zz) : 0.f;
        }
      block_lowrank(a.data(), P.ut, C, R, acc.data());
      for (int64_t j = 0; j < nr; ++j) {
        // The residual row: x's own row (h holds LN(x) now, so it is reloaded) or `res`.
        cpu::to_f32<S>((res ? res : x) + (n0 + j) * C, rrow.data(), C);
        const float* o = acc.data() + j * C;
        cpu::raw_t<S>* dst = out + (n0 + j) * C;
        const float s = P.scale;
        const float* ub = P.ub;
        const float* rr = rrow.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dst[c] = cpu::store<S>(rr[c] + s * (o[c] + ub[c]));
      }
    }
  }
}

// Offsets of the per-thread partial sums of the vector gradients in one fp32 row of the partial buffer.
struct GradLayout {
  int64_t gub, gdb, glnw, glnb, size;
  GradLayout(int64_t C, int64_t R) : gub(0), gdb(C), glnw(C + R), glnb(2 * C + R), size(3 * C + R) {}
};

// Rows [t0, t1) of the backward (t0 a multiple of RB). Writes gx, gz and s·act(z) of those rows,
// adds the vector-gradient partials of this thread, and leaves g and h = LN?(x) of the rows in fp32
// in gf/hf (rows from t0, (t1 - t0 + RB) × C each) for the two weight-gradient GEMMs.
template <class S>
void backward_rows(const Params& P, const cpu::raw_t<S>* g, const cpu::raw_t<S>* x, const float* z,
                   const float* mean, const float* rstd, bool residual_is_x, int64_t t0, int64_t t1, cpu::raw_t<S>* gx,
                   float* gz_all, float* sa_all, float* gf, float* hf, float* partials, int nthreads) {
  const int64_t C = P.C, R = P.R;
  const GradLayout L(C, R);
  const int64_t blocks = (t1 - t0 + RB - 1) / RB;
#pragma omp parallel num_threads(nthreads)
  {
    float* my = partials + static_cast<int64_t>(omp_get_thread_num()) * L.size;
    std::vector<float> xh(P.ln ? RB * C : 0), gh(RB * C), part(RB * R), gz(RB * R);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = t0 + b * RB, nr = std::min(RB, t1 - n0);
      float* gb = gf + (n0 - t0) * C;
      float* h = hf + (n0 - t0) * C;
      load_rows<S>(g, C, n0, nr, gb);
      block_dot(gb, P.ut, C, R, part.data());  // (g·U)[j, r]
      for (int64_t j = 0; j < RB; ++j)
        for (int64_t r = 0; r < R; ++r) {
          const float zz = j < nr ? z[(n0 + j) * R + r] : 0.f;
          gz[j * R + r] = j < nr ? P.scale * part[j * R + r] * act_grad(P.act, zz) : 0.f;
          if (j < nr) {
            gz_all[(n0 + j) * R + r] = gz[j * R + r];
            sa_all[(n0 + j) * R + r] = P.scale * act_fwd(P.act, zz);
          }
        }
      float* gub = my + L.gub;
      for (int64_t j = 0; j < nr; ++j) {
        const float* gr = gb + j * C;
        const float s = P.scale;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) gub[c] += s * gr[c];
      }
      for (int64_t j = 0; j < nr; ++j)
        for (int64_t r = 0; r < R; ++r) my[L.gdb + r] += gz[j * R + r];
      load_rows<S>(x, C, n0, nr, h);
      if (P.ln)
        for (int64_t j = 0; j < nr; ++j)
          layer_norm_row(h + j * C, C, P.lnw, P.lnb, mean[n0 + j], rstd[n0 + j], xh.data() + j * C);
      block_lowrank(gz.data(), P.d, C, R, gh.data());
      for (int64_t j = 0; j < nr; ++j) {
        float* ghr = gh.data() + j * C;
        const float* gr = gb + j * C;
        if (P.ln) {
          const float* xr = xh.data() + j * C;
          float* glnw = my + L.glnw;
          float* glnb = my + L.glnb;
          const float* w = P.lnw;
          float m1 = 0.f, m2 = 0.f;
#pragma omp simd reduction(+ : m1, m2)
          for (int64_t c = 0; c < C; ++c) {
            glnw[c] += ghr[c] * xr[c];
            glnb[c] += ghr[c];
            const float gxh = ghr[c] * w[c];
            ghr[c] = gxh;
            m1 += gxh;
            m2 += gxh * xr[c];
          }
          m1 /= static_cast<float>(C);
          m2 /= static_cast<float>(C);
          const float rs = rstd[n0 + j];
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) ghr[c] = rs * (ghr[c] - m1 - xr[c] * m2);
        }
        if (residual_is_x) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) ghr[c] += gr[c];
        }
        cpu::raw_t<S>* dst = gx + (n0 + j) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dst[c] = cpu::store<S>(ghr[c]);
      }
    }
  }
}

}  // namespace
}  // namespace detail

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_bottleneck_cpu(
    const at::Tensor& x, const at::Tensor& down_weight, const std::optional<at::Tensor>& down_bias,
    const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias, double scale, c10::string_view activation,
    const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias, double eps,
    const std::optional<at::Tensor>& residual) {
  using namespace detail;
  AdapterForward f = prepare_adapter_forward(x, down_weight, down_bias, up_weight, up_bias,
                                             std::string_view(activation.data(), activation.size()), ln_weight,
                                             ln_bias, eps, residual);
  const Params P = params_of(f.sh, f.p, scale, eps);
  cpu::with_float_type(x.scalar_type(), "adapter_bottleneck_cpu", [&](auto tag) {
    using S = decltype(tag);
    forward<S>(P, cpu::ptr<S>(f.x), f.res.defined() ? cpu::ptr<S>(f.res) : nullptr, cpu::ptr<S>(f.out),
               f.z.data_ptr<float>(), f.sh.ln ? f.mean.data_ptr<float>() : nullptr,
               f.sh.ln ? f.rstd.data_ptr<float>() : nullptr);
  });
  return f.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adapter_bottleneck_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& down_weight,
                                const std::optional<at::Tensor>& down_bias, const at::Tensor& up_weight, double scale,
                                c10::string_view activation, const std::optional<at::Tensor>& ln_weight,
                                const std::optional<at::Tensor>& ln_bias, const at::Tensor& z, const at::Tensor& mean,
                                const at::Tensor& rstd, bool residual_is_x) {
  using namespace detail;
  AdapterBackward b = prepare_adapter_backward(grad_out, x, down_weight, down_bias, up_weight,
                                               std::string_view(activation.data(), activation.size()), ln_weight,
                                               ln_bias, z, mean, rstd);
  const auto& sh = b.sh;
  const Params P = params_of(sh, b.p, scale, 0.0);
  const GradLayout L(sh.c, sh.r);
  const int nthreads = threads_for(sh.t * sh.c * sh.r);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor partials = at::zeros({nthreads, L.size}, f32);
  at::Tensor gz = at::empty({sh.t, sh.r}, f32), sa = at::empty({sh.t, sh.r}, f32);
  b.gd = at::zeros({sh.r, sh.c}, f32);
  b.gut = at::zeros({sh.r, sh.c}, f32);
  // The two weight gradients gUᵀ = (s·act(z))ᵀ·g and gD = gzᵀ·LN?(x) are (R, T)×(T, C) GEMMs: they
  // go to ATen (MKL sgemm), per chunk of kChunk rows whose fp32 g and h the fused pass leaves
  // behind; chunks accumulate in order, so the result is deterministic. The first version did them
  // inside the pass as rank-8 updates of a per-thread (R, C) partial, streamed through L2 every 8
  // rows. At T=2048, C=4096, R=64, 2 threads, on the shared (contended) dev machine, the backward
  // took 268 ms that way and 253 ms now (fused pass 128, the GEMMs 74, casts and zero fills 25):
  // MKL ran at only 27 GFLOP/s there, so the gain is small here, but the GEMMs scale with the
  // hardware where a hand-written rank-8 update does not. kChunk = 512 bounds the fp32 scratch to
  // 2 × 8 MiB at C=4096 whatever T is (a multiple of RB: chunks start on a block).
  constexpr int64_t kChunk = 512;
  const int64_t chunk = std::min<int64_t>(kChunk, std::max<int64_t>(sh.t, 1));
  at::Tensor gf = at::empty({chunk + RB, sh.c}, f32), hf = at::empty({chunk + RB, sh.c}, f32);
  cpu::with_float_type(x.scalar_type(), "adapter_bottleneck_backward_cpu", [&](auto tag) {
    using S = decltype(tag);
    for (int64_t t0 = 0; t0 < sh.t; t0 += kChunk) {
      const int64_t t1 = std::min(sh.t, t0 + kChunk);
      backward_rows<S>(P, cpu::ptr<S>(b.g), cpu::ptr<S>(b.x), b.z.data_ptr<float>(),
                       sh.ln ? b.mean.data_ptr<float>() : nullptr, sh.ln ? b.rstd.data_ptr<float>() : nullptr,
                       residual_is_x, t0, t1, cpu::ptr<S>(b.gx), gz.data_ptr<float>(), sa.data_ptr<float>(),
                       gf.data_ptr<float>(), hf.data_ptr<float>(), partials.data_ptr<float>(), nthreads);
      b.gut.addmm_(sa.narrow(0, t0, t1 - t0).t(), gf.narrow(0, 0, t1 - t0));
      b.gd.addmm_(gz.narrow(0, t0, t1 - t0).t(), hf.narrow(0, 0, t1 - t0));
    }
  });
  const at::Tensor sum = nthreads == 1 ? partials[0] : partials.sum(0);
  b.gub = sum.narrow(0, L.gub, sh.c);
  b.gdb = sum.narrow(0, L.gdb, sh.r);
  b.glnw = sum.narrow(0, L.glnw, sh.c);
  b.glnb = sum.narrow(0, L.glnb, sh.c);
  return b.outputs();
}

LLMKERN_CPU_IMPL(m) {
  m.impl("adapter_bottleneck", &adapter_bottleneck_cpu);
  m.impl("_adapter_bottleneck_backward", &adapter_bottleneck_backward_cpu);
}

}  // namespace llmkern::ops
