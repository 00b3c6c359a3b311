#pragma once
// The per-element math of a BN-LSTM step (Cooijmans et al. 2016), shared by
// the CPU and CUDA kernels of _bn_lstm_step and _bn_lstm_step_backward. A
// step's gate pre-activation, per column k of the 4H gates (order i, f, g, o
// as torch.nn.LSTM), is
//   a = (gx - mean_ih) * scale_ih + (gh - mean_hh) * scale_hh + bias
// with scale = bn weight * rstd (the gate BNs have no shift: the bias covers
// it), and then, per hidden unit,
//   c = sigmoid(a_f) * c_prev + sigmoid(a_i) * tanh(a_g)
//   h = sigmoid(a_o) * tanh(z),  z = (c - mean_c) * scale_c + bn_c_bias.
// The backward recomputes the gates from gx and gh rather than saving them.
// The BatchNorm parts (coefficients, their backward, the running average)
// are those of csrc/common/batch_norm_math.h.
#include <cmath>

#include "macros.h"

namespace torchnorm {

// exp and tanh of one element. The CPU kernels specialize it for
// at::vec::Vectorized, so the formulas below serve whole vectors there too.
template <typename T>
struct ElementMath {
  static TN_HOST_DEVICE T exp(T x) { return ::exp(x); }
  static TN_HOST_DEVICE T tanh(T x) { return ::tanh(x); }
};

template <typename acc_t>
TN_HOST_DEVICE acc_t sigmoid(acc_t a) {
  return acc_t(1) / (acc_t(1) + ElementMath<acc_t>::exp(acc_t(0) - a));
}

template <typename acc_t>
TN_HOST_DEVICE acc_t gate_pre_activation(acc_t gx_centred, acc_t scale_ih, acc_t gh_centred, acc_t scale_hh,
                                         acc_t bias) {
  return gx_centred * scale_ih + gh_centred * scale_hh + bias;
}

// The four gates of one hidden unit after their nonlinearities.
template <typename acc_t>
struct LstmGates {
  acc_t i, f, g, o;  // sigmoid(a_i), sigmoid(a_f), tanh(a_g), sigmoid(a_o)
};

// The gates the cell update needs (i, f, g; o left 0): all a backward's cell
// part recomputes.
template <typename acc_t>
TN_HOST_DEVICE LstmGates<acc_t> lstm_cell_gates(acc_t a_i, acc_t a_f, acc_t a_g) {
  return {sigmoid(a_i), sigmoid(a_f), ElementMath<acc_t>::tanh(a_g), acc_t(0)};
}

template <typename acc_t>
TN_HOST_DEVICE LstmGates<acc_t> lstm_gates(acc_t a_i, acc_t a_f, acc_t a_g, acc_t a_o) {
  LstmGates<acc_t> gates = lstm_cell_gates(a_i, a_f, a_g);
  gates.o = sigmoid(a_o);
  return gates;
}

template <typename acc_t>
TN_HOST_DEVICE acc_t lstm_cell(const LstmGates<acc_t>& gates, acc_t c_prev) {
  return gates.f * c_prev + gates.i * gates.g;
}

// Gradients of one hidden unit's step. dz is the gradient at z (the BN_c
// output) and do_act the gradient at sigmoid(a_o), both from dh; dc is all
// that reaches c (from later steps and through BN_c). Returns the
// pre-activation gradients and the gradient reaching c_prev.
template <typename acc_t>
struct LstmOutputGrads {
  acc_t dz, da_o;
};

template <typename acc_t>
TN_HOST_DEVICE LstmOutputGrads<acc_t> lstm_output_grads(acc_t dh, acc_t gate_o, acc_t tanh_z) {
  return {dh * gate_o * (acc_t(1) - tanh_z * tanh_z), dh * tanh_z * gate_o * (acc_t(1) - gate_o)};
}

template <typename acc_t>
struct LstmCellGrads {
  acc_t da_i, da_f, da_g, dc_prev;
};

template <typename acc_t>
TN_HOST_DEVICE LstmCellGrads<acc_t> lstm_cell_grads(const LstmGates<acc_t>& gates, acc_t dc, acc_t c_prev) {
  return {dc * gates.g * gates.i * (acc_t(1) - gates.i), dc * c_prev * gates.f * (acc_t(1) - gates.f),
          dc * gates.i * (acc_t(1) - gates.g * gates.g), dc * gates.f};
}

}  // namespace torchnorm
