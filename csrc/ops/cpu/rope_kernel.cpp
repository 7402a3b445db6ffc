// CPU implementation of rotary position embedding on q and k (schema: csrc/ops/rope.cpp).
//
// One task per (batch, position): the cos and sin rows of that position are converted to fp32 once
// and applied to every head of q and of k (H·D elements each), reading and writing through the
// tensors' strides, so the (B, H, T, D) views of a (B, T, H·D) projection need no copy.
//   out[i] = x[i]·c[i] + x[i ± D/2]·s'[i],  s'[i] = -sin[i] (i < D/2), +sin[i] (i >= D/2)
// The backward is the same loop with the transposed rotation, s'[i] = +sin[i + D/2] (i < D/2),
// -sin[i - D/2] (i >= D/2). Rows are staged in fp32 scratch before the write, so in place is safe.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "llmkern/checks.h"
#include "llmkern/cpu_float.h"
#include "llmkern/registration.h"

namespace llmkern::ops {
namespace detail {
namespace {

struct View4 {
  int64_t s0, s1, s2;  // strides of (B, H, T); the last stride is 1
};

View4 view_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                  const char* op) {
  using namespace llmkern::detail;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, op, ": q and k must be 4-D (B, H, T, D), got shapes ", q.sizes(), " and ",
              k.sizes());
  check_float_dtype(q, "rope: q", /*allow_double=*/false);
  const int64_t B = q.size(0), T = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(2) == T && k.size(3) == D, op, ": k has shape ", k.sizes(),
              "; expected (B, Hk, T, D) = (", B, ", Hk, ", T, ", ", D, ") to match q ", q.sizes());
  TORCH_CHECK(D % 2 == 0, op, ": the head dim D must be even, got ", D);
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}}) {
    TORCH_CHECK(t->size(3) <= 1 || t->numel() == 0 || t->stride(3) == 1, op, ": ", name,
                " must have a unit last stride, got strides ", t->strides());
  }
  for (const auto& [t, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    TORCH_CHECK(t->dim() == 3 && (t->size(0) == B || t->size(0) == 1) && t->size(1) == T && t->size(2) == D, op, ": ",
                name, " has shape ", t->sizes(), "; expected (B or 1, T, D) = (", B, " or 1, ", T, ", ", D, ")");
    TORCH_CHECK(t->size(2) <= 1 || t->numel() == 0 || t->stride(2) == 1, op, ": ", name,
                " must have a unit last stride, got strides ", t->strides());
    check_same_dtype(q, "q", *t, name);
    check_same_device(q, "q", *t, name);
  }
  check_same_dtype(q, "q", k, "k");
  check_same_device(q, "q", k, "k");
}

// Applies the rotation to rows (b, h, t) of x for all h, writing to out (which may be x).
template <class S>
inline void rotate_heads(const cpu::raw_t<S>* x, View4 vx, cpu::raw_t<S>* out, View4 vo, int64_t H, int64_t b,
                         int64_t t, int64_t D, const float* c, const float* s, float* row, float* res) {
  const int64_t h2 = D / 2;
  for (int64_t h = 0; h < H; ++h) {
    cpu::to_f32<S>(x + b * vx.s0 + h * vx.s1 + t * vx.s2, row, D);
#pragma omp simd
    for (int64_t i = 0; i < h2; ++i) {
      res[i] = row[i] * c[i] + row[i + h2] * s[i];
      res[i + h2] = row[i + h2] * c[i + h2] + row[i] * s[i + h2];
    }
    cpu::from_f32<S>(res, out + b * vo.s0 + h * vo.s1 + t * vo.s2, D);
  }
}

template <class S>
void apply(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& qo,
           at::Tensor& ko, bool transpose) {
  const int64_t B = q.size(0), T = q.size(2), D = q.size(3), Hq = q.size(1), Hk = k.size(1);
  const int64_t h2 = D / 2;
  const auto* qp = cpu::ptr<S>(q);
  const auto* kp = cpu::ptr<S>(k);
  auto* qop = cpu::ptr<S>(qo);
  auto* kop = cpu::ptr<S>(ko);
  const auto* cp = cpu::ptr<S>(cos);
  const auto* sp = cpu::ptr<S>(sin);
  const View4 vq = view_of(q), vk = view_of(k), vqo = view_of(qo), vko = view_of(ko);
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), ct = cos.stride(1);
  const int64_t sb = sin.size(0) == 1 ? 0 : sin.stride(0), st = sin.stride(1);
  // Positions per task: enough that a task moves ≥ 64K elements of q and k (rms_norm_kernel.cpp).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>((Hq + Hk) * D, 1));
  at::parallel_for(0, B * T, grain, [&](int64_t p0, int64_t p1) {
    std::vector<float> c(D), s(D), sraw(D), row(D), res(D);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / T, t = p % T;
      cpu::to_f32<S>(cp + b * cb + t * ct, c.data(), D);
      cpu::to_f32<S>(sp + b * sb + t * st, sraw.data(), D);
      for (int64_t i = 0; i < h2; ++i) {
        // s'[i] multiplies the partner x[i ± D/2] (see the file comment).
        s[i] = transpose ? sraw[i + h2] : -sraw[i];
        s[i + h2] = transpose ? -sraw[i] : sraw[i + h2];
      }
      rotate_heads<S>(qp, vq, qop, vqo, Hq, b, t, D, c.data(), s.data(), row.data(), res.data());
      rotate_heads<S>(kp, vk, kop, vko, Hk, b, t, D, c.data(), s.data(), row.data(), res.data());
    }
  });
}

void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& qo,
         at::Tensor& ko, bool transpose, const char* op) {
  cpu::with_float_type(q.scalar_type(), op, [&](auto tag) {
    using S = decltype(tag);
    apply<S>(q, k, cos, sin, qo, ko, transpose);
  });
}

// A unit last stride for cos/sin (the rotary module's are contiguous; an expand over B is kept).
at::Tensor inner_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.numel() == 0 || t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace
}  // namespace detail

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin) {
  using namespace detail;
  const at::Tensor c = inner_contiguous(cos), s = inner_contiguous(sin);
  check_inputs(q, k, c, s, "rope");
  at::Tensor qo = at::empty_like(q), ko = at::empty_like(k);  // q's layout when it is dense, else contiguous
  run(q, k, c, s, qo, ko, /*transpose=*/false, "rope_cpu");
  return {qo, ko};
}

void rope_inplace_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  using namespace detail;
  const at::Tensor c = inner_contiguous(cos), s = inner_contiguous(sin);
  check_inputs(q, k, c, s, "rope_");
  at::Tensor qo = q, ko = k;
  run(q, k, c, s, qo, ko, /*transpose=*/false, "rope_inplace_cpu");
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                     const at::Tensor& cos, const at::Tensor& sin) {
  using namespace detail;
  const at::Tensor c = inner_contiguous(cos), s = inner_contiguous(sin);
  const at::Tensor gq = inner_contiguous(grad_q), gk = inner_contiguous(grad_k);
  check_inputs(gq, gk, c, s, "_rope_backward");
  at::Tensor qo = at::empty_like(gq), ko = at::empty_like(gk);
  run(gq, gk, c, s, qo, ko, /*transpose=*/true, "rope_backward_cpu");
  return {qo, ko};
}

LLMKERN_CPU_IMPL(m) {
  m.impl("rope", &rope_cpu);
  m.impl("rope_", &rope_inplace_cpu);
  m.impl("_rope_backward", &rope_backward_cpu);
}

}  // namespace llmkern::ops
