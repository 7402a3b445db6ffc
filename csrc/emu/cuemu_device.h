// cuemu's device-side API: barriers, warp collectives, atomics and the math intrinsics that CUDA
// provides to kernels and the host-side cuda_fp16.h/cuda_bf16.h do not. Included by cuemu.h.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <chrono>

namespace cuemu::detail {

// ---- warp collectives ----------------------------------------------------------------------------
template <typename T>
struct ShflSlot {
  T in, out;
  int arg, width;
};
enum ShflMode { kIdx, kUp, kDown, kXor };
const char* const kShflName[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};

template <typename T, int Mode>
void shfl_compute(void* const* slots, unsigned mask) {
  for (unsigned l = 0; l < 32; l++) {
    if (!(mask >> l & 1)) continue;
    auto* s = static_cast<ShflSlot<T>*>(slots[l]);
    int w = s->width;
    if (w < 1 || w > 32 || (w & (w - 1)))
      fail(fmt("%s: width %d is not a power of 2 in [1, 32]", kShflName[Mode], w));
    int lane = int(l), base = lane & ~(w - 1), src = lane;
    if (Mode == kIdx) src = base + (s->arg & (w - 1));
    if (Mode == kUp) src = lane - s->arg >= base ? lane - s->arg : lane;
    if (Mode == kDown) src = lane + s->arg < base + w ? lane + s->arg : lane;
    if (Mode == kXor) src = (lane ^ s->arg) < base + w ? lane ^ s->arg : lane;
    if (src < 0 || src > 31 || !(mask >> src & 1))
      fail(fmt("%s with mask 0x%08x: lane %d reads lane %d, which is not in the mask (undefined value on "
               "a GPU)", kShflName[Mode], mask, lane, src));
    s->out = static_cast<ShflSlot<T>*>(slots[src])->in;
  }
}

template <int Mode, typename T>
inline T shfl(unsigned mask, T var, int arg, int width) {
  static_assert(std::is_trivially_copyable_v<T>, "shuffled values must be trivially copyable");
  ShflSlot<T> s{var, var, arg, width};
  warp_collective(kShflName[Mode], mask, &s, &shfl_compute<T, Mode>);
  return s.out;
}

struct VoteSlot {
  int pred;
  unsigned out;
};
enum VoteOp { kBallot, kAny, kAll, kNone };
template <int Op>
void vote_compute(void* const* slots, unsigned mask) {
  unsigned ballot = 0;
  for (unsigned l = 0; l < 32; l++)
    if ((mask >> l & 1) && static_cast<VoteSlot*>(slots[l])->pred) ballot |= 1u << l;
  unsigned r = Op == kBallot ? ballot : Op == kAny ? ballot != 0 : Op == kAll ? ballot == mask : 0;
  for (unsigned l = 0; l < 32; l++)
    if (mask >> l & 1) static_cast<VoteSlot*>(slots[l])->out = r;
}

template <typename T>
struct ReduceSlot {
  T in, out;
};
enum ReduceOp { kRAdd, kRMin, kRMax, kRAnd, kROr, kRXor };
template <typename T, int Op>
void reduce_compute(void* const* slots, unsigned mask) {
  bool first = true;
  T r{};
  for (unsigned l = 0; l < 32; l++) {
    if (!(mask >> l & 1)) continue;
    T v = static_cast<ReduceSlot<T>*>(slots[l])->in;
    if (first) r = v, first = false;
    else if (Op == kRAdd) r = T(r + v);
    else if (Op == kRMin) r = std::min(r, v);
    else if (Op == kRMax) r = std::max(r, v);
    else if (Op == kRAnd) r &= v;
    else if (Op == kROr) r |= v;
    else r ^= v;
  }
  for (unsigned l = 0; l < 32; l++)
    if (mask >> l & 1) static_cast<ReduceSlot<T>*>(slots[l])->out = r;
}
template <typename T, int Op>
inline T warp_reduce(const char* name, unsigned mask, T v) {
  ReduceSlot<T> s{v, v};
  warp_collective(name, mask, &s, &reduce_compute<T, Op>);
  return s.out;
}

template <typename T>
void match_compute(void* const* slots, unsigned mask) {
  auto val = [&](unsigned l) { return static_cast<ReduceSlot<T>*>(slots[l])->in; };
  for (unsigned l = 0; l < 32; l++) {
    if (!(mask >> l & 1)) continue;
    unsigned m = 0;
    for (unsigned k = 0; k < 32; k++)
      if ((mask >> k & 1) && val(k) == val(l)) m |= 1u << k;
    static_cast<ReduceSlot<T>*>(slots[l])->out = m;
  }
}

inline void nop_compute(void* const*, unsigned) {}

inline unsigned active_mask() {
  Block* b = tl_block;
  if (!b) return 0;
  const Warp& w = b->warps[b->cur->linear / 32];
  return w.exists & ~w.exited;
}

// Lets the other threads of the block run; for polling loops (__nanosleep), which would otherwise spin
// forever because fibers are not preempted.
inline void yield_ready() {
  if (tl_block) yield();
}

// ---- atomics (relaxed, as CUDA's are) ------------------------------------------------------------
template <typename T, typename F>
inline T atomic_update(T* p, F f) {
  T old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  T next;
  do {
    next = f(old);
  } while (!__atomic_compare_exchange(p, &old, &next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}

}  // namespace cuemu::detail

// ---- barriers and warp functions (global names, as in CUDA) -------------------------------------
// The barrier site is the caller's file and line (default arguments): return addresses failed in the
// prototype because clang -O2 unswitched a loop and gave one source barrier two call sites.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cuemu::detail::barrier(cuemu::detail::kSync, 1, file, line);
}
inline int __syncthreads_count(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cuemu::detail::barrier(cuemu::detail::kCount, pred, file, line);
}
inline int __syncthreads_and(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cuemu::detail::barrier(cuemu::detail::kAnd, pred, file, line);
}
inline int __syncthreads_or(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return cuemu::detail::barrier(cuemu::detail::kOr, pred, file, line);
}
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  cuemu::detail::warp_collective("__syncwarp", mask, nullptr, &cuemu::detail::nop_compute);
}
inline unsigned __activemask() { return cuemu::detail::active_mask(); }

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return cuemu::detail::shfl<cuemu::detail::kIdx>(mask, var, src_lane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return cuemu::detail::shfl<cuemu::detail::kUp>(mask, var, int(delta), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return cuemu::detail::shfl<cuemu::detail::kDown>(mask, var, int(delta), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return cuemu::detail::shfl<cuemu::detail::kXor>(mask, var, lane_mask, width);
}

#define CUEMU_VOTE(name, op, R)                                                         \
  inline R name(unsigned mask, int pred) {                                              \
    cuemu::detail::VoteSlot s{pred, 0};                                                 \
    cuemu::detail::warp_collective(#name, mask, &s, &cuemu::detail::vote_compute<op>); \
    return R(s.out);                                                                    \
  }
CUEMU_VOTE(__ballot_sync, cuemu::detail::kBallot, unsigned)
CUEMU_VOTE(__any_sync, cuemu::detail::kAny, int)
CUEMU_VOTE(__all_sync, cuemu::detail::kAll, int)
#undef CUEMU_VOTE

#define CUEMU_REDUCE(name, T, op) \
  inline T name(unsigned mask, T v) { return cuemu::detail::warp_reduce<T, op>(#name, mask, v); }
CUEMU_REDUCE(__reduce_add_sync, unsigned, cuemu::detail::kRAdd)
CUEMU_REDUCE(__reduce_add_sync, int, cuemu::detail::kRAdd)
CUEMU_REDUCE(__reduce_min_sync, unsigned, cuemu::detail::kRMin)
CUEMU_REDUCE(__reduce_min_sync, int, cuemu::detail::kRMin)
CUEMU_REDUCE(__reduce_max_sync, unsigned, cuemu::detail::kRMax)
CUEMU_REDUCE(__reduce_max_sync, int, cuemu::detail::kRMax)
CUEMU_REDUCE(__reduce_and_sync, unsigned, cuemu::detail::kRAnd)
CUEMU_REDUCE(__reduce_or_sync, unsigned, cuemu::detail::kROr)
CUEMU_REDUCE(__reduce_xor_sync, unsigned, cuemu::detail::kRXor)
#undef CUEMU_REDUCE

// Values are compared bitwise (widened to 64 bits).
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8);
  cuemu::detail::ReduceSlot<uint64_t> s{0, 0};
  std::memcpy(&s.in, &value, sizeof(T));
  cuemu::detail::warp_collective("__match_any_sync", mask, &s, &cuemu::detail::match_compute<uint64_t>);
  return unsigned(s.out);
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) { cuemu::detail::yield_ready(); }
[[noreturn]] inline void __trap() { cuemu::detail::fail("__trap() called"); }
inline long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ---- atomics -------------------------------------------------------------------------------------
#define CUEMU_ATOMIC_INT(T)                                                                         \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }             \
  inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }             \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }             \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }               \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }             \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }           \
  inline T atomicMax(T* p, T v) {                                                                  \
    return cuemu::detail::atomic_update(p, [v](T o) { return o < v ? v : o; });                    \
  }                                                                                                \
  inline T atomicMin(T* p, T v) {                                                                  \
    return cuemu::detail::atomic_update(p, [v](T o) { return v < o ? v : o; });                    \
  }                                                                                                \
  inline T atomicCAS(T* p, T cmp, T v) {                                                           \
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);            \
    return cmp;                                                                                    \
  }
