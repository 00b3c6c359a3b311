"""Conv + BatchNorm (+ residual) (+ activation) as one block that trains with less memory.

Unfused, ``act(BN(conv(x)) + residual)`` keeps two activation-sized tensors
per block for backward: the conv output (BatchNorm's input) and the block
output (the activation's result, which the next layer keeps too). These
blocks keep about one, chosen per mode (the conv may be a ConvTranspose:
everything below holds for it too):

* **BatchNorm in eval mode (frozen statistics, fine-tuning).** The statistics
  are constants, so the BatchNorm is a per-channel scale and shift of the
  conv output (``g / sqrt(var + eps)`` and ``(b - mean) * g / sqrt(var +
  eps) + beta``), computed by one op, ``torchnorm::conv_bn_frozen``, with
  gradients for the conv weight, the BN weight and the BN bias. It folds the
  scale into the conv weight on every forward (on the CPU, where a layer's
  output is smaller than its weight, as in a ResNet's last stages at small
  batches, it scales the output instead: fewer bytes). Backward keeps only
  the conv input, never the conv output nor a folded weight. SiLU keeps its
  input too (its derivative needs it); ReLU and leaky ReLU run in place and
  keep only their output.
* **Convs with forward hooks, or autocast**, take the plain path (the conv
  module is called, then the fused BatchNorm op): correct, with the saving
  of the no-residual training block only.
* **BatchNorm in training mode, no residual.** The conv runs, then one fused
  kernel computes the batch statistics and writes normalize + affine +
  activation. Backward keeps the pre-norm conv output, as BatchNorm must. The
  block output ``y`` need not be kept: with ``return_recipe=True`` the block
  also returns its *recipe* ``(pre_norm, mean, rstd, weight, bias,
  activation, negative_slope)``, and a next block given it as
  ``input_recipe`` runs its conv through an op that keeps the recipe instead
  of ``y`` (``torchnorm::conv_rebuilt_input``, or
  ``torchnorm::conv_bn_train_rebuilt`` with a residual, which takes the
  residual's recipe too where the residual is such an output; see
  torchnorm/_rebuild_ops.py) and rebuilds ``y`` in backward with one
  element-wise pass, ``batch_norm_apply`` (memory-efficient DenseNet's
  choice, at op level). :func:`torchnorm.fx.fuse_conv_bn` wires the recipes
  between the blocks it makes. We rebuild rather than invert the output as
  In-Place ABN does, because ReLU and SiLU (what real models use) cannot be
  inverted, and inverting leaky_relu divides by the BN weight, losing
  precision where it is small.
* **BatchNorm in training mode with a residual** (the ResNet tail
  ``act(BN(conv(x)) + identity)``). Here the block output is the next
  block's input *and* identity, and rebuilding it would need the identity,
  which is the previous block's output: rebuilds would chain through the
  whole stage. So the output is kept and the conv output is dropped instead:
  one op, ``torchnorm::conv_bn_train`` (csrc/conv_bn.cpp), runs the conv and
  the fused kernel, and its backward recomputes the conv from its kept input
  (or, given an ``input_recipe``, from the input rebuilt). The tail conv of a bottleneck is a cheap 1x1, so this
  costs little time. (The op is C++: as a Python autograd.Function with a
  nested autograd call for the conv's gradients, a narrow ResNet-50's
  training step, where per-layer overhead dominates, took 1.34x torch.nn's
  time on the CPU instead of 1.24x.)

Running statistics are updated exactly as torch.nn does (the same op as
:class:`torchnorm.nn.BatchNorm2d`). Everything a block keeps is saved through
ordinary autograd ``save_for_backward``: no saved-tensor hooks, so the user's
own (``save_on_cpu``, checkpointing) apply to it, and torch.compile traces it.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import functional as F
from .batch_norm import _BatchNormCall

__all__ = ["ConvBN1d", "ConvBN2d", "ConvBN3d", "ConvTransposeBN1d", "ConvTransposeBN2d", "ConvTransposeBN3d",
           "conv_bn_forward", "conv_forward"]

# A block output's recipe: (pre_norm, batch mean, batch rstd, BN weight, BN
# bias, activation, negative_slope), the arguments batch_norm_apply rebuilds it
# from (a plain tuple, which torch.fx and torch.compile pass through).
Recipe = Tuple
# The recipe arguments of a tensor kept as it is.
_NO_RECIPE = (None, None, None, None, None, "none", 0.0)


def _activate(z: Tensor, activation: str, negative_slope: float, inplace: bool = False) -> Tensor:
    """The activation on a tensor; with ``inplace``, over ``z`` itself where
    that lets autograd keep the output instead of the input (ReLU keeps its
    output either way; SiLU's derivative needs its input)."""
    if activation == "relu":
        return torch.relu_(z) if inplace else torch.relu(z)
    if activation == "leaky_relu":
        # In place, torch's backward reads the output's sign: slope >= 0 only.
        return torch.nn.functional.leaky_relu(z, negative_slope, inplace=inplace and negative_slope >= 0)
    if activation == "silu":
        return torch.nn.functional.silu(z)
    return z


def _conv_op_args(conv: torch.nn.Module, input: Tensor, output_size=None) -> tuple:
    """``(input, stride, padding, dilation, groups, transposed,
    output_padding)`` for the torchnorm conv ops, which take explicit zero
    padding only. Other padding (a padding mode other than zeros, or
    ``padding="same"`` that differs between the two sides) is applied to the
    input first, as torch.nn's conv does. A transposed conv has zero padding
    only; its output padding comes from ``output_size`` where one is given,
    as in its forward."""
    if _is_transposed(conv):
        output_padding = conv.output_padding
        if output_size is not None:
            spatial = conv.weight.dim() - 2
            output_padding = tuple(conv._output_padding(input, output_size, conv.stride, conv.padding,
                                                         conv.kernel_size, spatial, conv.dilation))
        return input, conv.stride, conv.padding, conv.dilation, conv.groups, True, output_padding
    padding = conv.padding
    if conv.padding_mode != "zeros" or isinstance(padding, str):
        pads = conv._reversed_padding_repeated_twice
        if conv.padding_mode == "zeros" and pads[0::2] == pads[1::2]:
            padding = tuple(reversed(pads[0::2]))  # "same" or "valid", even on both sides
        else:
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            input = torch.nn.functional.pad(input, pads, mode=mode)
            padding = (0,) * len(conv.kernel_size)
    return input, conv.stride, padding, conv.dilation, conv.groups, False, ()


def _frozen_conv_bn(conv: torch.nn.Module, bn: torch.nn.Module, input: Tensor, output_size=None) -> Tensor:
    """``bn(conv(input))`` with ``bn``'s statistics frozen, by the
    ``torchnorm::conv_bn_frozen`` op (csrc/conv_bn.cpp), which keeps only the
    conv input for backward."""
    input, *conv_args = _conv_op_args(conv, input, output_size)
    return torch.ops.torchnorm.conv_bn_frozen(input, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                              bn.running_var, bn.eps, *conv_args)


def _is_transposed(conv: torch.nn.Module) -> bool:
    return isinstance(conv, torch.nn.modules.conv._ConvTransposeNd)


def conv_bn_forward(conv: torch.nn.Module, bn: torch.nn.Module, input: Tensor, activation: Optional[str] = None,
                    negative_slope: float = 0.01, residual: Optional[Tensor] = None, output_size=None,
                    input_recipe: Optional[Recipe] = None, return_recipe: bool = False,
                    residual_recipe: Optional[Recipe] = None):
    """``act(bn(conv(input)) + residual)`` with the memory-saving strategy of
    ``bn``'s mode (see the module docstring). ``conv`` is a Conv1d/2d/3d or
    ConvTranspose1d/2d/3d and ``bn`` a BatchNorm of its output channels; both
    keep their parameters and buffers, and ``bn``'s running statistics update
    as torch.nn's would. ``output_size`` is a ConvTranspose's, as in its
    forward (it sets the output padding).

    ``input_recipe``: when ``input`` is the output of an earlier block called
    with ``return_recipe=True``, that block's recipe; the conv then keeps
    the recipe instead of ``input`` where it can (the input must not have
    been changed since that block made it); ``residual_recipe`` likewise for
    ``residual``. With ``return_recipe`` the result is ``(output, recipe)``,
    the recipe being None unless this block trains without a residual."""
    if output_size is not None and not _is_transposed(conv):
        raise TypeError(f"conv_bn_forward: output_size applies to ConvTranspose only, got a {type(conv).__name__}")
    activation = F._activation_name(activation)
    out, recipe = _forward(conv, bn, input, activation, negative_slope, residual, output_size, input_recipe,
                           residual_recipe)
    return (out, recipe) if return_recipe else out


def _forward(conv, bn, input, activation, negative_slope, residual, output_size, input_recipe, residual_recipe):
    """conv_bn_forward's (output, recipe or None)."""
    if getattr(bn, "synchronizes", None) is not None and bn.synchronizes():
        # A SyncBatchNorm exchanging statistics with other ranks: the conv
        # runs on its own and the SyncBatchNorm normalizes its output (none of
        # the memory savings below, which need the statistics in one op).
        return bn.normalize(_call(conv, input, output_size), residual, activation, negative_slope), None
    call = _BatchNormCall(bn)
    if call.use_batch_stats:
        if residual is not None and _may_bypass_conv_call(conv, input):
            # The torchnorm::conv_bn_train op keeps the conv input (or its
            # recipe) and recomputes the conv in backward (see the module
            # docstring). A recipe describes `input`, not a padded copy.
            conv_input, *conv_args = _conv_op_args(conv, input, output_size)
            in_recipe = input_recipe if conv_input is input else None
            if in_recipe is not None or residual_recipe is not None:
                out, _, _, new_mean, new_var = torch.ops.torchnorm.conv_bn_train_rebuilt(
                    conv_input, *(in_recipe or _NO_RECIPE), conv.weight, conv.bias, bn.weight, bn.bias,
                    call.running_mean, call.running_var, call.momentum, bn.eps, activation, negative_slope,
                    residual, *(residual_recipe or _NO_RECIPE), *conv_args)
                # The op is functional (see torchnorm/_rebuild_ops.py).
                with torch.no_grad():
                    for running, new in ((call.running_mean, new_mean), (call.running_var, new_var)):
                        if running is not None:
                            running.copy_(new)
            else:
                out, _, _ = torch.ops.torchnorm.conv_bn_train(
                    conv_input, conv.weight, conv.bias, bn.weight, bn.bias, call.running_mean, call.running_var,
                    call.momentum, bn.eps, activation, negative_slope, residual, *conv_args)
            call.count_batch()
            return out, None
        pre_norm = conv_forward(conv, input, output_size, input_recipe)
        out, mean, rstd = torch.ops.torchnorm.batch_norm_train.default(
            pre_norm, bn.weight, bn.bias, call.running_mean, call.running_var, call.momentum, bn.eps, activation,
            negative_slope, residual)
        call.count_batch()
        if residual is not None:
            return out, None
        return out, (pre_norm, mean, rstd, bn.weight, bn.bias, activation, negative_slope)
    if not _may_bypass_conv_call(conv, input):
        return F.batch_norm(_call(conv, input, output_size), call.running_mean, call.running_var, bn.weight, bn.bias,
                            False, 0.0, bn.eps, activation, negative_slope, residual), None
    z = _frozen_conv_bn(conv, bn, input, output_size)
    if residual is not None:
        # In place where that gives the same tensor as z + residual: z is a
        # fresh output that nothing keeps for backward.
        # (Compares dtypes, not torch.result_type's: torch.compile would
        # break the graph on a function that returns a dtype. Shapes are
        # compared first: torch.broadcast_shapes costs 0.1 ms of Python.)
        same = residual.dtype == z.dtype and (
            residual.shape == z.shape or torch.broadcast_shapes(z.shape, residual.shape) == z.shape)
        z = z.add_(residual) if same else z + residual
    return _activate(z, activation, negative_slope, inplace=True), None


def conv_forward(conv: torch.nn.Module, input: Tensor, output_size=None,
                 input_recipe: Optional[Recipe] = None) -> Tensor:
    """``conv(input)`` for a Conv or ConvTranspose module; given the recipe of
    ``input`` (an earlier block's, see :func:`conv_bn_forward`), through
    ``torchnorm::conv_rebuilt_input``, which keeps the recipe instead of
    ``input``, where the conv's arithmetic may bypass the module call and
    needs no padded copy of the input."""
    if input_recipe is not None and _may_bypass_conv_call(conv, input):
        conv_input, *conv_args = _conv_op_args(conv, input, output_size)
        if conv_input is input:
            return torch.ops.torchnorm.conv_rebuilt_input(input, *input_recipe, conv.weight, conv.bias, *conv_args)
    return _call(conv, input, output_size)


def _call(conv: torch.nn.Module, input: Tensor, output_size) -> Tensor:
    """``conv(input)``, with the ConvTranspose's ``output_size`` where given."""
    return conv(input) if output_size is None else conv(input, output_size)


def _may_bypass_conv_call(conv: torch.nn.Module, input: Tensor) -> bool:
    """Whether the conv ops (conv_bn_train, conv_bn_frozen) may run the
    conv's arithmetic themselves instead of calling the module: not when it
    has forward hooks (pruning, for one, sets the weight in a pre-hook) and
    not under autocast (their backward would run the conv in another dtype)."""
    from torch.nn.modules import module as nn_module
    hooks = (conv._forward_hooks, conv._forward_pre_hooks, nn_module._global_forward_hooks,
             nn_module._global_forward_pre_hooks)
    return not any(hooks) and not torch.is_autocast_enabled(input.device.type)


class _ConvBNNd(torch.nn.Module):
    """``act(BN(conv(x)) + residual)`` with submodules ``conv`` and ``bn``."""

    _conv_class: type
    _bn_class: type

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 activation: Optional[str] = None, negative_slope: float = 0.01, device=None, dtype=None) -> None:
        super().__init__()
        self._build(dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                         padding=padding, dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode),
                    eps, momentum, affine, track_running_stats, activation, negative_slope, device, dtype)

    def _build(self, conv_args: dict, eps, momentum, affine, track_running_stats, activation, negative_slope,
               device, dtype) -> None:
        F._activation_name(activation)  # reject unknown names at construction
        factory = {"device": device, "dtype": dtype}
        self.conv = self._conv_class(**conv_args, **factory)
        self.bn = self._bn_class(conv_args["out_channels"], eps, momentum, affine, track_running_stats, **factory)
        self.activation = activation
        self.negative_slope = negative_slope

    @classmethod
    def from_modules(cls, conv: torch.nn.Module, bn: torch.nn.Module, activation: Optional[str] = None,
                     negative_slope: float = 0.01) -> "_ConvBNNd":
        """A block that shares (does not copy) ``conv`` and ``bn``."""
        if type(conv) is not cls._conv_class:
            raise TypeError(f"{cls.__name__}.from_modules: expected a {cls._conv_class.__name__}, got "
                            f"{type(conv).__name__}")
        if (not isinstance(bn, cls._bn_class) or isinstance(bn, torch.nn.SyncBatchNorm)
                or bn.num_features != conv.out_channels):
            raise ValueError(f"{cls.__name__}.from_modules: expected a {cls._bn_class.__name__} of "
                             f"{conv.out_channels} features (not SyncBatchNorm), got {bn!r}")
        F._activation_name(activation)
        block = cls.__new__(cls)
        torch.nn.Module.__init__(block)
        block.conv, block.bn = conv, bn
        block.activation, block.negative_slope = activation, negative_slope
        return block

    def forward(self, input: Tensor, residual: Optional[Tensor] = None,
                input_recipe: Optional[Recipe] = None) -> Tensor:
        """``input_recipe``: see :func:`conv_bn_forward`."""
        return conv_bn_forward(self.conv, self.bn, input, self.activation, self.negative_slope, residual,
                               input_recipe=input_recipe)

    def extra_repr(self) -> str:
        extra = f"activation={self.activation!r}"
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        return extra


