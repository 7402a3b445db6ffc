// CPU implementation of the fused LoRA linear (schema: csrc/ops/lora_linear.cpp).
//
// The base GEMM x·Wᵀ (+ b) goes to ATen (MKL sgemm / oneDNN bf16). The LoRA path is ours: thin
// (…, R) products that are memory-bound, done in a few fused passes over rows with fp32 (fp64 for
// fp64) accumulation and the dropout mask regenerated on the fly (llmkern/rng.h):
// Dropout multiplies by the 0 or 1/(1-p) multiplier, so a dropped NaN or inf stays NaN (0·NaN = NaN),
// as PyTorch's unfused x * mask does; every backend does the same (tests/ops/test_lora_linear.py).
//   forward   pass F1 over x:   xa[n,:] = dropout(x[n,:])·Aᵀ
//             pass F2 over y:   y[n,:] += s·xa[n,:]·Bᵀ                 (in place in the GEMM output)
//   backward  gx = gy·W by ATen, then
//             pass B1 over gy:  gu[n,:] = s·gy[n,:]·B,  gBᵀ += s·xa[n,:]ᵀ·gy[n,:]
//             pass B2 over x:   gAᵀ… gA += gu[n,:]ᵀ·dropout(x[n,:]),  gx[n,:] += mask·(gu[n,:]·A)/(1-p)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <vector>

#include "../lora_linear.h"
#include "llmkern/cpu_dot.h"
#include "llmkern/cpu_float.h"
#include "llmkern/registration.h"
#include "llmkern/rng.h"

