// bn_lstm_layer and bn_lstm_layer_backward: one BN-LSTM layer over a whole
// sequence, one kernel for every backend (CompositeExplicitAutograd). Per
// step the forward is one matrix product, h_{t-1} @ weight_hh.T, and one
// fused step kernel (_bn_lstm_step, per device: both gate BatchNorms, the
// gates, the cell, BN_c and h, and the running-statistics update); the
// backward runs the step kernels' mirror image from the last step to the
// first, and leaves the weight gradient to one matrix product over all steps.
// The input projection of every step (x @ weight_ih.T, one matrix product) is
// the caller's (torchnorm.nn.BNLSTM), so autograd covers it as usual.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>

#include "common/cpu_products.h"
#include "common/input_checks.h"
#include "ops/sequence_norm.h"

namespace torchnorm {
namespace {

using at::Tensor;
using std::optional;

constexpr const char* kOp = "torchnorm.bn_lstm_layer";

// (T, N) bool of the steps t < lengths[n], on the gates' device; nullopt
// without lengths. Checks the lengths (a host read of their range).
optional<Tensor> valid_steps(const optional<Tensor>& lengths, int64_t T, int64_t N, const Tensor& like) {
  if (!lengths) return std::nullopt;
  TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == N, kOp, ": expected lengths of shape (", N,
              ",), one per sequence, got ", lengths->sizes());
  TORCH_CHECK(!at::isFloatingType(lengths->scalar_type()) && lengths->scalar_type() != at::kBool, kOp,
              ": expected integer lengths, got ", lengths->scalar_type());
  const Tensor l = lengths->to(like.device(), at::kLong);
  if (N > 0) {
    const int64_t shortest = l.min().item<int64_t>(), longest = l.max().item<int64_t>();
    TORCH_CHECK(shortest >= 0 && longest <= T, kOp, ": lengths must lie in [0, ", T,
                "] (the input has that many steps), got lengths from ", shortest, " to ", longest);
  }
  return at::arange(T, l.options()).unsqueeze(1) < l.unsqueeze(0);
}

void check_layer(const Tensor& input_gates, const Tensor& hx, const Tensor& cx, const Tensor& weight_hh,
                 int64_t first_step) {
  check_supported_input(kOp, input_gates);
  TORCH_CHECK(input_gates.dim() == 3, kOp, ": expected input_gates of shape (steps, batch, 4 * hidden_size), got ",
              input_gates.sizes());
  TORCH_CHECK(weight_hh.dim() == 2 && weight_hh.size(0) == 4 * weight_hh.size(1), kOp,
              ": expected weight_hh of shape (4 * hidden_size, hidden_size), got ", weight_hh.sizes());
  const int64_t N = input_gates.size(1), H = weight_hh.size(1);
  TORCH_CHECK(input_gates.size(2) == 4 * H, kOp, ": expected input_gates with ", 4 * H,
              " = 4 * hidden_size columns, got ", input_gates.size(2));
  TORCH_CHECK(weight_hh.scalar_type() == input_gates.scalar_type() && weight_hh.device() == input_gates.device(),
              kOp, ": expected weight_hh in ", input_gates.scalar_type(), " on ", input_gates.device(),
              " like the input, got ", weight_hh.scalar_type(), " on ", weight_hh.device());
  for (const auto& [name, state] : {std::pair<const char*, const Tensor*>{"hx", &hx}, {"cx", &cx}}) {
    TORCH_CHECK(state->dim() == 2 && state->size(0) == N && state->size(1) == H, kOp, ": expected ", name,
                " of shape (", N, ", ", H, ") = (batch, hidden_size), got ", state->sizes());
    TORCH_CHECK(state->scalar_type() == input_gates.scalar_type() && state->device() == input_gates.device(), kOp,
                ": expected ", name, " in ", input_gates.scalar_type(), " on ", input_gates.device(),
                " like the input, got ", state->scalar_type(), " on ", state->device());
  }
  TORCH_CHECK(first_step >= 0, kOp, ": expected the first time step >= 0, got ", first_step);
}

optional<Tensor> step_of(const optional<Tensor>& valid, int64_t t) {
  return valid ? optional<Tensor>(valid->select(0, t)) : std::nullopt;
}

// Each sequence's h at its last valid step: output[lengths[n] - 1, n], or
// hx[n] for an empty sequence.
Tensor last_valid_hidden(const Tensor& output, const Tensor& hx, const optional<Tensor>& lengths) {
  const int64_t T = output.size(0);
  if (T == 0) return hx.clone();
  if (!lengths) return output.select(0, T - 1).clone();
  const Tensor l = lengths->to(output.device(), at::kLong);
  const Tensor last = output.index({(l - 1).clamp_min(0), at::arange(output.size(1), l.options())});
  return at::where((l > 0).unsqueeze(1), last, hx);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_lstm_layer(
    const Tensor& input_gates, const Tensor& hx, const Tensor& cx, const Tensor& weight_hh,
    const optional<Tensor>& bias, const Tensor& bn_ih_weight, const Tensor& bn_hh_weight, const Tensor& bn_c_weight,
    const Tensor& bn_c_bias, const optional<Tensor>& rm_ih, const optional<Tensor>& rv_ih,
    const optional<Tensor>& rm_hh, const optional<Tensor>& rv_hh, const optional<Tensor>& rm_c,
    const optional<Tensor>& rv_c, const optional<Tensor>& lengths, int64_t first_step, bool training,
    double momentum, double eps) {
  check_layer(input_gates, hx, cx, weight_hh, first_step);
  const int64_t T = input_gates.size(0), N = input_gates.size(1), H = weight_hh.size(1);
  const optional<Tensor> valid = valid_steps(lengths, T, N, input_gates);
  const Tensor gates = input_gates.contiguous();
  Tensor output = at::empty({T, N, H}, gates.options());
  Tensor cells = at::empty({T, N, H}, gates.options());
  Tensor hidden_gates = at::empty({T, N, 4 * H}, gates.options());
  Tensor stats = at::empty({T, 2, 9 * H}, gates.options().dtype(accumulate_type(gates.scalar_type())));
  const RepeatedProduct hidden_product(weight_hh, N);
  Tensor h = hx.contiguous(), c = cx.contiguous();
  for (int64_t t = 0; t < T; ++t) {
    Tensor gh = hidden_gates.select(0, t);
    hidden_product.run(h, gh);
    ops::handle<ops::BNLSTMStep>().call(gates.select(0, t), gh, c, bias, bn_ih_weight, bn_hh_weight, bn_c_weight,
                                        bn_c_bias, rm_ih, rv_ih, rm_hh, rv_hh, rm_c, rv_c, first_step + t,
                                        step_of(valid, t), training, momentum, eps, output.select(0, t),
                                        cells.select(0, t), stats.select(0, t));
    h = output.select(0, t);
    c = cells.select(0, t);
  }
  // An ended sequence's cell was carried to the last step; its h was not.
  Tensor cy = T > 0 ? cells.select(0, T - 1).clone() : cx.clone();
  return {output, last_valid_hidden(output, hx, lengths), cy, hidden_gates, cells, stats};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_lstm_layer_backward(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_hy, const optional<Tensor>& grad_cy,
    const Tensor& input_gates, const Tensor& hx, const Tensor& cx, const Tensor& weight_hh,
    const optional<Tensor>& bias, const Tensor& bn_ih_weight, const Tensor& bn_hh_weight, const Tensor& bn_c_weight,
    const Tensor& bn_c_bias, const Tensor& output, const Tensor& hidden_gates, const Tensor& cells,
    const Tensor& stats, const optional<Tensor>& lengths, bool training) {
  check_layer(input_gates, hx, cx, weight_hh, 0);
  const int64_t T = input_gates.size(0), N = input_gates.size(1), H = weight_hh.size(1);
  const optional<Tensor> valid = valid_steps(lengths, T, N, input_gates);
  const Tensor gates = input_gates.contiguous();

  // What reaches each step's h from outside the recurrence: the output's
  // gradient, and h_n's at each sequence's last valid step (or hx's).
  Tensor grad_h_out =
      grad_output ? grad_output->clone(at::MemoryFormat::Contiguous) : at::zeros({T, N, H}, gates.options());
  Tensor grad_hx = at::zeros({N, H}, gates.options());
  if (grad_hy) {
    if (T == 0) {
      grad_hx += *grad_hy;
    } else if (!lengths) {
      grad_h_out.select(0, T - 1) += *grad_hy;
    } else {
      const Tensor l = lengths->to(gates.device(), at::kLong);
      const Tensor has_steps = (l > 0).unsqueeze(1);
      grad_h_out.index_put_({(l - 1).clamp_min(0), at::arange(N, l.options())},
                            at::where(has_steps, *grad_hy, at::zeros_like(*grad_hy)), /*accumulate=*/true);
      grad_hx += at::where(has_steps, at::zeros_like(*grad_hy), *grad_hy);
    }
  }

  Tensor grad_gates = at::empty_like(gates);
  Tensor grad_hidden_gates = at::empty({T, N, 4 * H}, gates.options());
  Tensor grad_params = at::zeros({14 * H}, stats.options());
  // What reaches c_t from later steps (two buffers, swapped each step).
  Tensor grad_c = grad_cy ? grad_cy->clone(at::MemoryFormat::Contiguous) : at::zeros({N, H}, gates.options());
  Tensor grad_c_prev = at::empty({N, H}, gates.options());
  // What reaches h_t through step t + 1's hidden_gates: grad_hidden_gates @ weight_hh.
  const RepeatedProduct grad_product(weight_hh.t(), N);
  Tensor grad_h_next = at::empty({N, H}, gates.options());
  for (int64_t t = T - 1; t >= 0; --t) {
    Tensor grad_h = grad_h_out.select(0, t);
    if (t < T - 1) grad_h += grad_h_next;
    const Tensor c_prev = t > 0 ? cells.select(0, t - 1) : cx.contiguous();
    ops::handle<ops::BNLSTMStepBackward>().call(grad_h, grad_c, gates.select(0, t), hidden_gates.select(0, t),
                                                c_prev, cells.select(0, t), bias, bn_ih_weight, bn_hh_weight,
                                                bn_c_weight, bn_c_bias, stats.select(0, t), step_of(valid, t),
                                                training, grad_gates.select(0, t), grad_hidden_gates.select(0, t),
                                                grad_c_prev, grad_params);
    grad_product.run(grad_hidden_gates.select(0, t), grad_h_next);
    std::swap(grad_c, grad_c_prev);
  }
  if (T > 0) grad_hx += grad_h_next;

  // sum over steps of grad_hidden_gates[t].T @ h_{t-1}, as one product.
  Tensor grad_weight_hh;
  if (T > 0) {
    const Tensor h_prev = at::cat({hx.unsqueeze(0), output.narrow(0, 0, T - 1)});
    grad_weight_hh = at::mm(grad_hidden_gates.view({T * N, 4 * H}).t(), h_prev.reshape({T * N, H}));
  } else {
    grad_weight_hh = at::zeros_like(weight_hh);
  }
  const int64_t G = 4 * H;
  auto param_grad = [&](int64_t offset, int64_t width, const Tensor& param) {
    // A copy even where the dtype matches: each gradient is a tensor of its own.
    return grad_params.narrow(0, offset, width).to(param.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  };
  Tensor grad_bias = bias ? param_grad(0, G, *bias) : empty_placeholder(gates, gates.scalar_type());
  return {grad_gates,
          grad_hx,
          grad_c,
          grad_weight_hh,
          grad_bias,
          param_grad(G, G, bn_ih_weight),
          param_grad(2 * G, G, bn_hh_weight),
          param_grad(3 * G, H, bn_c_weight),
          param_grad(3 * G + H, H, bn_c_bias)};
}

}  // namespace
}  // namespace torchnorm

TORCH_LIBRARY_IMPL(torchnorm, CompositeExplicitAutograd, m) {
  m.impl("bn_lstm_layer", &torchnorm::bn_lstm_layer);
  m.impl("bn_lstm_layer_backward", &torchnorm::bn_lstm_layer_backward);
}