class ConvBN1d(_ConvBNNd):
    """Conv1d + BatchNorm1d (+ residual) (+ activation); arguments of both, plus
    ``activation`` (None, ``"relu"``, ``"leaky_relu"``, ``"silu"``) and
    ``negative_slope``. state_dict keys are ``conv.*`` and ``bn.*``."""

    _conv_class = torch.nn.Conv1d
    _bn_class = torch.nn.BatchNorm1d


class ConvBN2d(_ConvBNNd):
    """Conv2d + BatchNorm2d (+ residual) (+ activation); see :class:`ConvBN1d`."""

    _conv_class = torch.nn.Conv2d
    _bn_class = torch.nn.BatchNorm2d


class ConvBN3d(_ConvBNNd):
    """Conv3d + BatchNorm3d (+ residual) (+ activation); see :class:`ConvBN1d`."""

    _conv_class = torch.nn.Conv3d
    _bn_class = torch.nn.BatchNorm3d


class _ConvTransposeBNNd(_ConvBNNd):
    """``act(BN(conv_transpose(x)) + residual)``; the transposed conv's
    arguments in its order (``output_padding`` after ``padding``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = False, dilation=1, padding_mode: str = "zeros", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 activation: Optional[str] = None, negative_slope: float = 0.01, device=None, dtype=None) -> None:
        torch.nn.Module.__init__(self)  # not _ConvBNNd's: its conv arguments differ
        self._build(dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                         padding=padding, output_padding=output_padding, groups=groups, bias=bias, dilation=dilation,
                         padding_mode=padding_mode),
                    eps, momentum, affine, track_running_stats, activation, negative_slope, device, dtype)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None, output_size=None,
                input_recipe: Optional[Recipe] = None) -> Tensor:
        return conv_bn_forward(self.conv, self.bn, input, self.activation, self.negative_slope, residual,
                               output_size, input_recipe)


class ConvTransposeBN1d(_ConvTransposeBNNd):
    """ConvTranspose1d + BatchNorm1d (+ residual) (+ activation), as in a
    generator's or decoder's upsampling path; see :class:`ConvBN1d`. Its
    forward takes ``output_size`` as ConvTranspose1d's does."""

    _conv_class = torch.nn.ConvTranspose1d
    _bn_class = torch.nn.BatchNorm1d


class ConvTransposeBN2d(_ConvTransposeBNNd):
    """ConvTranspose2d + BatchNorm2d (+ residual) (+ activation); see :class:`ConvTransposeBN1d`."""

    _conv_class = torch.nn.ConvTranspose2d
    _bn_class = torch.nn.BatchNorm2d


class ConvTransposeBN3d(_ConvTransposeBNNd):
    """ConvTranspose3d + BatchNorm3d (+ residual) (+ activation); see :class:`ConvTransposeBN1d`."""

    _conv_class = torch.nn.ConvTranspose3d
    _bn_class = torch.nn.BatchNorm3d
