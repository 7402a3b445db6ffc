// The adapter activations and their derivatives, shared bit-for-bit in intent by the CPU and CUDA
// kernels (__host__ __device__ under nvcc, plain inline under g++ and the emulation). fp32 only: the
// pre-activation z is always kept in fp32. Formulas are torch's: F.gelu (erf), F.gelu(approximate=
// "tanh") and F.silu.
#pragma once
#include <array>
#include <cmath>
#include <cstdint>
#include <string_view>

#include "llmkern/host_device.h"

namespace llmkern {

enum class Act : int32_t { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };
// The schema's activation strings, in Act's order: the names of llmkern/ops/adapter_bottleneck.py's
// Activation, in its order (tests/ops/test_adapter_bottleneck.py checks both against this op's error).
constexpr std::array<std::string_view, 4> kActNames = {"relu", "gelu", "gelu_tanh", "silu"};

constexpr float kSqrtHalf = 0.70710678118654752f;   // 1/√2
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1/√(2π)
constexpr float kSqrt2OverPi = 0.79788456080286536f; // √(2/π)
constexpr float kGeluCubic = 0.044715f;

LLMKERN_HD float act_fwd(Act a, float z) {
  switch (a) {
    case Act::kRelu: return z > 0.f ? z : 0.f;
    case Act::kGelu: return 0.5f * z * (1.f + erff(z * kSqrtHalf));
    case Act::kGeluTanh: return 0.5f * z * (1.f + tanhf(kSqrt2OverPi * (z + kGeluCubic * z * z * z)));
    default: return z / (1.f + expf(-z));  // silu
  }
}

// d act / dz at z. relu'(0) = 0, as torch's threshold_backward.
LLMKERN_HD float act_grad(Act a, float z) {
  switch (a) {
    case Act::kRelu: return z > 0.f ? 1.f : 0.f;
    case Act::kGelu: return 0.5f * (1.f + erff(z * kSqrtHalf)) + z * kInvSqrt2Pi * expf(-0.5f * z * z);
    case Act::kGeluTanh: {
      const float t = tanhf(kSqrt2OverPi * (z + kGeluCubic * z * z * z));
      return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kGeluCubic * z * z);
    }
    default: {
      const float sg = 1.f / (1.f + expf(-z));
      return sg * (1.f + z * (1.f - sg));
    }
  }
}

}  // namespace llmkern
