// CUDA kernel of fused_sgd_ (schema: csrc/ops/fused_sgd.cpp; element math: optim_math.h; launch
// scheme: multi_tensor_apply.cuh). Also compiled for the CPU under csrc/emu. No host sync: the
// overflow flag, the step (step 1 initialises the momentum buffer) and grad_coef are read on the
// device.
#include "llmkern/launch.cuh"  // first: under emulation it brings the cuda_runtime.h stand-in
#include "../fused_sgd.h"
#include "llmkern/cuda_float.cuh"
#include "llmkern/multi_tensor_apply.cuh"
#include "llmkern/optim_math.h"
#include "llmkern/registration.h"

#include <tuple>

namespace llmkern::ops {
namespace detail {

using namespace llmkern::cuda;
enum SgdList { kSgdP, kSgdG, kSgdBuf, kSgdCopy, kSgdLists };
using SgdTable = mta::Table<kSgdLists, 48>;  // 4 x 48 x 8 B + sizes + bases + block map = 3.9 KB

template <class P, class G, class B, class M>
__global__ void fused_sgd_kernel(SgdTable table, const float* step, const float* found_inf, const float* grad_coef,
                                 float lr, float momentum, float one_minus_dampening, float weight_decay,
                                 bool nesterov) {
  if (*found_inf != 0.0f || !(*step >= 1.0f)) return;  // an overflow, or a step check_step reports
  int t;
  int64_t begin, end;
  mta::block_range(table, t, begin, end);
  const SgdCoeffs c{lr, momentum, one_minus_dampening, weight_decay, nesterov, *step == 1.0f};
  const float coef = *grad_coef;
  P* p = static_cast<P*>(table.ptr[kSgdP][t]);
  const G* g = static_cast<const G*>(table.ptr[kSgdG][t]);
  B* buf = static_cast<B*>(table.ptr[kSgdBuf][t]);
  M* copy = static_cast<M*>(table.ptr[kSgdCopy][t]);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float pf = to_float(p[i]);
    float bf = 0.0f;
    if constexpr (!std::is_same_v<B, None>) bf = to_float(buf[i]);
    sgd_element(pf, to_float(g[i]) * coef, bf, c);
    p[i] = from_float<P>(pf);
    if constexpr (!std::is_same_v<B, None>) buf[i] = from_float<B>(bf);
    if constexpr (!std::is_same_v<M, None>) copy[i] = from_float<M>(pf);
  }
}

}  // namespace detail

void fused_sgd_device(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                      at::TensorList model_copies, const at::Tensor& step, const at::Tensor& found_inf,
                      const at::Tensor& grad_coef, double lr, double momentum, double dampening,
                      double weight_decay, bool nesterov) {
  using namespace detail;
  check_fused_sgd(params, grads, momentum_buffers, model_copies, step, found_inf, grad_coef, lr, momentum,
                  dampening, weight_decay, nesterov);
  LLMKERN_DEVICE_GUARD(step);
  const bool has_buf = !momentum_buffers.empty(), has_copy = !model_copies.empty();
  auto key = [&](size_t j) {
    return std::make_tuple(params[j].scalar_type(), grads[j].scalar_type(),
                           has_buf ? momentum_buffers[j].scalar_type() : at::kFloat,
                           has_copy ? model_copies[j].scalar_type() : at::kFloat);
  };
  const float* st = step.data_ptr<float>();
  const float* fi = found_inf.data_ptr<float>();
  const float* gc = grad_coef.data_ptr<float>();
  const float lr_f = static_cast<float>(lr), mom = static_cast<float>(momentum);
  const float omd = static_cast<float>(1.0 - dampening), wd = static_cast<float>(weight_decay);
  mta::apply<kSgdLists, 48>(
      {params, grads, momentum_buffers, model_copies}, key, [&](const SgdTable& table, int blocks, size_t j) {
        with_type(params[j].scalar_type(), "fused_sgd_: params", [&](auto p0) {
          with_type(grads[j].scalar_type(), "fused_sgd_: grads", [&](auto g0) {
            auto with_buf = [&](auto&& f) {
              if (!has_buf) return f(None{});
              with_state_type(momentum_buffers[j].scalar_type(), f);
            };
            with_buf([&](auto b0) {
              with_copy_type(has_copy, has_copy ? model_copies[j].scalar_type() : at::kFloat, [&](auto m0) {
                using P = decltype(p0);
                using G = decltype(g0);
                using B = decltype(b0);
                using M = decltype(m0);
                LAUNCH((fused_sgd_kernel<P, G, B, M>), blocks, mta::kThreads, 0, llmkern::current_stream())(
                    table, st, fi, gc, lr_f, mom, omd, wd, nesterov);
                LLMKERN_CUDA_CHECK(cudaGetLastError());
              });
            });
          });
        });
      });
}

}  // namespace llmkern::ops

LLMKERN_DEVICE_IMPL(m) { m.impl("fused_sgd_", &llmkern::ops::fused_sgd_device); }
