// The row kernel of the cross-entropy, shared by the CPU cross_entropy op and the CPU
// fused_linear_cross_entropy op (schemas: csrc/ops/cross_entropy.cpp, fused_linear_cross_entropy.cpp).
#pragma once
#include <ATen/ATen.h>

namespace llmkern::ops::detail {

struct CrossEntropyParams {
  int64_t ignore_index;
  float label_smoothing;  // ε in [0, 1]
  float z_loss;           // coefficient of lse² (0: off)
};

// For every row t of logits (T, V), unit last stride, any row stride, fp32/fp16/bf16:
//   losses[t] (fp32) = (1-ε)·(lse_t - x_t[y_t]) + ε·(lse_t - mean_v x_t[v]) + z·lse_t², lse[t] (fp32),
//   both 0 where labels[t] == ignore_index;
// and, when grad is defined (T, V) in the logits' dtype (it may be logits itself: each row is read
// fully before it is written), grad[t] = row_scale[t]·d losses[t] / d logits[t] (row_scale null: 1),
// zero rows for ignored labels. Labels must have been checked (check_labels).
void cross_entropy_rows_cpu(const at::Tensor& logits, const at::Tensor& labels, const CrossEntropyParams& p,
                            float* losses, float* lse, const at::Tensor& grad, const float* row_scale);

// The gradient alone, from the lse of a forward: grad[t] = row_scale[t]·d losses[t] / d logits[t]
// (row_scale null: 1), zero rows for ignored labels whatever row_scale holds there.
void cross_entropy_grad_rows_cpu(const at::Tensor& logits, const at::Tensor& labels, const float* lse,
                                 const CrossEntropyParams& p, const at::Tensor& grad, const float* row_scale);

// Every label is ignore_index or in [0, V); the message names the first one that is not.
void check_labels(const at::Tensor& labels, int64_t V, int64_t ignore_index, const char* op);

}  // namespace llmkern::ops::detail
