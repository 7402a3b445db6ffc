// Stand-in for <mma.h> under the CUDA-on-CPU emulation: nvcuda::wmma for the shapes 16x16x16, 32x8x16
// and 8x32x16 with half or bf16 inputs and float or half accumulators.
//
// The fragment layout is the emulator's own: lane l holds the logical (row-major) elements l, l+32,
// ... of its matrix. CUDA leaves the layout unspecified, so portable code cannot depend on it;
// num_elements and element-wise loops over frag.x[i] work. load/store/mma are warp collectives over
// the full warp: the last lane to arrive does the work for all 32, so a lane that resumes late cannot
// see memory that another lane changed after the collective (as on hardware). Reported, because each
// misbehaves on a GPU: pointers not 32-byte aligned, ldm not a multiple of 16 bytes or shorter than a
// row, fewer than 32 lanes, lanes passing different pointers, ldm or layouts.
#pragma once
#include <cuda_runtime.h>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <typename Use, int M, int N, int K>
struct dims;
template <int M, int N, int K>
struct dims<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K>
struct dims<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K>
struct dims<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
inline T from_f(float v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return T(v);
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert((M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) || (M == 8 && N == 32 && K == 16),
                "emulated wmma shapes: 16x16x16, 32x8x16, 8x32x16");
  static constexpr int rows = detail::dims<Use, M, N, K>::rows, cols = detail::dims<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / 32;
  using element_type = T;
  T x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  for (int i = 0; i < f.num_elements; i++) f.x[i] = T(v);
}

namespace detail {
struct MemSlot {
  const void* ptr;
  unsigned ldm;
  bool row_major;
  void* frag;
};

template <typename Frag, typename T, bool Store>
void mem_compute(void* const* slots, unsigned) {
  const char* name = Store ? "wmma::store_matrix_sync" : "wmma::load_matrix_sync";
  const MemSlot& m0 = *static_cast<MemSlot*>(slots[0]);
  for (int l = 1; l < 32; l++) {
    const MemSlot& m = *static_cast<MemSlot*>(slots[l]);
    if (m.ptr != m0.ptr || m.ldm != m0.ldm || m.row_major != m0.row_major)
      cuemu::detail::fail(cuemu::detail::fmt("%s: lane %d passes (%p, ldm %u, %s) but lane 0 (%p, ldm %u, %s)",
                                             name, l, m.ptr, m.ldm, m.row_major ? "row" : "col", m0.ptr, m0.ldm,
                                             m0.row_major ? "row" : "col"));
  }
  if (reinterpret_cast<uintptr_t>(m0.ptr) % 32)
    cuemu::detail::fail(cuemu::detail::fmt("%s: pointer %p is not 32-byte aligned", name, m0.ptr));
  if (m0.ldm * sizeof(T) % 16)
    cuemu::detail::fail(cuemu::detail::fmt("%s: ldm %u is not a multiple of 16 bytes", name, m0.ldm));
  unsigned need = m0.row_major ? Frag::cols : Frag::rows;
  if (m0.ldm < need)
    cuemu::detail::fail(cuemu::detail::fmt("%s: ldm %u is shorter than a %s of %u elements", name, m0.ldm,
                                           m0.row_major ? "row" : "column", need));
  for (int l = 0; l < 32; l++) {
    Frag& f = *static_cast<Frag*>(static_cast<MemSlot*>(slots[l])->frag);
    for (int i = 0; i < Frag::num_elements; i++) {
      int e = l + 32 * i, r = e / Frag::cols, c = e % Frag::cols;
      size_t off = m0.row_major ? size_t(r) * m0.ldm + c : size_t(c) * m0.ldm + r;
      if constexpr (Store) const_cast<T*>(static_cast<const T*>(m0.ptr))[off] = f.x[i];
      else f.x[i] = static_cast<const T*>(m0.ptr)[off];
    }
  }
}

template <typename Frag, typename T, bool Store>
inline void mem_op(const char* name, Frag& f, const T* p, unsigned ldm, bool row_major) {
  MemSlot s{p, ldm, row_major, &f};
  cuemu::detail::warp_collective(name, 0xFFFFFFFFu, &s, &mem_compute<Frag, T, Store>);
}

template <typename FD, typename FA, typename FB, typename FC>
struct MmaSlot {
  FD* d;
  const FA* a;
  const FB* b;
  const FC* c;
};

// One product per warp, in fp32 with K-order accumulation; tensor cores use another order, so
// compare with tolerances.
template <int M, int N, int K, typename FD, typename FA, typename FB, typename FC>
void mma_compute(void* const* slots, unsigned) {
  float A[M * K], B[K * N], C[M * N];
  for (int l = 0; l < 32; l++) {
    const auto& s = *static_cast<MmaSlot<FD, FA, FB, FC>*>(slots[l]);
    for (int i = 0; i < FA::num_elements; i++) A[l + 32 * i] = to_f(s.a->x[i]);
    for (int i = 0; i < FB::num_elements; i++) B[l + 32 * i] = to_f(s.b->x[i]);
    for (int i = 0; i < FC::num_elements; i++) C[l + 32 * i] = to_f(s.c->x[i]);
  }
  for (int m = 0; m < M; m++)
    for (int n = 0; n < N; n++) {
      float acc = C[m * N + n];
      for (int k = 0; k < K; k++) acc += A[m * K + k] * B[k * N + n];
      C[m * N + n] = acc;
    }
  for (int l = 0; l < 32; l++) {
    auto& s = *static_cast<MmaSlot<FD, FA, FB, FC>*>(slots[l]);
    for (int i = 0; i < FD::num_elements; i++)
      s.d->x[i] = from_f<typename FD::element_type>(C[l + 32 * i]);
  }
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  detail::mem_op<fragment<Use, M, N, K, T, L>, T, false>("wmma::load_matrix_sync", f, p, ldm,
                                                          std::is_same_v<L, row_major>);
}
template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
  detail::mem_op<fragment<accumulator, M, N, K, T>, T, false>("wmma::load_matrix_sync", f, p, ldm,
                                                               layout == mem_row_major);
}
template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  using F = fragment<accumulator, M, N, K, T>;
  detail::mem_op<F, T, true>("wmma::store_matrix_sync", const_cast<F&>(f), p, ldm, layout == mem_row_major);
}
template <int M, int N, int K, typename TA, typename LA, typename LB, typename TC, typename TD>
inline void mma_sync(fragment<accumulator, M, N, K, TD>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, TC>& c,
                     bool = false) {
  using FD = fragment<accumulator, M, N, K, TD>;
  using FA = fragment<matrix_a, M, N, K, TA, LA>;
  using FB = fragment<matrix_b, M, N, K, TA, LB>;
  using FC = fragment<accumulator, M, N, K, TC>;
  detail::MmaSlot<FD, FA, FB, FC> s{&d, &a, &b, &c};
  cuemu::detail::warp_collective("wmma::mma_sync", 0xFFFFFFFFu, &s, &detail::mma_compute<M, N, K, FD, FA, FB, FC>);
}

}  // namespace wmma
}  // namespace nvcuda