CUEMU_ATOMIC_INT(int)
CUEMU_ATOMIC_INT(unsigned)
CUEMU_ATOMIC_INT(unsigned long long)
CUEMU_ATOMIC_INT(long long)
#undef CUEMU_ATOMIC_INT
inline unsigned short atomicCAS(unsigned short* p, unsigned short cmp, unsigned short v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return cmp;
}
inline unsigned atomicInc(unsigned* p, unsigned lim) {
  return cuemu::detail::atomic_update(p, [lim](unsigned o) { return o >= lim ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* p, unsigned lim) {
  return cuemu::detail::atomic_update(p, [lim](unsigned o) { return o == 0 || o > lim ? lim : o - 1; });
}

// Floating-point atomics are compare-and-swap loops on the bit pattern.
#define CUEMU_ATOMIC_FP(T, ADD)                                                            \
  inline T atomicAdd(T* p, T v) {                                                          \
    return cuemu::detail::atomic_update(p, [v](T o) { return ADD; });                      \
  }                                                                                        \
  inline T atomicExch(T* p, T v) {                                                         \
    T old;                                                                                 \
    __atomic_exchange(p, &v, &old, __ATOMIC_RELAXED);                                      \
    return old;                                                                            \
  }
CUEMU_ATOMIC_FP(float, o + v)
CUEMU_ATOMIC_FP(double, o + v)
CUEMU_ATOMIC_FP(__half, __hadd(o, v))
CUEMU_ATOMIC_FP(__nv_bfloat16, __hadd(o, v))
CUEMU_ATOMIC_FP(__half2, __hadd2(o, v))
CUEMU_ATOMIC_FP(__nv_bfloat162, __hadd2(o, v))
#undef CUEMU_ATOMIC_FP
inline float atomicMax(float* p, float v) {
  return cuemu::detail::atomic_update(p, [v](float o) { return fmaxf(o, v); });
}
inline float atomicMin(float* p, float v) {
  return cuemu::detail::atomic_update(p, [v](float o) { return fminf(o, v); });
}

// ---- math and bit intrinsics ---------------------------------------------------------------------
// The fast-math intrinsics are exact here and approximate on a GPU (__expf: 2 ulp + ...): compare with
// tolerances.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x == x ? x : 0.0f; }
inline int __float2int_rn(float x) { return int(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return int(x); }
inline int __float2int_rd(float x) { return int(std::floor(x)); }
inline int __float2int_ru(float x) { return int(std::ceil(x)); }
inline unsigned __float2uint_rn(float x) { return unsigned(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return float(x); }
inline float __uint2float_rn(unsigned x) { return float(x); }
inline float __double2float_rn(double x) { return float(x); }

inline int __float_as_int(float x) { int r; std::memcpy(&r, &x, 4); return r; }
inline unsigned __float_as_uint(float x) { unsigned r; std::memcpy(&r, &x, 4); return r; }
inline float __int_as_float(int x) { float r; std::memcpy(&r, &x, 4); return r; }
inline float __uint_as_float(unsigned x) { float r; std::memcpy(&r, &x, 4); return r; }
inline long long __double_as_longlong(double x) { long long r; std::memcpy(&r, &x, 8); return r; }
inline double __longlong_as_double(long long x) { double r; std::memcpy(&r, &x, 8); return r; }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz(unsigned(x)) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline int __mulhi(int a, int b) { return int((int64_t(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline int __mul24(int a, int b) { return (a << 8 >> 8) * (b << 8 >> 8); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xFFFFFFu) * (b & 0xFFFFFFu); }

template <typename T>
inline T __ldg(const T* p) { return *p; }

// CUDA's global min/max for every pair of arithmetic types, with the usual arithmetic conversions.
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(b) < C(a) ? C(b) : C(a);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(b) : C(a);
}

// ---- half and bfloat16 functions that the host headers declare only for the device -------------
// __hfma: the product of two halves is exact in float (11+11 significand bits), the sum in double is
// then rounded to half twice (float, half); that can differ from one rounding only when the addend is
// ~2^-30 of the product.
inline __half __hfma(__half a, __half b, __half c) {
  return __double2half(double(__half2float(a)) * __half2float(b) + __half2float(c));
}
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __double2bfloat16(double(__bfloat162float(a)) * __bfloat162float(b) + __bfloat162float(c));
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return __halves2half2(__hfma(__low2half(a), __low2half(b), __low2half(c)),
                        __hfma(__high2half(a), __high2half(b), __high2half(c)));
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return __halves2bfloat162(__hfma(__low2bfloat16(a), __low2bfloat16(b), __low2bfloat16(c)),
                            __hfma(__high2bfloat16(a), __high2bfloat16(b), __high2bfloat16(c)));
}
#define CUEMU_HMATH(name, expr)                                                            \
  inline __half name(__half h) { float x = __half2float(h); return __float2half_rn(expr); } \
  inline __nv_bfloat16 name(__nv_bfloat16 h) {                                             \
    float x = __bfloat162float(h);                                                         \
    return __float2bfloat16_rn(expr);                                                      \
  }
CUEMU_HMATH(hexp, std::exp(x))
CUEMU_HMATH(hlog, std::log(x))
CUEMU_HMATH(hsqrt, std::sqrt(x))
CUEMU_HMATH(hrsqrt, 1.0f / std::sqrt(x))
CUEMU_HMATH(hrcp, 1.0f / x)
CUEMU_HMATH(htanh, std::tanh(x))
#undef CUEMU_HMATH
inline int __half2int_rn(__half h) { return __float2int_rn(__half2float(h)); }
