"""Sequence norms as modules: recurrent BatchNorm and BN-LSTM (Cooijmans et al.
2016, arXiv 1603.09025), sequence-wise BatchNorm and BN-RNNs (Laurent et al.
2015, arXiv 1510.01378).

BNLSTM and BNRNN take torch.nn.LSTM's calling convention: ``(T, N, *)``
input (``(N, T, *)`` with ``batch_first``) or a PackedSequence, an optional
initial state of shape ``(num_layers, N, H)``, and return ``(output, state)``
shaped as torch.nn's. A padded batch can instead give its ``lengths``.
Statistics are over the batch, so unbatched (2-d) input is refused.
"""
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import functional as F
from .batch_norm import _BatchNormCall

__all__ = ["RecurrentBatchNorm1d", "BNLSTMCell", "BNLSTM", "SequenceBatchNorm1d", "BNRNN"]

# The paper's initial BatchNorm scale: 0.1 (it found 0.01 and below unstable).
BN_WEIGHT_INIT = 0.1


class RecurrentBatchNorm1d(torch.nn.Module):
    """BatchNorm of an ``(N, C)`` input at time step ``t`` with statistics of its
    own for every step (Cooijmans et al. 2016).

    ``weight`` and ``bias`` are shared across time; ``running_mean`` and
    ``running_var`` are ``(max_length, C)`` buffers, one row per step. A step
    at or beyond ``max_length`` uses the last row (and, in training, updates
    it). ``forward(x, t, mask=None)``: the bool ``(N,)`` ``mask`` marks the
    sequences still running; the others take no part in the statistics and
    output 0. If only one sequence is running its normalized value is exactly 0
    (variance 0), so it outputs ``bias``. ``weight`` starts at 0.1 (the paper's
    choice), ``bias`` at 0.
    """

    def __init__(self, num_features: int, max_length: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.max_length, self.eps, self.momentum, self.affine = (
            num_features, max_length, eps, momentum, affine)
        if affine:
            self.weight = torch.nn.Parameter(torch.empty(num_features, **factory))
            self.bias = torch.nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(max_length, num_features, **factory))
        self.register_buffer("running_var", torch.ones(max_length, num_features, **factory))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            torch.nn.init.constant_(self.weight, BN_WEIGHT_INIT)
            torch.nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, t: int, mask: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"RecurrentBatchNorm1d expects an (N, {self.num_features}) input, "
                             f"got shape {tuple(x.shape)}")
        return F.recurrent_batch_norm_step(x, t, self.running_mean, self.running_var, self.weight, self.bias,
                                           self.training, self.momentum, self.eps, mask)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, max_length={self.max_length}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}")


# ------------------------------------------------------------ shared pieces --

def _uniform_(tensors, hidden_size: int) -> None:
    """torch.nn.LSTM's initialization: U(-1/sqrt(H), 1/sqrt(H))."""
    bound = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0
    for tensor in tensors:
        torch.nn.init.uniform_(tensor, -bound, bound)


class _SequenceInput:
    """A BNLSTM/BNRNN input taken apart: ``(T, N, I)`` data, lengths or None,
    and how to give the output back in the input's form (tensor in its
    layout, or PackedSequence with the input's sort order)."""

    def __init__(self, input: Union[Tensor, PackedSequence], lengths: Optional[Tensor], batch_first: bool,
                 input_size: int, name: str) -> None:
        self.packed = input if isinstance(input, PackedSequence) else None
        self.batch_first = batch_first
        if self.packed is not None:
            if lengths is not None:
                raise ValueError(f"{name}: give lengths or a PackedSequence, not both")
            data, lengths = pad_packed_sequence(self.packed)  # (T, N, I), original order
        else:
            if input.dim() != 3:
                raise ValueError(f"{name} needs batched input of shape {'(N, T, I)' if batch_first else '(T, N, I)'}"
                                 f" (BatchNorm takes statistics over the batch), got shape {tuple(input.shape)}")
            data = input.transpose(0, 1) if batch_first else input
        if data.shape[2] != input_size:
            raise ValueError(f"{name}: expected input_size {input_size}, got an input with {data.shape[2]} features")
        self.data = data
        self.lengths = None
        if lengths is not None:
            F.valid_steps(lengths, data.shape[0], data.shape[1])  # checks them before anything runs
            self.lengths = torch.as_tensor(lengths).to(device=data.device, dtype=torch.long)

    @property
    def batch(self) -> int:
        return self.data.shape[1]

    def initial_state(self, state: Optional[Tensor], num_layers: int, hidden_size: int, name: str) -> Tensor:
        shape = (num_layers, self.batch, hidden_size)
        if state is None:
            return self.data.new_zeros(shape)
        if tuple(state.shape) != shape:
            raise ValueError(f"{name}: expected an initial state of shape {shape}, got {tuple(state.shape)}")
        return state

    def output(self, steps: Tensor) -> Union[Tensor, PackedSequence]:
        """``(T, N, H)`` outputs in the input's form."""
        if self.packed is None:
            return steps.transpose(0, 1) if self.batch_first else steps
        order = self.packed.sorted_indices
        lengths = self.lengths.cpu()
        if order is not None:
            steps, lengths = steps.index_select(1, order), lengths[order.cpu()]
        data = pack_padded_sequence(steps, lengths, enforce_sorted=True).data
        return PackedSequence(data, self.packed.batch_sizes, self.packed.sorted_indices,
                              self.packed.unsorted_indices)


