// Input validation and the shared preamble of adapter_bottleneck, used by the CPU and CUDA
// implementations (schema: csrc/ops/adapter_bottleneck.cpp).
//
// Both backends work on fp32 copies of the (small) parameters: D and Uᵀ as (R, C) row-major so that
// every kernel reads a parameter row contiguously, and the biases/LN parameters as length-R/C fp32
// vectors, zeros (or absent LN) when None, so the kernels have no None branches. At R=64, C=4096
// the casts are 2 MiB, against the 32 MiB of one (2048, 4096) fp32 activation.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <string_view>

#include "llmkern/activation.h"
#include "llmkern/checks.h"

namespace llmkern::ops::detail {

struct AdapterShapes {
  int64_t t, c, r;
  Act act;
  bool ln;
};

inline Act parse_activation(std::string_view a) {
  std::string names;
  for (size_t i = 0; i < kActNames.size(); ++i) {
    if (a == kActNames[i]) return static_cast<Act>(i);
    names += (i ? ", " : "") + std::string(kActNames[i]);
  }
  TORCH_CHECK(false, "adapter_bottleneck: activation must be one of ", names, "; got '", a, "'");
}

inline void check_vec(const at::Tensor& x, const at::Tensor& v, const char* name, int64_t n, const char* what) {
  using namespace llmkern::detail;
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, "adapter_bottleneck: ", name, " has shape ", v.sizes(),
              "; expected (", what, ") = (", n, ")");
  check_same_dtype(x, "x", v, name);
  check_same_device(x, "x", v, name);
}

inline AdapterShapes check_adapter_inputs(const at::Tensor& x, const at::Tensor& down_weight,
                                          const std::optional<at::Tensor>& down_bias, const at::Tensor& up_weight,
                                          const std::optional<at::Tensor>& up_bias, std::string_view activation,
                                          const std::optional<at::Tensor>& ln_weight,
                                          const std::optional<at::Tensor>& ln_bias, double eps) {
  using namespace llmkern::detail;
  check_dim(x, "adapter_bottleneck: x", 2, "(T, C)");
  check_dim(down_weight, "adapter_bottleneck: down_weight", 2, "(R, C)");
  check_dim(up_weight, "adapter_bottleneck: up_weight", 2, "(C, R)");
  const int64_t t = x.size(0), c = x.size(1), r = down_weight.size(0);
  TORCH_CHECK(down_weight.size(1) == c, "adapter_bottleneck: x has C=", c, " (shape ", x.sizes(),
              ") but down_weight has shape ", down_weight.sizes(), "; expected (R, ", c, ")");
  TORCH_CHECK(c >= 1, "adapter_bottleneck: x must have C >= 1 channels, got shape ", x.sizes());
  TORCH_CHECK(r >= 1, "adapter_bottleneck: bottleneck R must be >= 1, got down_weight of shape ", down_weight.sizes());
  TORCH_CHECK(up_weight.size(0) == c && up_weight.size(1) == r, "adapter_bottleneck: up_weight has shape ",
              up_weight.sizes(), "; expected (C, R) = (", c, ", ", r, ")");
  check_float_dtype(x, "adapter_bottleneck: x", /*allow_double=*/false);
  check_same_dtype(x, "x", down_weight, "down_weight");
  check_same_dtype(x, "x", up_weight, "up_weight");
  check_same_device(x, "x", down_weight, "down_weight");
  check_same_device(x, "x", up_weight, "up_weight");
  if (down_bias.has_value()) check_vec(x, *down_bias, "down_bias", r, "R");
  if (up_bias.has_value()) check_vec(x, *up_bias, "up_bias", c, "C");
  if (ln_weight.has_value()) check_vec(x, *ln_weight, "ln_weight", c, "C");
  if (ln_bias.has_value()) {
    TORCH_CHECK(ln_weight.has_value(), "adapter_bottleneck: ln_bias is given without ln_weight; LayerNorm is "
                "applied iff ln_weight is given");
    check_vec(x, *ln_bias, "ln_bias", c, "C");
  }
  TORCH_CHECK(eps >= 0.0, "adapter_bottleneck: eps must be >= 0, got ", eps);
  return {t, c, r, parse_activation(activation), ln_weight.has_value()};
}

// A length-n fp32 copy of an optional vector, or zeros.
inline at::Tensor f32_or_zeros(const std::optional<at::Tensor>& v, const at::Tensor& x, int64_t n) {
  return v.has_value() ? v->to(at::kFloat).contiguous() : at::zeros({n}, x.options().dtype(at::kFloat));
}

// The fp32 parameters both passes read. d = D (R, C); ut = Uᵀ (R, C).
struct AdapterParams {
  at::Tensor d, db, ut, ub, lnw, lnb;
};

inline AdapterParams prepare_params(const at::Tensor& x, const AdapterShapes& sh, const at::Tensor& down_weight,
                                    const std::optional<at::Tensor>& down_bias, const at::Tensor& up_weight,
                                    const std::optional<at::Tensor>& up_bias,
                                    const std::optional<at::Tensor>& ln_weight,
                                    const std::optional<at::Tensor>& ln_bias) {
  AdapterParams p;
  p.d = down_weight.to(at::kFloat).contiguous();
  p.ut = up_weight.t().to(at::kFloat).contiguous();
  p.db = f32_or_zeros(down_bias, x, sh.r);
  p.ub = f32_or_zeros(up_bias, x, sh.c);
  if (sh.ln) {
    p.lnw = ln_weight->to(at::kFloat).contiguous();
    p.lnb = f32_or_zeros(ln_bias, x, sh.c);
  }
  return p;
}