namespace llmkern::ops {
namespace detail {
namespace {

// Rows per block: each row of A and Bᵀ (R×C, 256 KiB at R=16, C=4096, in L2) is streamed once
// per 8 tokens. Columns per chunk: an 8×512 fp32 tile (16 KiB) plus a 512-wide factor row stay in
// the 32 KiB L1d of the Zen 4 dev machine. (4 rows and whole rows measured 11-40 ms per pass at
// T=2048, C=4096, R=16, L2-bound; see bench/ops/bench_lora.py --profile.)
constexpr int64_t RB = cpu::kDotRows;
constexpr int64_t CB = 512;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Threads for a pass touching `work` multiply-adds: below ~64K the OpenMP fork costs more than it saves.
int threads_for(int64_t work) { return work < (1 << 16) ? 1 : at::get_num_threads(); }

// Row conversions. The 16-bit types go through llmkern/cpu_float.h's integer-only converters
// because c10::BFloat16/c10::Half scalar conversions did not vectorize: the bf16 passes ran at
// 1-1.6 GB/s, 2-3x below ATen's own bf16 thin GEMMs.
template <typename T>
struct Tag16;
template <>
struct Tag16<c10::BFloat16> {
  using type = cpu::bf16;
};
template <>
struct Tag16<c10::Half> {
  using type = cpu::half;
};
template <typename T>
constexpr bool is16 = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

template <typename T, typename A>
inline void load_cvt(const T* src, A* dst, int64_t n) {
  if constexpr (is16<T>) {
    cpu::to_f32<typename Tag16<T>::type>(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(src[i]);
  }
}
// dst[i] = T(A(dst[i]) + add[i]): one rounding to T.
template <typename T, typename A>
inline void add_store(T* dst, const A* add, int64_t n) {
  if constexpr (is16<T>) {
    using Tag = typename Tag16<T>::type;
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = cpu::store<Tag>(cpu::load<Tag>(d[i]) + add[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<A>(dst[i]) + add[i]);
  }
}

// buf (RB, CB) = rows [n0, n0+nr) × columns [k0, k0+kc) of src (N, K) as A, times the dropout
// multiplier (0 or 1/(1-p)), which is also kept in mult (RB, CB). Rows past nr are zero.
template <typename T, typename A>
inline void load_tile(const T* src, int64_t K, int64_t n0, int64_t nr, int64_t k0, int64_t kc, const DropoutParams& d,
                      A* buf, A* mult) {
  const A s = static_cast<A>(d.inv_keep);
  for (int64_t j = 0; j < RB; ++j) {
    A* b = buf + j * CB;
    if (j >= nr) {
      std::fill(b, b + kc, A(0));
      continue;
    }
    load_cvt(src + (n0 + j) * K + k0, b, kc);
    if (!d.on) continue;
    A* m = mult + j * CB;
    const uint64_t base = d.offset + d.local(n0 + j, k0);
#pragma omp simd
    for (int64_t k = 0; k < kc; ++k) {
      m[k] = dropout_keep(d.key, base + static_cast<uint64_t>(k), d.threshold) ? s : A(0);
      b[k] *= m[k];
    }
  }
}

// out (RB, CB) = Σ_r coef[j, r] · M[r, c0 + c]  (M is R×C, coef is RB×R; zero rows give zero).
template <typename A>
inline void tile_lowrank(const A* coef, int64_t R, const A* M, int64_t C, int64_t c0, int64_t cc, A* out) {
  std::fill(out, out + RB * CB, A(0));
  for (int64_t r = 0; r < R; ++r) {
    const A* m = M + r * C + c0;
    A c[RB];
    for (int64_t j = 0; j < RB; ++j) c[j] = coef[j * R + r];
#pragma omp simd
    for (int64_t k = 0; k < cc; ++k) {
      const A mk = m[k];
      for (int64_t j = 0; j < RB; ++j) out[j * CB + k] += c[j] * mk;
    }
  }
}

// G[r, k0 + k] += Σ_j coef[j, r] · buf[j, k]  (G is R×K; the per-thread partial of a reduction over rows).
template <typename A>
inline void tile_outer(const A* buf, int64_t kc, const A* coef, int64_t R, A* G, int64_t K, int64_t k0) {
  for (int64_t r = 0; r < R; ++r) {
    A c[RB];
    for (int64_t j = 0; j < RB; ++j) c[j] = coef[j * R + r];
    A* g = G + r * K + k0;
#pragma omp simd
    for (int64_t k = 0; k < kc; ++k) {
      A acc = g[k];
      for (int64_t j = 0; j < RB; ++j) acc += c[j] * buf[j * CB + k];
      g[k] = acc;
    }
  }
}

// coef (RB, R) = alpha · U[n0 + j, :], zero past nr.
template <typename A>
inline void load_coef(const A* U, int64_t R, int64_t n0, int64_t nr, A alpha, A* coef) {
  for (int64_t j = 0; j < RB; ++j)
    for (int64_t r = 0; r < R; ++r) coef[j * R + r] = j < nr ? alpha * U[(n0 + j) * R + r] : A(0);
}

// Sum of per-thread partials into G: each thread adds its own buffer once at the end.
template <typename A>
inline void add_partial(A* G, const std::vector<A>& part) {
#pragma omp critical(llmkern_lora_partial)
  {
    const int64_t n = static_cast<int64_t>(part.size());
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) G[i] += part[i];
  }
}

// Pass F1: xa = dropout(x)·Aᵀ.
template <typename T, typename A>
void forward_down(const T* x, int64_t N, int64_t K, const A* a, int64_t R, const DropoutParams& d, A* xa) {
  const int64_t blocks = (N + RB - 1) / RB;
#pragma omp parallel num_threads(threads_for(N * K * R))
  {
    std::vector<A> buf(RB * CB), mult(RB * CB), part(RB * R);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * RB, nr = std::min(RB, N - n0);
      std::fill(part.begin(), part.end(), A(0));
      for (int64_t k0 = 0; k0 < K; k0 += CB) {
        const int64_t kc = std::min(CB, K - k0);
        load_tile(x, K, n0, nr, k0, kc, d, buf.data(), mult.data());
        cpu::dot_rows8(buf.data(), CB, kc, a + k0, K, R, part.data());
      }
      for (int64_t j = 0; j < nr; ++j) std::copy_n(part.data() + j * R, R, xa + (n0 + j) * R);
    }
  }
}

// Pass F2: y += s·xa·Bᵀ, in place (bt = Bᵀ, R×C).
template <typename T, typename A>
void forward_up(T* y, int64_t N, int64_t C, const A* xa, const A* bt, int64_t R, A scale) {
  const int64_t blocks = (N + RB - 1) / RB;
#pragma omp parallel num_threads(threads_for(N * C * R))
  {
    std::vector<A> coef(RB * R), acc(RB * CB);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * RB, nr = std::min(RB, N - n0);
      load_coef(xa, R, n0, nr, scale, coef.data());
      for (int64_t c0 = 0; c0 < C; c0 += CB) {
        const int64_t cc = std::min(CB, C - c0);
        tile_lowrank(coef.data(), R, bt, C, c0, cc, acc.data());
        for (int64_t j = 0; j < nr; ++j) add_store(y + (n0 + j) * C + c0, acc.data() + j * CB, cc);
      }
    }
  }
}

// Pass B1 over gy (N, C): gu = s·gy·B (through Bᵀ rows) and gbt += xaᵀ·gy (scaled by s by the caller).
template <typename T, typename A>
void backward_gy(const T* gy, int64_t N, int64_t C, const A* bt, int64_t R, A scale, const A* xa, A* gu, A* gbt) {
  const int64_t blocks = (N + RB - 1) / RB;
  const DropoutParams none = no_dropout();
#pragma omp parallel num_threads(threads_for(N * C * R))
  {
    std::vector<A> buf(RB * CB), part(RB * R), coef(RB * R), gpart(R * C, A(0));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * RB, nr = std::min(RB, N - n0);
      std::fill(part.begin(), part.end(), A(0));
      load_coef(xa, R, n0, nr, A(1), coef.data());
      for (int64_t c0 = 0; c0 < C; c0 += CB) {
        const int64_t cc = std::min(CB, C - c0);
        load_tile(gy, C, n0, nr, c0, cc, none, buf.data(), static_cast<A*>(nullptr));
        cpu::dot_rows8(buf.data(), CB, cc, bt + c0, C, R, part.data());
        tile_outer(buf.data(), cc, coef.data(), R, gpart.data(), C, c0);
      }
      for (int64_t j = 0; j < nr; ++j)
        for (int64_t r = 0; r < R; ++r) gu[(n0 + j) * R + r] = scale * part[j * R + r];
    }
    add_partial(gbt, gpart);
  }
}

// Pass B2 over x (N, K): ga += guᵀ·dropout(x) and gx += mask·(gu·A)/(1-p), gx in place.
template <typename T, typename A>
void backward_x(const T* x, int64_t N, int64_t K, const A* a, int64_t R, const DropoutParams& d, const A* gu, A* ga,
                T* gx) {
  const int64_t blocks = (N + RB - 1) / RB;
#pragma omp parallel num_threads(threads_for(N * K * R))
  {
    std::vector<A> buf(RB * CB), mult(RB * CB), coef(RB * R), acc(RB * CB), gpart(R * K, A(0));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * RB, nr = std::min(RB, N - n0);
      load_coef(gu, R, n0, nr, A(1), coef.data());
      for (int64_t k0 = 0; k0 < K; k0 += CB) {
        const int64_t kc = std::min(CB, K - k0);
        load_tile(x, K, n0, nr, k0, kc, d, buf.data(), mult.data());
        tile_outer(buf.data(), kc, coef.data(), R, gpart.data(), K, k0);
        tile_lowrank(coef.data(), R, a, K, k0, kc, acc.data());
        for (int64_t j = 0; j < nr; ++j) {
          A* row = acc.data() + j * CB;
          if (d.on) {
            const A* m = mult.data() + j * CB;
#pragma omp simd
            for (int64_t k = 0; k < kc; ++k) row[k] *= m[k];
          }
          add_store(gx + (n0 + j) * K + k0, row, kc);
        }
      }
    }
    add_partial(ga, gpart);
  }
}

}  // namespace
}  // namespace detail