# ------------------------------------------------------------------ BN-LSTM --

# Where the paper and its authors' Theano code (cooijmanstim/recurrent-batch-
# normalization) differ, we follow the paper: the gate BNs have no shift of
# their own (some of the code's scripts give them one; the LSTM bias covers
# it), and population statistics are running averages per step as torch.nn
# keeps them (the code estimates them in a separate pass after training).
class _BNLSTMLayers(torch.nn.Module):
    """Parameters and per-step running statistics of BN-LSTM layers, named
    with ``suffix`` (``_l{k}`` for BNLSTM, empty for BNLSTMCell)."""

    def _make_layer(self, suffix: str, input_size: int, hidden_size: int, max_length: int, bias: bool,
                    factory: dict) -> None:
        gates = 4 * hidden_size
        param = lambda *shape: torch.nn.Parameter(torch.empty(*shape, **factory))  # noqa: E731
        self.register_parameter(f"weight_ih{suffix}", param(gates, input_size))
        self.register_parameter(f"weight_hh{suffix}", param(gates, hidden_size))
        self.register_parameter(f"bias{suffix}", param(gates) if bias else None)
        self.register_parameter(f"bn_ih_weight{suffix}", param(gates))
        self.register_parameter(f"bn_hh_weight{suffix}", param(gates))
        self.register_parameter(f"bn_c_weight{suffix}", param(hidden_size))
        self.register_parameter(f"bn_c_bias{suffix}", param(hidden_size))
        for name, width in (("ih", gates), ("hh", gates), ("c", hidden_size)):
            self.register_buffer(f"bn_{name}_running_mean{suffix}", torch.zeros(max_length, width, **factory))
            self.register_buffer(f"bn_{name}_running_var{suffix}", torch.ones(max_length, width, **factory))

    def _reset_layer(self, suffix: str) -> None:
        g = lambda name: getattr(self, name + suffix)  # noqa: E731
        _uniform_([g("weight_ih"), g("weight_hh")], self.hidden_size)
        if g("bias") is not None:
            torch.nn.init.zeros_(g("bias"))
        for name in ("bn_ih_weight", "bn_hh_weight", "bn_c_weight"):
            torch.nn.init.constant_(g(name), BN_WEIGHT_INIT)
        torch.nn.init.zeros_(g("bn_c_bias"))
        for name in ("ih", "hh", "c"):
            g(f"bn_{name}_running_mean").zero_()
            g(f"bn_{name}_running_var").fill_(1)

    def _run_layer(self, suffix: str, x: Tensor, h0: Tensor, c0: Tensor, lengths: Optional[Tensor],
                   first_step: int) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        g = lambda name: getattr(self, name + suffix)  # noqa: E731
        stats = {name: (g(f"bn_{name}_running_mean"), g(f"bn_{name}_running_var")) for name in ("ih", "hh", "c")}
        return F.bn_lstm(x, h0, c0, g("weight_ih"), g("weight_hh"), g("bias"), g("bn_ih_weight"),
                         g("bn_hh_weight"), g("bn_c_weight"), g("bn_c_bias"), stats, self.training, self.momentum,
                         self.eps, lengths, first_step)