struct AdapterForward {
  AdapterShapes sh;
  AdapterParams p;
  at::Tensor x, res, out, z, mean, rstd;  // res: the residual, undefined for the series form (r = x)

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const { return {out, z, mean, rstd}; }
};

inline AdapterForward prepare_adapter_forward(const at::Tensor& x, const at::Tensor& down_weight,
                                              const std::optional<at::Tensor>& down_bias,
                                              const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                                              std::string_view activation, const std::optional<at::Tensor>& ln_weight,
                                              const std::optional<at::Tensor>& ln_bias, double eps,
                                              const std::optional<at::Tensor>& residual) {
  AdapterForward f;
  f.sh = check_adapter_inputs(x, down_weight, down_bias, up_weight, up_bias, activation, ln_weight, ln_bias, eps);
  const auto& sh = f.sh;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "adapter_bottleneck: residual has shape ", residual->sizes(),
                "; expected x's shape ", x.sizes());
    llmkern::detail::check_same_dtype(x, "x", *residual, "residual");
    llmkern::detail::check_same_device(x, "x", *residual, "residual");
    f.res = residual->contiguous();
  }
  f.p = prepare_params(x, sh, down_weight, down_bias, up_weight, up_bias, ln_weight, ln_bias);
  f.x = x.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  f.out = at::empty({sh.t, sh.c}, x.options());
  f.z = at::empty({sh.t, sh.r}, f32);
  f.mean = at::empty({sh.ln ? sh.t : 0}, f32);
  f.rstd = at::empty({sh.ln ? sh.t : 0}, f32);
  return f;
}

// The backward's inputs and its fp32 results. Kernels fill gx and the fp32 sums; outputs() casts.
struct AdapterBackward {
  AdapterShapes sh;
  AdapterParams p;
  at::Tensor g, x, z, mean, rstd, gx;
  at::Tensor gd, gdb, gut, gub, glnw, glnb;  // fp32: D, d, Uᵀ (R, C), u, LN weight and bias

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    const auto dt = x.scalar_type();
    const auto empty = [&] { return at::empty({0}, x.options()); };  // one each: outputs must not alias
    // copy=true: the fp32 sums may be views of one scratch buffer; outputs must not alias.
    const auto cast = [&](const at::Tensor& t) { return t.to(dt, /*non_blocking=*/false, /*copy=*/true); };
    return {gx,
            cast(gd),
            cast(gdb),
            cast(gut.t().contiguous()),
            cast(gub),
            sh.ln ? cast(glnw) : empty(),
            sh.ln ? cast(glnb) : empty()};
  }
};

inline AdapterBackward prepare_adapter_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                const at::Tensor& down_weight,
                                                const std::optional<at::Tensor>& down_bias,
                                                const at::Tensor& up_weight, std::string_view activation,
                                                const std::optional<at::Tensor>& ln_weight,
                                                const std::optional<at::Tensor>& ln_bias, const at::Tensor& z,
                                                const at::Tensor& mean, const at::Tensor& rstd) {
  using namespace llmkern::detail;
  AdapterBackward b;
  b.sh = check_adapter_inputs(x, down_weight, down_bias, up_weight, std::nullopt, activation, ln_weight, ln_bias,
                              0.0);
  const auto& sh = b.sh;
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "_adapter_bottleneck_backward: grad_out has shape ", grad_out.sizes(),
              "; expected x's shape ", x.sizes());
  check_same_dtype(x, "x", grad_out, "grad_out");
  check_same_device(x, "x", grad_out, "grad_out");
  TORCH_CHECK(z.dim() == 2 && z.size(0) == sh.t && z.size(1) == sh.r && z.scalar_type() == at::kFloat,
              "_adapter_bottleneck_backward: z has shape ", z.sizes(), " and dtype ", z.scalar_type(),
              "; expected (T, R) = (", sh.t, ", ", sh.r, ") and float32");
  const int64_t nstat = sh.ln ? sh.t : 0;
  for (const auto& [s, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}}) {
    TORCH_CHECK(s->dim() == 1 && s->size(0) == nstat && s->scalar_type() == at::kFloat,
                "_adapter_bottleneck_backward: ", name, " has shape ", s->sizes(), " and dtype ", s->scalar_type(),
                "; expected (", nstat, ") and float32 (", sh.ln ? "T, with LayerNorm" : "0, without LayerNorm", ")");
    check_same_device(x, "x", *s, name);
  }
  check_same_device(x, "x", z, "z");
  b.p = prepare_params(x, sh, down_weight, down_bias, up_weight, std::nullopt, ln_weight, ln_bias);
  b.g = grad_out.contiguous();
  b.x = x.contiguous();
  b.z = z.contiguous();
  b.mean = mean.contiguous();
  b.rstd = rstd.contiguous();
  b.gx = at::empty({sh.t, sh.c}, x.options());
  return b;
}

}  // namespace llmkern::ops::detail
