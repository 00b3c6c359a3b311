#pragma once
// Host-side pieces of the sequence-norm ops (masked_batch_norm and the BN-LSTM
// step) that every backend shares: the argument checks, which row of (L, C)
// per-step running statistics a step uses, the statistics that normalize
// (batch or running) and the running-statistics update. These run as ATen
// ops on the input's device, so the CPU and CUDA kernels only compute the
// column moments of the valid rows and the element-wise passes; nothing
// here waits for the device (the valid-row count stays a device tensor).
#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <tuple>

namespace torchnorm {

// The checks of masked_batch_norm: a 2-d (R, C) supported input; valid a bool
// (R,); weight and bias (C,); running statistics both or neither, (C,) or
// (L, C) with L >= 1, given in evaluation; step >= 0; every tensor on the
// input's device.
void check_masked_batch_norm(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& valid,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, int64_t step, bool training);

// The checks of a valid-row mask: a bool (rows,) on the input's device.
void check_valid_rows(const char* op, const std::optional<at::Tensor>& valid, const at::Tensor& input, int64_t rows);

// Running statistics of `features` columns: both or neither, (features,) or
// (L, features), on the input's device; required unless training.
void check_running_stats(const char* op, const char* name, const std::optional<at::Tensor>& running_mean,
                         const std::optional<at::Tensor>& running_var, const at::Tensor& input, int64_t features,
                         bool training);

// The checks of a BN-LSTM step (_bn_lstm_step and its backward): input_gates
// and hidden_gates (N, 4H) of one supported dtype, cx (N, H) of that dtype,
// bias (4H) and the BN parameters (4H, 4H, H, H), valid (N,), one device.
void check_bn_lstm_step(const char* op, const at::Tensor& input_gates, const at::Tensor& hidden_gates,
                        const at::Tensor& cx, const std::optional<at::Tensor>& bias, const at::Tensor& bn_ih_weight,
                        const at::Tensor& bn_hh_weight, const at::Tensor& bn_c_weight, const at::Tensor& bn_c_bias,
                        const std::optional<at::Tensor>& valid);

// Outputs a step writes into: each contiguous, of cx's shape (hy, cy,
// grad_cx) or input_gates' (the gate gradients), named by the first of the
// pair; stats a contiguous (2, stats_width) of the accumulation dtype.
struct NamedOutput {
  const char* name;
  const at::Tensor* tensor;
};
void check_step_outputs(const char* op, const at::Tensor& input_gates, const at::Tensor& cx,
                        std::initializer_list<NamedOutput> outputs, const at::Tensor& stats, int64_t stats_width);

// An accumulation-dtype contiguous (width,) on the input's device.
void check_accumulator(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input, int64_t width);

// Every check of one op's entry, for both backends: masked_batch_norm_backward
// (the forward's checks without running statistics, grad_output like the
// input, mean and rstd (C,) floating on its device), _bn_lstm_step (the step,
// step >= 0, the three running statistics, the outputs) and
// _bn_lstm_step_backward (the step, cy and the incoming gradients like cx,
// the gradient outputs, grad_params (14H,)).
void check_masked_batch_norm_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                      const std::optional<at::Tensor>& valid,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                      const at::Tensor& rstd);
void check_bn_lstm_step_forward(const char* op, const at::Tensor& input_gates, const at::Tensor& hidden_gates,
                                const at::Tensor& cx, const std::optional<at::Tensor>& bias,
                                const at::Tensor& bn_ih_weight, const at::Tensor& bn_hh_weight,
                                const at::Tensor& bn_c_weight, const at::Tensor& bn_c_bias,
                                const std::optional<at::Tensor>& running_mean_ih,
                                const std::optional<at::Tensor>& running_var_ih,
                                const std::optional<at::Tensor>& running_mean_hh,
                                const std::optional<at::Tensor>& running_var_hh,
                                const std::optional<at::Tensor>& running_mean_c,
                                const std::optional<at::Tensor>& running_var_c, int64_t step,
                                const std::optional<at::Tensor>& valid, bool training, const at::Tensor& hy,
                                const at::Tensor& cy, const at::Tensor& stats);
void check_bn_lstm_step_backward(const char* op, const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                                 const at::Tensor& input_gates, const at::Tensor& hidden_gates, const at::Tensor& cx,
                                 const at::Tensor& cy, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& bn_ih_weight, const at::Tensor& bn_hh_weight,
                                 const at::Tensor& bn_c_weight, const at::Tensor& bn_c_bias, const at::Tensor& stats,
                                 const std::optional<at::Tensor>& valid, const at::Tensor& grad_input_gates,
                                 const at::Tensor& grad_hidden_gates, const at::Tensor& grad_cx,
                                 const at::Tensor& grad_params);

// The row of (L, C) running statistics that step `step` uses, min(step, L - 1)
// (a view); 1-d statistics are returned as they are.
at::Tensor running_row(const at::Tensor& running, int64_t step);

// Column moments of the valid rows, as the backends' kernels compute them:
// mean and biased variance (C,) and the valid-row count (0-d), all in the
// accumulation dtype.
struct ColumnMoments {
  at::Tensor mean, var, count;
  // The count, when the host knows it without waiting (the CPU kernels):
  // then the running update is four in-place ops instead of a dozen.
  std::optional<int64_t> host_count = std::nullopt;
};

// The (mean, rstd) that normalize, in the accumulation dtype: the batch's in
// training, the running row's in evaluation (copies, never views: the running
// statistics may change before a backward reads them).
std::tuple<at::Tensor, at::Tensor> normalizing_stats(bool training, const std::optional<ColumnMoments>& batch,
                                                     const std::optional<at::Tensor>& running_mean,
                                                     const std::optional<at::Tensor>& running_var, int64_t step,
                                                     double eps, at::ScalarType acc_type);

// Training: running = (1 - momentum) * running + momentum * batch in the used
// row, with the unbiased variance (the biased one, 0, for a single valid
// row); no valid row leaves them alone. Nothing without running statistics.
void update_running_stats(const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var, int64_t step, const ColumnMoments& batch,
                          double momentum);

}  // namespace torchnorm