class BNLSTMCell(_BNLSTMLayers):
    """One step of BN-LSTM (Cooijmans et al. 2016)::

        gates = BN_hh(W_hh h) + BN_ih(W_ih x) + bias        (i, f, g, o; BN shifts fixed at 0)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g);   h' = sigmoid(o) * tanh(BN_c(c'))

    ``forward(x, t, hx=None)`` with ``x`` ``(N, input_size)`` at time step
    ``t`` and ``hx = (h, c)`` (zeros when None) returns ``(h', c')``. Each BN
    keeps running statistics per step in ``(max_length, F)`` buffers
    (``bn_ih_running_mean``, ...); a step at or beyond ``max_length`` uses the
    last row. BN scales start at 0.1, shifts at 0; weights as torch.nn.LSTMCell.
    """

    def __init__(self, input_size: int, hidden_size: int, max_length: int, bias: bool = True, eps: float = 1e-5,
                 momentum: float = 0.1, device=None, dtype=None) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.input_size, self.hidden_size, self.max_length, self.eps, self.momentum = (
            input_size, hidden_size, max_length, eps, momentum)
        self._make_layer("", input_size, hidden_size, max_length, bias, {"device": device, "dtype": dtype})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_layer("")

    def forward(self, x: Tensor, t: int, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        if x.dim() != 2:
            raise ValueError(f"BNLSTMCell needs batched (N, input_size) input (BatchNorm takes statistics over the "
                             f"batch), got shape {tuple(x.shape)}")
        if t < 0:
            raise ValueError(f"time step t must be >= 0, got {t}")
        h, c = (None, None) if hx is None else hx
        _, (h1, c1) = self._run_layer("", x.unsqueeze(0), h, c, None, t)
        return h1, c1

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, max_length={self.max_length}, bias={self.bias is not None}"


class BNLSTM(_BNLSTMLayers):
    """BN-LSTM (Cooijmans et al. 2016): torch.nn.LSTM with a BatchNorm of its own
    for every time step on both gate terms and on the cell.

    Per layer ``k`` the parameters are named as torch.nn.LSTM's where they mean
    the same: ``weight_ih_l{k}`` (4H, I), ``weight_hh_l{k}`` (4H, H),
    ``bias_l{k}`` (4H, one bias: the BN shifts of the gate terms are fixed at
    0); then ``bn_ih_weight_l{k}``, ``bn_hh_weight_l{k}`` (4H),
    ``bn_c_weight_l{k}``, ``bn_c_bias_l{k}`` (H), and buffers
    ``bn_{ih,hh,c}_running_{mean,var}_l{k}`` of shape (max_length, 4H or H).

    ``forward(input, hx=None, lengths=None)`` as torch.nn.LSTM: input ``(T, N,
    I)`` (``(N, T, I)`` with ``batch_first``) or a PackedSequence; ``hx = (h0,
    c0)`` each ``(num_layers, N, H)``; returns ``(output, (h_n, c_n))``. A
    padded batch may give ``lengths`` (any order) instead of packing: a
    sequence that has ended takes no part in later steps' statistics, outputs
    0 there, and its ``h_n``/``c_n`` are those of its last valid step. A step
    where only one sequence is still running normalizes it with variance 0:
    its gate BNs give 0 and its cell BN gives ``bn_c_bias``, so that step's
    ``h = sigmoid(o) * tanh(bn_c_bias)`` with ``o`` the bias alone.
    """

    def __init__(self, input_size: int, hidden_size: int, max_length: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, eps: float = 1e-5, momentum: float = 0.1,
                 device=None, dtype=None) -> None:
        super().__init__()
        if max_length < 1 or num_layers < 1:
            raise ValueError(f"max_length and num_layers must be >= 1, got {max_length} and {num_layers}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.input_size, self.hidden_size, self.max_length, self.num_layers = (
            input_size, hidden_size, max_length, num_layers)
        self.bias, self.batch_first, self.dropout, self.eps, self.momentum = bias, batch_first, dropout, eps, momentum
        factory = {"device": device, "dtype": dtype}
        for k in range(num_layers):
            self._make_layer(f"_l{k}", input_size if k == 0 else hidden_size, hidden_size, max_length, bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for k in range(self.num_layers):
            self._reset_layer(f"_l{k}")

    def forward(self, input: Union[Tensor, PackedSequence], hx: Optional[Tuple[Tensor, Tensor]] = None,
                lengths: Optional[Tensor] = None):
        seq = _SequenceInput(input, lengths, self.batch_first, self.input_size, "BNLSTM")
        h0 = seq.initial_state(None if hx is None else hx[0], self.num_layers, self.hidden_size, "BNLSTM")
        c0 = seq.initial_state(None if hx is None else hx[1], self.num_layers, self.hidden_size, "BNLSTM")
        x, h_n, c_n = seq.data, [], []
        for k in range(self.num_layers):
            if k > 0 and self.dropout > 0 and self.training:
                x = torch.nn.functional.dropout(x, self.dropout, True)
            x, (h, c) = self._run_layer(f"_l{k}", x, h0[k], c0[k], seq.lengths, 0)
            h_n.append(h)
            c_n.append(c)
        return seq.output(x), (torch.stack(h_n), torch.stack(c_n))

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, max_length={self.max_length}, num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s


# ------------------------------------------------------------------- BN-RNN --

class SequenceBatchNorm1d(torch.nn.BatchNorm1d):
    """Sequence-wise BatchNorm of BN-RNNs (Laurent et al. 2015): statistics over
    batch and time together of a ``(T, N, C)`` input (``(N, T, C)`` with
    ``batch_first``). ``forward(x, lengths=None)``: padded positions (``t >=
    lengths[n]``) take no part and output 0. Without padding it equals
    torch.nn.BatchNorm1d on the ``(T*N, C)`` reshape, running statistics
    included; its parameters, buffers and state_dict are BatchNorm1d's.
    Arguments: BatchNorm1d's first four, ``batch_first``, then torch.nn's
    ``track_running_stats``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 batch_first: bool = False, track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.batch_first = batch_first

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 3:
            layout = "(N, T, C)" if self.batch_first else "(T, N, C)"
            raise ValueError(f"SequenceBatchNorm1d expects a 3-d {layout} input, got shape {tuple(input.shape)}")

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(x)
        call = _BatchNormCall(self)
        out = F.sequence_batch_norm(x, call.running_mean, call.running_var, self.weight, self.bias,
                                    call.use_batch_stats, call.momentum, self.eps, lengths, self.batch_first)
        call.count_batch()
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + (", batch_first=True" if self.batch_first else "")


_GATES = {"lstm": 4, "gru": 3, "tanh": 1}


def _rnn_step(mode: str, gx: Tensor, h: Tensor, c: Optional[Tensor], weight_hh: Tensor,
              bias_hh: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """One step of torch.nn.LSTM / GRU / RNN(tanh) from its input term ``gx``
    (here the normalized input projection plus bias_ih), in torch.nn's gate
    order and formulas."""
    gh = torch.nn.functional.linear(h, weight_hh, bias_hh)
    if mode == "lstm":
        i, f, g, o = (gx + gh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "gru":
        xr, xz, xn = gx.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    return torch.tanh(gx + gh), None


class BNRNN(torch.nn.Module):
    """Batch-normalized RNN (Laurent et al. 2015): BatchNorm on the input-to-hidden
    term only, sequence-wise (statistics over batch and time, padding
    excluded)::

        h_t = cell(BN(W_ih x_t) + b_ih, h_{t-1})       (the cell of torch.nn.LSTM, GRU or RNN)

    ``mode`` is ``"lstm"``, ``"gru"`` or ``"tanh"``. Parameters per layer are
    torch.nn's (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
    ``bias_hh_l{k}``; ``b_ih`` is the BN's shift) plus the BN's scale
    ``bn_weight_l{k}`` and running statistics ``bn_running_mean_l{k}``,
    ``bn_running_var_l{k}``. BN on the hidden-to-hidden term did not help in
    the paper and is not used. The input projection of all steps is one
    matrix product and one masked BN kernel (``torchnorm::masked_batch_norm``);
    the recurrence runs torch's ops step by step.

    ``forward(input, hx=None, lengths=None)`` follows torch.nn.LSTM (mode
    "lstm": returns ``(output, (h_n, c_n))``) or torch.nn.GRU / RNN (returns
    ``(output, h_n)``); input may be a PackedSequence, or padded with
    ``lengths``.
    """

    def __init__(self, input_size: int, hidden_size: int, mode: str = "lstm", num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, eps: float = 1e-5, momentum: float = 0.1, device=None,
                 dtype=None) -> None:
        super().__init__()
        if mode not in _GATES:
            raise ValueError(f"mode must be one of {tuple(_GATES)}, got {mode!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.input_size, self.hidden_size, self.mode, self.num_layers = input_size, hidden_size, mode, num_layers
        self.bias, self.batch_first, self.eps, self.momentum = bias, batch_first, eps, momentum
        factory = {"device": device, "dtype": dtype}
        gates = _GATES[mode] * hidden_size
        for k in range(num_layers):
            param = lambda *shape: torch.nn.Parameter(torch.empty(*shape, **factory))  # noqa: E731
            self.register_parameter(f"weight_ih_l{k}", param(gates, input_size if k == 0 else hidden_size))
            self.register_parameter(f"weight_hh_l{k}", param(gates, hidden_size))
            self.register_parameter(f"bias_ih_l{k}", param(gates) if bias else None)
            self.register_parameter(f"bias_hh_l{k}", param(gates) if bias else None)
            self.register_parameter(f"bn_weight_l{k}", param(gates))
            self.register_buffer(f"bn_running_mean_l{k}", torch.zeros(gates, **factory))
            self.register_buffer(f"bn_running_var_l{k}", torch.ones(gates, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for k in range(self.num_layers):
            _uniform_([p for p in (getattr(self, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih",
                                                                          "bias_hh")) if p is not None],
                      self.hidden_size)
            torch.nn.init.constant_(getattr(self, f"bn_weight_l{k}"), BN_WEIGHT_INIT)
            getattr(self, f"bn_running_mean_l{k}").zero_()
            getattr(self, f"bn_running_var_l{k}").fill_(1)

    def _layer(self, k: int, x: Tensor, h: Tensor, c: Optional[Tensor], lengths: Optional[Tensor]):
        g = lambda name: getattr(self, f"{name}_l{k}")  # noqa: E731
        gx = F.sequence_batch_norm(torch.matmul(x, g("weight_ih").t()), g("bn_running_mean"), g("bn_running_var"),
                                   g("bn_weight"), g("bias_ih"), self.training, self.momentum, self.eps, lengths)
        valid = F.valid_steps(lengths, x.shape[0], x.shape[1], x.device)
        outputs = []
        for t in range(x.shape[0]):
            h_new, c_new = _rnn_step(self.mode, gx[t], h, c, g("weight_hh"), g("bias_hh"))
            if valid is None:
                h, c = h_new, c_new
                outputs.append(h_new)
                continue
            keep = valid[t].unsqueeze(1)  # an ended sequence keeps its state and outputs 0
            h = torch.where(keep, h_new, h)
            c = None if c is None else torch.where(keep, c_new, c)
            outputs.append(torch.where(keep, h_new, torch.zeros_like(h_new)))
        out = torch.stack(outputs) if outputs else x.new_zeros(0, x.shape[1], self.hidden_size)
        return out, h, c

    def forward(self, input: Union[Tensor, PackedSequence], hx=None, lengths: Optional[Tensor] = None):
        seq = _SequenceInput(input, lengths, self.batch_first, self.input_size, "BNRNN")
        lstm = self.mode == "lstm"
        h0 = seq.initial_state(hx[0] if lstm and hx is not None else hx, self.num_layers, self.hidden_size, "BNRNN")
        c0 = seq.initial_state(hx[1] if lstm and hx is not None else None, self.num_layers, self.hidden_size,
                               "BNRNN") if lstm else None
        x, h_n, c_n = seq.data, [], []
        for k in range(self.num_layers):
            x, h, c = self._layer(k, x, h0[k], None if c0 is None else c0[k], seq.lengths)
            h_n.append(h)
            c_n.append(c)
        state = (torch.stack(h_n), torch.stack(c_n)) if lstm else torch.stack(h_n)
        return seq.output(x), state

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, mode={self.mode!r}, num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        return s