std::tuple<at::Tensor, at::Tensor> lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                   const at::Tensor& lora_b, double scale, double dropout_p,
                                                   const at::Tensor& seed, int64_t offset, int64_t col_offset,
                                                   int64_t row_stride) {
  using namespace detail;
  LoraForward f = prepare_lora_forward(x, weight, bias, lora_a, lora_b, dropout_p);
  const auto& sh = f.sh;
  const DropoutParams d = lora_dropout_params(dropout_p, seed, offset, col_offset, row_stride, sh);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_linear_cpu", [&] {
    using A = typename AccOf<scalar_t>::type;
    forward_down(f.x2.data_ptr<scalar_t>(), sh.n, sh.c_in, f.a.data_ptr<A>(), sh.r, d, f.xa.data_ptr<A>());
    forward_up(f.y2.data_ptr<scalar_t>(), sh.n, sh.c_out, f.xa.data_ptr<A>(), f.bt.data_ptr<A>(), sh.r,
               static_cast<A>(scale));
  });
  return f.outputs(x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& xa, double scale, double dropout_p, const at::Tensor& seed,
    int64_t offset, int64_t col_offset, int64_t row_stride) {
  using namespace detail;
  LoraBackward b = prepare_lora_backward(grad_y, x, weight, lora_a, lora_b, xa, dropout_p);
  const auto& sh = b.sh;
  const DropoutParams d = lora_dropout_params(dropout_p, seed, offset, col_offset, row_stride, sh);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_linear_backward_cpu", [&] {
    using A = typename AccOf<scalar_t>::type;
    const A s = static_cast<A>(scale);
    backward_gy(b.gy2.data_ptr<scalar_t>(), sh.n, sh.c_out, b.bt.data_ptr<A>(), sh.r, s, b.xa2.data_ptr<A>(),
                b.gu.data_ptr<A>(), b.gbt.data_ptr<A>());
    backward_x(b.x2.data_ptr<scalar_t>(), sh.n, sh.c_in, b.a.data_ptr<A>(), sh.r, d, b.gu.data_ptr<A>(),
               b.ga.data_ptr<A>(), b.gx2.data_ptr<scalar_t>());
  });
  b.gbt.mul_(scale);  // backward_gy accumulates xaᵀ·gy; the scale is applied once here
  return b.outputs(x);
}

LLMKERN_CPU_IMPL(m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("_lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace llmkern::ops
