// CUDA kernel of fused_adamw_ (schema and argument meanings: csrc/ops/fused_adamw.cpp; element math:
// csrc/include/llmkern/optim_math.h). Also compiled for the CPU under csrc/emu (namespace
// llmkern_emu), so it contains no #ifdef: launch.cuh hides the difference.
//
// Multi-tensor apply: the host packs up to kMaxTensors tensors' pointers and a block -> (tensor,
// chunk) map into one kernel argument (3.3 KB, under the 4 KB classic limit), and launches one
// block per kChunk elements. 64Ki-element chunks, 512 threads and <= 320 blocks per launch are the
// sizes DeepSpeed's and apex's multi_tensor_adam use; 320 blocks fill 132 SMs of an H100 2.4x
// over, and a model with ~1000 tensors takes ~30 launches instead of ~1000.
//
// No host sync: found_inf, step and grad_coef are read by every block from device memory. An
// overflow step returns before touching anything, so the step moves 12 bytes per block.
#include "../fused_adamw.h"
#include "llmkern/launch.cuh"
#include "llmkern/optim_math.h"
#include "llmkern/registration.h"

#include <tuple>
#include <vector>

namespace llmkern::ops {
namespace detail {

constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

struct AdamTable {
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  void* m[kMaxTensors];
  void* v[kMaxTensors];
  void* copy[kMaxTensors];
  int64_t n[kMaxTensors];
  unsigned char tensor_of_block[kMaxBlocks];
  int chunk_of_block[kMaxBlocks];
};

struct NoCopy {};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <class P, class G, class S, class M, bool kDecoupled>
__global__ void fused_adamw_kernel(AdamTable table, const float* step, const float* found_inf,
                                   const float* grad_coef, double lr, double beta1, double beta2, double eps,
                                   double weight_decay) {
  if (*found_inf != 0.0f) return;
  const int t = table.tensor_of_block[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(table.chunk_of_block[blockIdx.x]) * kChunk;
  const int64_t end = begin + kChunk < table.n[t] ? begin + kChunk : table.n[t];
  const AdamCoeffs c = adam_coeffs(static_cast<double>(*step), lr, beta1, beta2, eps, weight_decay, kDecoupled);
  const float coef = *grad_coef;
  P* p = static_cast<P*>(table.p[t]);
  const G* g = static_cast<const G*>(table.g[t]);
  S* m = static_cast<S*>(table.m[t]);
  S* v = static_cast<S*>(table.v[t]);
  M* copy = static_cast<M*>(table.copy[t]);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float pf = to_float(p[i]), mf = to_float(m[i]), vf = to_float(v[i]);
    adam_element(pf, to_float(g[i]) * coef, mf, vf, c);
    p[i] = from_float<P>(pf);
    m[i] = from_float<S>(mf);
    v[i] = from_float<S>(vf);
    if constexpr (!std::is_same_v<M, NoCopy>) copy[i] = from_float<M>(pf);
  }
}

template <class F>
void with_cuda_type(at::ScalarType d, F&& f) {
  switch (d) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(__half{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    default: TORCH_CHECK(false, "fused_adamw_: unsupported dtype ", d);
  }
}

struct Launch {
  const at::Tensor *step, *found_inf, *grad_coef;
  double lr, beta1, beta2, eps, weight_decay;  // derived constants are computed in double
  bool decoupled;
};

// Launches the blocks of one table; every tensor of a table has the same dtypes.
void launch_table(const AdamTable& table, int blocks, const Launch& a, at::ScalarType pd, at::ScalarType gd,
                  at::ScalarType sd, bool has_copy, at::ScalarType cd) {
  with_cuda_type(pd, [&](auto p0) {
    with_cuda_type(gd, [&](auto g0) {
      with_cuda_type(sd, [&](auto s0) {
        auto go = [&](auto m0) {
          using P = decltype(p0);
          using G = decltype(g0);
          using S = decltype(s0);
          using M = decltype(m0);
          const float* st = a.step->data_ptr<float>();
          const float* fi = a.found_inf->data_ptr<float>();
          const float* gc = a.grad_coef->data_ptr<float>();
          if (a.decoupled) {
            LAUNCH((fused_adamw_kernel<P, G, S, M, true>), blocks, kThreads, 0, llmkern::current_stream())(
                table, st, fi, gc, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay);
          } else {
            LAUNCH((fused_adamw_kernel<P, G, S, M, false>), blocks, kThreads, 0, llmkern::current_stream())(
                table, st, fi, gc, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay);
          }
          LLMKERN_CUDA_CHECK(cudaGetLastError());
        };
        if (!has_copy) return go(NoCopy{});
        if (cd == at::kHalf) return go(__half{});  // the checks refuse an fp32 model copy
        return go(__nv_bfloat16{});
      });
    });
  });
}

}  // namespace detail

void fused_adamw_device(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList model_copies, const at::Tensor& step,
                        const at::Tensor& found_inf, const at::Tensor& grad_coef, double lr, double beta1,
                        double beta2, double eps, double weight_decay, bool decoupled_weight_decay) {
  using namespace detail;
  check_fused_adamw(params, grads, exp_avgs, exp_avg_sqs, model_copies, step, found_inf, grad_coef, lr, beta1,
                    beta2, eps, weight_decay);
  LLMKERN_DEVICE_GUARD(step);
  const bool has_copy = !model_copies.empty();
  const Launch a{&step, &found_inf, &grad_coef, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay};
  // Bucket the tensors by dtype combination; each bucket is one kernel instantiation.
  auto key = [&](size_t j) {
    return std::make_tuple(params[j].scalar_type(), grads[j].scalar_type(), exp_avgs[j].scalar_type(),
                           has_copy ? model_copies[j].scalar_type() : at::kFloat);
  };
  std::vector<bool> done(params.size(), false);
  for (size_t first = 0; first < params.size(); ++first) {
    if (done[first]) continue;
    const auto k = key(first);
    AdamTable table{};
    int nt = 0, nb = 0;
    auto flush = [&] {
      if (nb > 0)
        launch_table(table, nb, a, std::get<0>(k), std::get<1>(k), std::get<2>(k), has_copy, std::get<3>(k));
      nt = nb = 0;
    };
    for (size_t j = first; j < params.size(); ++j) {
      if (done[j] || key(j) != k) continue;
      done[j] = true;
      const int64_t n = params[j].numel();
      int slot = -1;
      for (int64_t chunk = 0; chunk * kChunk < n; ++chunk) {
        if (slot < 0) {
          if (nt == kMaxTensors) flush();
          slot = nt++;
          table.p[slot] = params[j].data_ptr();
          table.g[slot] = grads[j].data_ptr();
          table.m[slot] = exp_avgs[j].data_ptr();
          table.v[slot] = exp_avg_sqs[j].data_ptr();
          table.copy[slot] = has_copy ? model_copies[j].data_ptr() : nullptr;
          table.n[slot] = n;
        }
        table.tensor_of_block[nb] = static_cast<unsigned char>(slot);
        table.chunk_of_block[nb] = static_cast<int>(chunk);
        if (++nb == kMaxBlocks) {
          flush();
          slot = -1;  // the rest of this tensor starts a new table
        }
      }
    }
    flush();
  }
}

}  // namespace llmkern::ops

LLMKERN_DEVICE_IMPL(m) { m.impl("fused_adamw_", &llmkern::ops::fused_adamw_device); }
