"""Every torchnorm op's samples for torch.library.opcheck, in one registry.

tests/test_opcheck.py runs opcheck on each sample and fails when an operator
the library registers (every `torchnorm::` schema, backward and internal ops
included) has none. A sample is (op name, sample id, args): the op name as
registered, without the namespace; the args as the op takes them, tensors
requiring grad where autograd should be checked too.

SOURCES lists where the samples come from: functions returning a list of
samples, built fresh for each test (opcheck calls the ops several times, and
some ops update running statistics in place). A source built for one device
runs on the CPU only; `on_every_device` ones take the device and run on every
device in DEVICES. To add the samples of new ops, append a SampleSource:
    SOURCES.append(SampleSource(my_op_samples))
"""
import dataclasses
from typing import Callable

import torch

import torchnorm  # noqa: F401  (registers the ops)
from conftest import (
    ACTIVATIONS,
    DEVICES,
    NEGATIVE_SLOPE,
    batch_norm_inputs,
    group_norm_inputs,
    instance_norm_inputs,
    make_input,
    make_params,
    randn,
    row_norm_inputs,
)
from test_conv_bn_internal_ops import WEIGHT_CASES, _vector, _weight
from test_sequence_references import NAMES as LSTM_PARAM_NAMES
from test_sequence_references import lstm_case

OPS = torch.ops.torchnorm
EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class SampleSource:
    """A function returning [(op name, sample id, args), ...]: build() on the
    CPU, or build(device) for each device when on_every_device."""

    build: Callable[..., list]
    on_every_device: bool = False

    @property
    def devices(self):
        """The DEVICES params its samples run on."""
        return DEVICES if self.on_every_device else [d for d in DEVICES if d.values == ("cpu",)]

    def samples(self, device="cpu"):
        return self.build(device) if self.on_every_device else self.build()


def op_overload(op_name):
    """The OpOverload of a registered op name ("batch_norm_train",
    "torchnorm::batch_norm_train" or "name.overload")."""
    name = op_name.split("::", 1)[-1]
    name, _, overload = name.partition(".")
    return getattr(getattr(OPS, name), overload or "default")


# ---------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------


def batch_norm_samples():
    """batch_norm_train, batch_norm_eval and batch_norm_backward: training with and without running stats,
    eval, every activation, residual, dtypes and layouts, requires_grad or not."""
    samples = []

    def inputs(shape, dtype, pdtype, layout, seed, affine=True, track=True, residual=False, grad=True):
        x, w, b, rm, rv, res, gy = batch_norm_inputs(shape, layout, dtype, pdtype, "cpu", affine, track, residual, seed=seed)
        x, w, b, res = (None if t is None else t.detach().requires_grad_(grad) for t in (x, w, b, res))
        return x, w, b, rm, rv, res, gy

    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
    # batch_norm_train
    x, w, b, rm, rv, res, _ = inputs((4, 3, 5, 5), f32, f32, "contiguous", 1)
    samples.append(("batch_norm_train", "train-4d-relu-stats", (x, w, b, rm, rv, 0.1, EPS, "relu", 0.0, None)))
    x, w, b, rm, rv, res, _ = inputs((2, 4, 3, 3), f32, f32, "channels_last", 2, track=False, residual=True)
    samples.append(("batch_norm_train", "train-cl-silu-res-nostats", (x, w, b, None, None, 0.1, EPS, "silu", 0.0, res)))
    x, w, b, rm, rv, res, _ = inputs((5, 3), f64, f64, "contiguous", 3, affine=False)
    samples.append(("batch_norm_train", "train-2d-f64-leaky-noaffine", (x, None, None, rm, rv, 0.3, 1e-3, "leaky_relu", 0.2, None)))
    x, w, b, rm, rv, res, _ = inputs((3, 2, 4), f16, f32, "contiguous", 4, residual=True)
    samples.append(("batch_norm_train", "train-3d-f16-f32params", (x, w, b, rm, rv, 0.1, EPS, "none", 0.0, res)))
    x, w, b, rm, rv, res, _ = inputs((2, 3, 2, 2, 3), bf16, bf16, "channels_last_3d", 5, residual=True, grad=False)
    samples.append(("batch_norm_train", "train-5d-bf16-nograd", (x, w, b, rm, rv, 0.1, EPS, "relu", 0.0, res)))
    # batch_norm_eval
    x, w, b, rm, rv, res, _ = inputs((4, 3, 5, 5), f32, f32, "contiguous", 6)
    samples.append(("batch_norm_eval", "eval-4d-none", (x, rm, rv, w, b, EPS, "none", 0.0, None)))
    x, w, b, rm, rv, res, _ = inputs((2, 4, 3, 3), f32, f32, "channels_last", 7, residual=True)
    samples.append(("batch_norm_eval", "eval-cl-relu-res", (x, rm, rv, w, b, EPS, "relu", 0.0, res)))
    x, w, b, rm, rv, res, _ = inputs((6, 2), f64, f64, "contiguous", 8, affine=False, residual=True)
    samples.append(("batch_norm_eval", "eval-2d-f64-silu-noaffine", (x, rm, rv, None, None, 1e-3, "silu", 0.0, res)))
    x, w, b, rm, rv, res, _ = inputs((3, 2, 4), f16, f32, "contiguous", 9)
    samples.append(("batch_norm_eval", "eval-3d-f16-leaky", (x, rm, rv, w, b, EPS, "leaky_relu", 0.2, None)))
    # batch_norm_backward
    x, w, b, rm, rv, res, gy = inputs((4, 3, 5), f32, f32, "contiguous", 10, residual=True, grad=False)
    _, mean, rstd = OPS.batch_norm_train(x, w, b, None, None, 0.1, EPS, "silu", 0.0, res)
    samples.append(("batch_norm_backward", "backward-train-all", (gy, x, w, b, res, mean, rstd, True, "silu", 0.0, [True] * 4)))
    samples.append(("batch_norm_backward", "backward-train-input-only", (gy, x, w, b, res, mean, rstd, True, "silu", 0.0, [True, False, False, False])))
    x, w, b, rm, rv, res, gy = inputs((2, 4, 3, 3), f32, f32, "channels_last", 11, grad=False)
    samples.append(("batch_norm_backward", "backward-eval-cl-params", (gy, x, w, b, None, rm, (rv + EPS).rsqrt(), False, "relu", 0.0, [False, True, True, False])))
    x, w, b, rm, rv, res, gy = inputs((5, 3), f64, f64, "contiguous", 12, affine=False, grad=False)
    _, mean, rstd = OPS.batch_norm_train(x, None, None, None, None, 0.1, EPS, "leaky_relu", 0.2, None)
    samples.append(("batch_norm_backward", "backward-train-f64-noaffine", (gy, x, None, None, None, mean, rstd, True, "leaky_relu", 0.2, [True, False, False, False])))
    x, w, b, rm, rv, res, gy = inputs((3, 2, 4), f16, f32, "contiguous", 13, residual=True, grad=False)
    _, mean, rstd = OPS.batch_norm_train(x, w, b, None, None, 0.1, EPS, "relu", 0.0, res)
    samples.append(("batch_norm_backward", "backward-train-f16", (gy, x, w, b, res, mean, rstd, True, "relu", 0.0, [True] * 4)))
    return samples


def batch_norm_apply_samples():
    """batch_norm_apply with batch_norm_train's own mean / rstd."""
    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
    samples = []
    for sid, shape, layout, dtype, pdtype, activation, affine, residual in [
        ("4d-relu", (4, 3, 5, 5), "contiguous", f32, f32, "relu", True, False),
        ("cl-silu-res", (2, 4, 3, 3), "channels_last", f32, f32, "silu", True, True),
        ("2d-f64-leaky-noaffine", (5, 3), "contiguous", f64, f64, "leaky_relu", False, False),
        ("3d-f16-f32params-res", (3, 2, 4), "contiguous", f16, f32, "none", True, True),
        ("5d-bf16-cl3d", (2, 3, 2, 2, 3), "channels_last_3d", bf16, bf16, "relu", True, True),
    ]:
        x = make_input(shape, dtype, layout=layout, seed=len(samples))
        w, b, _, _ = make_params(shape[1], pdtype, seed=10 + len(samples), affine=affine)
        res = make_input(shape, dtype, layout=layout, seed=20 + len(samples), offset=False) if residual else None
        _, mean, rstd = OPS.batch_norm_train.default(x, w, b, None, None, 0.1, EPS, activation, 0.2, res)
        samples.append(("batch_norm_apply", sid, (x, mean, rstd, w, b, activation, 0.2, res)))
    return samples


# ---------------------------------------------------------------------------
# LayerNorm and RMSNorm
# ---------------------------------------------------------------------------


def row_norm_samples():
    """layer_norm, rms_norm and layer_norm_backward (which serves both)."""
    samples = []
    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16

    def inputs(shape, ns, dtype, pdtype, layout, seed, op="layer_norm", affine="wb", residual="nores", grad=True):
        x, w, b, res, gy, gsum = row_norm_inputs(shape, ns, layout, dtype, pdtype, "cpu", op, affine, residual, seed=seed)
        x, w, b, res = (None if t is None else t.detach().requires_grad_(grad) for t in (x, w, b, res))
        return x, w, b, res, gy, gsum

    x, w, b, res, _, _ = inputs((4, 7), (7,), f32, f32, "contiguous", 1)
    samples.append(("layer_norm", "ln-f32", (x, [7], w, b, EPS, None)))
    x, w, b, res, _, _ = inputs((2, 3, 4, 5), (4, 5), f32, f32, "transposed", 2, affine="none", residual="res")
    samples.append(("layer_norm", "ln-2dims-res-noaffine", (x, [4, 5], None, None, 1e-3, res)))
    x, w, b, res, _, _ = inputs((3, 2, 9), (9,), f16, f32, "contiguous", 3, residual="res")
    samples.append(("layer_norm", "ln-f16-f32params-res", (x, [9], w, b, EPS, res)))
    x, w, b, res, _, _ = inputs((3, 10), (10,), bf16, bf16, "contiguous", 4, affine="w", grad=False)
    samples.append(("layer_norm", "ln-bf16-weight-nograd", (x, [10], w, None, EPS, None)))
    x, w, b, res, _, _ = inputs((5, 6), (6,), f64, f64, "sliced", 5, residual="res")
    samples.append(("layer_norm", "ln-f64-sliced-res", (x, [6], w, b, EPS, res)))
    x, w, b, res, _, _ = inputs((4, 7), (7,), f32, f32, "contiguous", 6, op="rms_norm", affine="w", residual="res")
    samples.append(("rms_norm", "rms-f32-res", (x, [7], w, 1e-6, res)))
    x, w, b, res, _, _ = inputs((3, 2, 9), (2, 9), f16, f16, "contiguous", 7, op="rms_norm", affine="none")
    samples.append(("rms_norm", "rms-f16-2dims-noweight", (x, [2, 9], None, 1e-3, None)))
    x, w, b, res, _, _ = inputs((5, 6), (6,), f64, f64, "transposed", 8, op="rms_norm", affine="w", grad=False)
    samples.append(("rms_norm", "rms-f64-transposed-nograd", (x, [6], w, 1e-3, None)))
    # layer_norm_backward
    x, w, b, res, gy, gsum = inputs((4, 3, 7), (7,), f32, f32, "contiguous", 9, residual="res-gsum", grad=False)
    _, s, mean, rstd = OPS.layer_norm(x, [7], w, b, EPS, res)
    samples.append(("layer_norm_backward", "ln-backward-all-gsum", (gy, gsum, s, [7], mean, rstd, w, [True] * 3)))
    samples.append(("layer_norm_backward", "ln-backward-input-only", (gy, None, s, [7], mean, rstd, w, [True, False, False])))
    samples.append(("layer_norm_backward", "ln-backward-params-only", (gy, None, s, [7], mean, rstd, w, [False, True, True])))
    x, w, b, res, gy, gsum = inputs((3, 2, 5), (2, 5), f16, f32, "contiguous", 10, op="rms_norm", affine="w", grad=False)
    _, _, rstd = OPS.rms_norm(x, [2, 5], w, EPS, None)
    samples.append(("layer_norm_backward", "rms-backward-f16", (gy, None, x, [2, 5], None, rstd, w, [True, True, False])))
    x, w, b, res, gy, gsum = inputs((6, 4), (4,), f64, f64, "contiguous", 11, affine="none", residual="res-gsum", grad=False)
    _, _, mean, rstd = OPS.layer_norm(x, [4], None, None, EPS, None)
    samples.append(("layer_norm_backward", "ln-backward-f64-noaffine", (gy, gsum, x, [4], mean, rstd, None, [True, False, False])))
    return samples


# ---------------------------------------------------------------------------
# GroupNorm
# ---------------------------------------------------------------------------


def group_norm_samples():
    """group_norm and group_norm_backward."""
    samples = []
    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16

    def inputs(shape, dtype, pdtype, layout, seed, affine="wb", grad=True):
        x, w, b, gy = group_norm_inputs(shape, layout, dtype, pdtype, "cpu", affine, seed=seed)
        x, w, b = (None if t is None else t.detach().requires_grad_(grad) for t in (x, w, b))
        return x, w, b, gy

    x, w, b, _ = inputs((4, 6, 5, 5), f32, f32, "contiguous", 1)
    samples.append(("group_norm", "gn-4d-relu", (x, 3, w, b, EPS, "relu", 0.0)))
    x, w, b, _ = inputs((2, 4, 3, 3), f32, f32, "channels_last", 2)
    samples.append(("group_norm", "gn-cl-silu", (x, 2, w, b, EPS, "silu", 0.0)))
    x, w, b, _ = inputs((5, 6), f64, f64, "contiguous", 3, affine="none")
    samples.append(("group_norm", "gn-2d-f64-leaky-noaffine", (x, 6, None, None, 1e-3, "leaky_relu", 0.2)))
    x, w, b, _ = inputs((3, 4, 7), f16, f32, "transposed", 4)
    samples.append(("group_norm", "gn-3d-f16-f32params-transposed", (x, 1, w, b, EPS, "none", 0.0)))
    x, w, b, _ = inputs((2, 4, 2, 2, 3), bf16, bf16, "channels_last_3d", 5, grad=False)
    samples.append(("group_norm", "gn-5d-bf16-nograd", (x, 2, w, b, EPS, "relu", 0.0)))
    x, w, b, gy = inputs((4, 6, 5), f32, f32, "contiguous", 6, grad=False)
    _, mean, rstd = OPS.group_norm(x, 3, w, b, EPS, "silu", 0.0)
    samples.append(("group_norm_backward", "gn-backward-all", (gy, x, 3, mean, rstd, w, b, "silu", 0.0, [True] * 3)))
    samples.append(("group_norm_backward", "gn-backward-input-only", (gy, x, 3, mean, rstd, w, b, "silu", 0.0, [True, False, False])))
    x, w, b, gy = inputs((2, 4, 3, 3), f32, f32, "channels_last", 7, grad=False)
    _, mean, rstd = OPS.group_norm(x, 4, w, b, EPS, "relu", 0.0)
    samples.append(("group_norm_backward", "gn-backward-cl-params", (gy, x, 4, mean, rstd, w, b, "relu", 0.0, [False, True, True])))
    x, w, b, gy = inputs((3, 4, 5), f16, f32, "contiguous", 8, grad=False)
    _, mean, rstd = OPS.group_norm(x, 2, w, b, EPS, "leaky_relu", 0.2)
    samples.append(("group_norm_backward", "gn-backward-f16", (gy, x, 2, mean, rstd, w, b, "leaky_relu", 0.2, [True] * 3)))
    x, w, b, gy = inputs((5, 6), f64, f64, "contiguous", 9, affine="none", grad=False)
    _, mean, rstd = OPS.group_norm(x, 3, None, None, EPS, "none", 0.0)
    samples.append(("group_norm_backward", "gn-backward-f64-noaffine", (gy, x, 3, mean, rstd, None, None, "none", 0.0, [True, False, False])))
    return samples


# ---------------------------------------------------------------------------
# InstanceNorm
# ---------------------------------------------------------------------------


def instance_norm_samples():
    """instance_norm (its gradients come from group_norm_backward, sampled above)."""
    samples = []
    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16

    def inputs(shape, dtype, pdtype, layout, seed, affine="wb", track=True, grad=True):
        x, w, b, rm, rv, _ = instance_norm_inputs(shape, layout, dtype, pdtype, "cpu", affine, track, seed=seed)
        x, w, b = (None if t is None else t.detach().requires_grad_(grad) for t in (x, w, b))
        return x, w, b, rm, rv

    x, w, b, rm, rv = inputs((4, 3, 5, 5), f32, f32, "contiguous", 1)
    samples.append(("instance_norm", "in-4d-stats", (x, w, b, rm, rv, 0.1, EPS)))
    x, w, b, rm, rv = inputs((2, 4, 3, 3), f32, f32, "channels_last", 2, track=False)
    samples.append(("instance_norm", "in-cl-nostats", (x, w, b, None, None, 0.1, EPS)))
    x, w, b, rm, rv = inputs((3, 2, 7), f64, f64, "transposed", 3, affine="none")
    samples.append(("instance_norm", "in-3d-f64-noaffine-transposed", (x, None, None, rm, rv, 0.3, 1e-3)))
    x, w, b, rm, rv = inputs((3, 2, 4), f16, f32, "contiguous", 4)
    samples.append(("instance_norm", "in-3d-f16-f32params", (x, w, b, rm, rv, 0.1, EPS)))
    x, w, b, rm, rv = inputs((2, 3, 2, 2, 3), bf16, bf16, "channels_last_3d", 5, grad=False)
    samples.append(("instance_norm", "in-5d-bf16-nograd", (x, w, b, rm, rv, 0.1, EPS)))
    return samples


# ---------------------------------------------------------------------------
# Conv + BatchNorm (the CPU cases, moved to each device with the tensors that
# autograd should see requiring grad)
# ---------------------------------------------------------------------------


def _conv_bn_frozen_cases():
    """(id, conv_bn_frozen args) on the CPU, no tensor requiring grad: the
    convolutions that conv_bn_frozen, conv_bn_train and their backward ops
    are checked on."""
    f32, f64 = torch.float32, torch.float64
    samples = []
    # (id, input shape, weight shape, stride, padding, dilation, groups, layout, dtype, conv bias, bn affine,
    # output padding: None for a conv, else a transposed conv's)
    for sid, shape, wshape, stride, padding, dilation, groups, layout, dtype, bias, affine, output_padding in [
        ("2d-fold", (2, 4, 6, 5), (6, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1, "contiguous", f64, True, True, None),
        ("2d-scaled-output", (2, 4, 5, 5), (6, 4, 3, 3), (4, 4), (1, 1), (1, 1), 1, "contiguous", f64, False, True,
         None),
        ("2d-cl-f32", (2, 4, 6, 5), (6, 4, 3, 3), (2, 1), (0, 1), (1, 2), 1, "channels_last", f32, True, True, None),
        ("1d-groups", (3, 6, 11), (4, 3, 3), (4,), (1,), (1,), 2, "contiguous", f32, True, False, None),
        ("3d", (2, 3, 3, 4, 4), (5, 3, 3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), 1, "contiguous", f64, False, True,
         None),
        ("2d-bf16", (2, 4, 6, 5), (6, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1, "contiguous", torch.bfloat16, True, True,
         None),
        ("2d-bf16-scaled-output", (2, 4, 5, 5), (6, 4, 3, 3), (4, 4), (1, 1), (1, 1), 1, "contiguous",
         torch.bfloat16, True, True, None),
        ("2d-transposed", (2, 4, 4, 3), (4, 3, 3, 3), (2, 1), (1, 0), (1, 1), 1, "contiguous", f64, True, True,
         (1, 0)),
        ("2d-transposed-groups-cl", (2, 4, 4, 3), (4, 3, 3, 3), (2, 2), (1, 1), (1, 2), 2, "channels_last", f32,
         False, True, (1, 1)),
        ("1d-transposed-scaled-output", (1, 6, 1), (6, 2, 4), (1,), (0,), (1,), 3, "contiguous", f64, True, False,
         (0,)),
        ("3d-transposed-scaled-output-bf16", (1, 4, 1, 1, 1), (4, 3, 2, 2, 2), (1, 1, 1), (0, 0, 0), (1, 1, 1), 1,
         "contiguous", torch.bfloat16, True, True, (0, 0, 0)),
    ]:
        n = len(samples)
        x = make_input(shape, dtype, layout=layout, seed=n)
        w = randn(wshape, n + 1, dtype, scale=0.3)
        if layout == "channels_last":
            w = w.contiguous(memory_format=torch.channels_last)
        channels = wshape[0] if output_padding is None else wshape[1] * groups
        b = randn((channels,), n + 2, dtype) if bias else None
        bn_w, bn_b, mean, var = make_params(channels, dtype, seed=n + 3)
        if not affine:
            bn_w = bn_b = None
        args = (x, w, b, bn_w, bn_b, mean, var, EPS, stride, padding, dilation, groups)
        samples.append((sid, args if output_padding is None else args + (True, output_padding)))
    return samples


# conv_bn_frozen's arguments that can require grad (input, weight, conv bias,
# BN weight and bias); conv_bn_train's also its residual, not the running
# statistics (5, 6) it updates in place.
FROZEN_GRAD_ARGS = (0, 1, 2, 3, 4)
TRAIN_GRAD_ARGS = (0, 1, 2, 3, 4, 11)
TRAIN_RUNNING_STATS = (5, 6)


def conv_bn_frozen_samples(device):
    samples = []
    for sid, args in _conv_bn_frozen_cases():
        args = tuple(a.to(device).requires_grad_(i in FROZEN_GRAD_ARGS) if isinstance(a, torch.Tensor) else a
                     for i, a in enumerate(args))
        samples.append(("conv_bn_frozen", sid, args))
    return samples


def conv_bn_train_call(frozen_args, activation, with_residual, seed=0):
    """conv_bn_train's arguments for the conv and BatchNorm of a conv_bn_frozen
    call (a residual shaped and laid out like the conv output, when asked)."""
    x, w, b, bn_w, bn_b, mean, var, eps, stride, padding, dilation, groups, *rest = frozen_args
    transposed, output_padding = rest if rest else (False, [])
    res = None
    if with_residual:
        with torch.no_grad():
            out = torch.convolution(x, w, None, stride, padding, dilation, transposed,
                                    list(output_padding) or [0] * len(stride), groups)
        res = out.clone().normal_(generator=torch.Generator(device=out.device).manual_seed(seed))
    return (x, w, b, bn_w, bn_b, mean, var, 0.1, eps, activation, NEGATIVE_SLOPE, res, stride, padding, dilation,
            groups, transposed, output_padding)


def conv_bn_train_samples(device):
    """The training op (conv input kept, conv recomputed in backward): schema
    (it mutates the running statistics), fake kernel, autograd, with and
    without a residual and with each activation."""
    samples = []
    for n, (sid, frozen_args) in enumerate(_conv_bn_frozen_cases()):
        activation = ACTIVATIONS[n % len(ACTIVATIONS)] or "none"
        args = conv_bn_train_call(frozen_args, activation, with_residual=n % 2 == 0, seed=n)
        args = tuple(a.to(device).requires_grad_(i in TRAIN_GRAD_ARGS)
                     if isinstance(a, torch.Tensor) and i not in TRAIN_RUNNING_STATS
                     else a.to(device) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
        samples.append(("conv_bn_train", sid, args))
    return samples


# The conv_bn_*_backward samples: (case id, output mask) over a fold, a
# scaled-output, a transposed, a grouped and a bfloat16 case, every gradient
# or some. The mask (input, weight, conv bias, BN weight, BN bias, residual)
# asks only for gradients of arguments that are given, as autograd does; a
# residual is given in the even-numbered cases. The forward runs first, so
# the statistics are real ones.
BACKWARD_CASES = [
    ("2d-fold", [True] * 6),
    ("2d-scaled-output", [True, False, False, True, True, False]),
    ("1d-groups", [False, True, True, False, False, True]),
    ("2d-transposed-groups-cl", [True, True, False, True, True, False]),
    ("2d-bf16", [True, True, False, False, False, False]),
]


def conv_bn_backward_samples(device):
    """conv_bn_frozen_backward and conv_bn_train_backward, from their forward
    ops' outputs on the same arguments."""
    samples = []
    cases = dict(_conv_bn_frozen_cases())
    for n, (sid, mask) in enumerate(BACKWARD_CASES):
        frozen = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in cases[sid])
        x, w, b, bn_w, bn_b, mean, var, eps, stride, padding, dilation, groups, *rest = frozen
        transposed, output_padding = rest if rest else (False, [])
        conv = (stride, padding, dilation, groups, transposed, output_padding)
        with torch.no_grad():
            out = OPS.conv_bn_frozen(*frozen)
        gy = make_input(tuple(out.shape), out.dtype, device, seed=500 + n, scale=1.0, offset=False)
        samples.append(("conv_bn_frozen_backward", sid, (gy, x, w, b, bn_w, mean, var, eps) + conv + (mask[:5],)))
        activation = ACTIVATIONS[n % len(ACTIVATIONS)] or "none"
        train = conv_bn_train_call(frozen, activation, with_residual=n % 2 == 0, seed=n)
        res = train[11]
        with torch.no_grad():
            # fresh running statistics: conv_bn_train updates them in place
            out, bmean, brstd = OPS.conv_bn_train(*train[:5], mean.clone(), var.clone(), *train[7:])
        samples.append(("conv_bn_train_backward", sid,
                        (gy, x, w, b, bn_w, bn_b, res, bmean, brstd, activation, NEGATIVE_SLOPE) + conv + (mask,)))
    return samples


def conv_bn_internal_samples(device):
    """conv_bn_frozen's internal per-channel ops (_frozen_bn_*, _conv_weight_*):
    the dtypes and layouts their kernels treat differently, each output mask.
    Built on the CPU from the helpers of tests/test_conv_bn_internal_ops.py,
    then moved to `device`."""
    f32 = torch.float32
    samples = []

    def vectors(n, dtype, seed, count):
        return [_vector(n, seed + i, dtype, offset=0.2) for i in range(count)]

    conv_bias, bn_weight, bn_bias, mean = vectors(6, f32, 40, 4)
    var = _vector(6, 44, f32, positive=True)
    samples.append(("_frozen_bn_affine", "f32", (conv_bias, bn_weight, bn_bias, mean, var, EPS)))
    samples.append(("_frozen_bn_affine", "f64-stats-only", (None, None, None, mean.double(), var.double(), 1e-3)))
    samples.append(("_frozen_bn_affine", "bf16", (conv_bias.bfloat16(), bn_weight.bfloat16(), bn_bias.bfloat16(),
                                                  mean.bfloat16(), var.bfloat16(), EPS)))
    samples.append(("_frozen_bn_affine", "f16-bias-f32-bn-strided",
                    (conv_bias.half(), bn_weight, None, _vector(6, 45, f32, strided=True), var, EPS)))

    grad_shift, grad_scale, scale = vectors(6, f32, 50, 3)
    inv_std = var.rsqrt()
    for mask in ([True, True], [True, False], [False, True]):
        sid = "f32-" + "-".join(name for name, m in zip(("conv-bias", "bn-weight"), mask) if m)
        samples.append(("_frozen_bn_parameter_grads", sid,
                        (grad_shift, grad_scale if mask[1] else None, scale, inv_std, conv_bias, mean, mask)))
    samples.append(("_frozen_bn_parameter_grads", "f16-no-conv-bias",
                    (grad_shift.half(), grad_scale.half(), scale.half(), inv_std.half(), None, mean.half(),
                     [True, True])))

    for case in WEIGHT_CASES:
        if case[0] not in ("conv2d", "conv2d-cl", "convT2d-groups", "convT2d-cl", "conv2d-mixed-layouts",
                           "conv2d-f16", "linear"):
            continue
        w, g, groups, transposed = _weight(case, 60, "cpu")
        channels = w.shape[1] * groups if transposed else w.shape[0]
        s = _vector(channels, 62, w.dtype, offset=1.0)
        samples.append(("_conv_weight_channel_dot", case[0], (g, w, None, groups, transposed)))
        samples.append(("_conv_weight_channel_dot", case[0] + "-scale", (g, w, s, groups, transposed)))
        samples.append(("_conv_weight_channel_scale", case[0], (w, s, groups, transposed)))
    return [(name, sid, tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))
            for name, sid, args in samples]


SOURCES = [
    SampleSource(batch_norm_samples),
    SampleSource(batch_norm_apply_samples),
    SampleSource(row_norm_samples),
    SampleSource(group_norm_samples),
    SampleSource(instance_norm_samples),
    SampleSource(conv_bn_frozen_samples, on_every_device=True),
    SampleSource(conv_bn_train_samples, on_every_device=True),
    SampleSource(conv_bn_backward_samples, on_every_device=True),
    SampleSource(conv_bn_internal_samples, on_every_device=True),
]


# ---------------------------------------------------------------------------
# Sequence norms (cases of tests/test_sequence_references.lstm_case, cast and
# moved to the device)
# ---------------------------------------------------------------------------


def _seq_on(device, dtype, *tensors, grad=False):
    return tuple(None if t is None else t.to(device=device, dtype=dtype).detach().requires_grad_(grad)
                 for t in tensors)


def masked_batch_norm_samples(device):
    """masked_batch_norm (training with per-step, shared and no running
    statistics, a step past max_length, one valid row and none, eval) and
    masked_batch_norm_backward from its forward's mean / rstd (each output
    mask, eval, no weight)."""
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    samples = []
    mask = torch.tensor([True, False, True, True, False, True], device=device)
    one = torch.tensor([False, False, True, False, False, False], device=device)
    x32 = make_input((6, 5), f32, device, seed=70, offset=False)
    w32, b32, _, _ = make_params(5, f32, device, seed=71)
    rm, rv = randn((3, 5), 72, f32, device, scale=0.5), randn((3, 5), 73, f32, device).abs() + 0.5

    def leaves(*ts):
        return tuple(None if t is None else t.detach().clone().requires_grad_() for t in ts)

    def stats(dtype=f32, shared=False):
        m, v = rm.to(dtype).clone(), rv.to(dtype).clone()
        return (m[0].clone(), v[0].clone()) if shared else (m, v)

    samples.append(("masked_batch_norm", "train-mask-per-step",
                    (*leaves(x32), mask, *leaves(w32, b32), *stats(), 1, True, 0.1, EPS)))
    samples.append(("masked_batch_norm", "train-beyond-max-length-f64-noaffine",
                    (*leaves(x32.double()), None, None, None, *stats(f64), 7, True, 0.3, 1e-3)))
    samples.append(("masked_batch_norm", "train-shared-stats-one-row",
                    (*leaves(x32), one, *leaves(w32, b32), *stats(shared=True), 0, True, 0.1, EPS)))
    samples.append(("masked_batch_norm", "train-no-row-nostats",
                    (*leaves(x32), torch.zeros_like(mask), *leaves(w32, b32), None, None, 2, True, 0.1, EPS)))
    samples.append(("masked_batch_norm", "eval-mask-per-step",
                    (*leaves(x32), mask, *leaves(w32, b32), *stats(), 2, False, 0.1, EPS)))
    samples.append(("masked_batch_norm", "train-bf16-f32params-nograd",
                    (x32.to(bf16), mask, w32, b32, *stats(), 1, True, 0.1, EPS)))

    gy = make_input((6, 5), f32, device, seed=74, offset=False)
    _, mean, rstd = OPS.masked_batch_norm(x32, mask, w32, b32, None, None, 1, True, 0.1, EPS)
    for sid, out_mask in (("all", [True] * 3), ("input-only", [True, False, False]),
                          ("params-only", [False, True, True])):
        samples.append(("masked_batch_norm_backward", f"train-{sid}",
                        (gy, x32, mask, w32, mean, rstd, True, out_mask)))
    _, mean, rstd = OPS.masked_batch_norm(x32, mask, w32, b32, *stats(), 2, False, 0.1, EPS)
    samples.append(("masked_batch_norm_backward", "eval", (gy, x32, mask, w32, mean, rstd, False, [True] * 3)))
    _, mean, rstd = OPS.masked_batch_norm(x32.double(), None, None, None, None, None, 0, True, 0.1, EPS)
    samples.append(("masked_batch_norm_backward", "train-f64-noweight-nomask",
                    (gy.double(), x32.double(), None, None, mean, rstd, True, [True, False, True])))
    return samples


def _bn_lstm_case(seed, T, N, H, L, dtype, device, grad=False, bias=True, track=True):
    """bn_lstm_layer's tensor arguments: [input_gates, hx, cx, weight_hh, bias,
    bn_ih_weight, bn_hh_weight, bn_c_weight, bn_c_bias] and the six running
    statistics (None without track)."""
    x, h0, c0, p, st = lstm_case(seed, T, N, 3, H, L)
    tensors = list(_seq_on(device, dtype, x @ p["w_ih"].t(), h0, c0, *[p[k] for k in LSTM_PARAM_NAMES[1:]],
                           grad=grad))
    if not bias:
        tensors[4] = None
    running = [t.to(device=device, dtype=dtype) if track else None for k in ("ih", "hh", "c") for t in st[k]]
    return tensors, running


def bn_lstm_layer_samples(device):
    """bn_lstm_layer (training with unsorted lengths, a length 0 and steps
    with one sequence left, T > max_length, first_step; eval; no bias; no
    running statistics; bfloat16) and bn_lstm_layer_backward from its
    forward's outputs (every incoming gradient, some absent)."""
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    lengths = torch.tensor([2, 0, 4, 1], device=device)
    samples = []
    t, r = _bn_lstm_case(80, 4, 4, 3, 2, f32, device, grad=True)
    samples.append(("bn_lstm_layer", "train-lengths", (*t, *r, lengths, 0, True, 0.1, EPS)))
    t, r = _bn_lstm_case(81, 3, 3, 2, 4, f64, device, grad=True, bias=False)
    samples.append(("bn_lstm_layer", "train-f64-nobias-first-step", (*t, *r, None, 2, True, 0.2, 1e-3)))
    t, r = _bn_lstm_case(82, 4, 3, 2, 2, f32, device, grad=True, track=False)
    samples.append(("bn_lstm_layer", "train-nostats", (*t, *r, None, 0, True, 0.1, EPS)))
    t, r = _bn_lstm_case(83, 4, 4, 3, 2, f32, device, grad=True)
    samples.append(("bn_lstm_layer", "eval-lengths", (*t, *r, lengths, 0, False, 0.1, EPS)))
    t, r = _bn_lstm_case(84, 4, 4, 2, 3, bf16, device)
    samples.append(("bn_lstm_layer", "train-bf16-nograd", (*t, *r, lengths, 1, True, 0.1, EPS)))

    for sid, dtype, training, lens, which in (
        ("train-lengths-all", f32, True, lengths, (True, True, True)),
        ("train-output-only", f32, True, None, (True, False, False)),
        ("train-lengths-state-only", f64, True, lengths, (False, True, True)),
        ("eval-lengths-hy-only", f32, False, lengths, (False, True, False)),
    ):
        t, r = _bn_lstm_case(85, 4, 4, 3, 2, dtype, device)
        with torch.no_grad():
            output, hy, cy, hidden_gates, cells, stats = OPS.bn_lstm_layer(*t, *r, lens, 0, training, 0.1, EPS)
        grads = [make_input(tuple(v.shape), dtype, device, seed=86 + i, scale=1.0, offset=False) if w else None
                 for i, (v, w) in enumerate(zip((output, hy, cy), which))]
        samples.append(("bn_lstm_layer_backward", sid,
                        (*grads, *t, output, hidden_gates, cells, stats, lens, training)))
    return samples


def bn_lstm_step_samples(device):
    """The internal per-step kernels, out-variant (writing into given tensors,
    returning ()): _bn_lstm_step in training (a mask, a step past max_length,
    one valid row) and eval, and _bn_lstm_step_backward from its outputs."""
    f32, f64 = torch.float32, torch.float64
    samples = []
    N, H = 4, 3
    for sid, dtype, training, valid, step in (
        ("train-mask", f32, True, [True, False, True, True], 1),
        ("train-f64-beyond-max-length", f64, True, None, 5),
        ("train-one-row", f32, True, [False, False, True, False], 0),
        ("eval-mask", f32, False, [True, True, False, True], 1),
    ):
        t, r = _bn_lstm_case(90 + len(samples), 1, N, H, 2, dtype, device)
        gx, hx, cx, w_hh, bias, *bn = t
        gh = hx @ w_hh.t()
        valid = None if valid is None else torch.tensor(valid, device=device)
        acc = torch.float64 if dtype == f64 else torch.float32
        hy, cy = torch.empty(N, H, dtype=dtype, device=device), torch.empty(N, H, dtype=dtype, device=device)
        stats = torch.empty(2, 9 * H, dtype=acc, device=device)
        samples.append(("_bn_lstm_step", sid, (gx[0], gh, cx, bias, *bn, *r, step, valid, training, 0.1, EPS, hy, cy,
                                               stats)))
        with torch.no_grad():
            OPS._bn_lstm_step(gx[0], gh, cx, bias, *bn, *[v.clone() for v in r], step, valid, training, 0.1, EPS,
                              hy, cy, stats)
        grad_hy = make_input((N, H), dtype, device, seed=95, scale=1.0, offset=False)
        grad_cy = make_input((N, H), dtype, device, seed=96, scale=1.0, offset=False)
        outs = (torch.empty(N, 4 * H, dtype=dtype, device=device), torch.empty(N, 4 * H, dtype=dtype, device=device),
                torch.empty(N, H, dtype=dtype, device=device), torch.zeros(14 * H, dtype=acc, device=device))
        samples.append(("_bn_lstm_step_backward", sid, (grad_hy, grad_cy, gx[0], gh, cx, hy.clone(), bias, *bn,
                                                        stats.clone(), valid, training, *outs)))
    return samples


SOURCES += [
    SampleSource(masked_batch_norm_samples, on_every_device=True),
    SampleSource(bn_lstm_layer_samples, on_every_device=True),
    SampleSource(bn_lstm_step_samples, on_every_device=True),
]


def online_norm_samples(device):
    """Online Normalization in training (1-d, spatial, float64, bfloat16 with
    float32 state; with and without the fused affine and the layer scaling;
    the input requiring grad so autograd is checked), and its backward op from
    the forward's statistics, with and without the weight and output masks."""
    samples = []
    for sid, shape, dtype, state_dtype, affine, ls in (
        ("NC-f32", (4, 3), torch.float32, torch.float32, False, False),
        ("NCHW-f32-affine", (3, 2, 4, 5), torch.float32, torch.float32, True, False),
        ("NCL-f64-affine", (3, 2, 6), torch.float64, torch.float64, True, False),
        ("NCHW-bf16", (2, 3, 3, 3), torch.bfloat16, torch.float32, False, False),
        ("NCHW-f32-affine-ls", (3, 2, 4, 5), torch.float32, torch.float32, True, True),
        ("NCL-f64-affine-ls", (3, 2, 6), torch.float64, torch.float64, True, True),
        ("NC-f32-ls", (4, 3), torch.float32, torch.float32, False, True),
    ):
        C = shape[1]
        x = make_input(shape, dtype, device, seed=120 + len(samples))
        grad = dtype != torch.bfloat16
        w, b = (make_params(C, dtype, device, seed=140 + len(samples))[:2] if affine else (None, None))
        state = [torch.zeros(C, dtype=state_dtype, device=device), torch.ones(C, dtype=state_dtype, device=device),
                 torch.zeros(C, dtype=state_dtype, device=device), torch.zeros(C, dtype=state_dtype, device=device)]
        leaf_or_none = [None if t is None else t.clone().requires_grad_(grad) for t in (x, w, b)]
        samples.append(("online_norm", sid, (*leaf_or_none, *state, 0.9, 0.8, EPS, ls)))
        with torch.no_grad():
            _, mean, rstd, layer_rstd = OPS.online_norm(x, w, b, *[s.clone() for s in state], 0.9, 0.8, EPS, ls)
        dy = make_input(shape, dtype, device, seed=130 + len(samples), scale=1.0, offset=False)
        mask = [True, affine, affine] if not sid.startswith("NCL-f64-affine") else [False, True, False]
        layer_args = (b, layer_rstd) if ls else ()
        samples.append(("online_norm_backward", sid, (dy, x, w, mean, rstd, state[2].clone(), state[3].clone(), 0.8,
                                                      mask, *layer_args)))
    return samples


SOURCES.append(SampleSource(online_norm_samples, on_every_device=True))


# ---------------------------------------------------------------------------
# SyncBatchNorm's per-rank ops
# ---------------------------------------------------------------------------


def sync_batch_norm_samples(device):
    """batch_norm_stats (layouts, dtypes, an empty share), batch_norm_gather_stats
    (a table with an empty partial; float64; no running statistics; float16
    running statistics) and batch_norm_backward_elemt (activations, residual,
    output masks, float16 with float32 parameters)."""
    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
    samples = []
    for sid, shape, layout, dtype, pdtype in [
        ("4d-f32", (4, 3, 5, 5), "contiguous", f32, f32),
        ("cl-f16-f32params", (2, 4, 3, 3), "channels_last", f16, f32),
        ("2d-f64", (5, 3), "contiguous", f64, f64),
        ("5d-bf16-cl3d", (2, 3, 2, 2, 3), "channels_last_3d", bf16, bf16),
        ("empty", (0, 3, 4), "contiguous", f32, f32),
    ]:
        x = make_input(shape, dtype, device, layout=layout, seed=200 + len(samples))
        w, b, rm, rv = make_params(shape[1], pdtype, device, seed=210 + len(samples))
        samples.append(("batch_norm_stats", sid, (x, w, b, rm, rv, None)))
    samples.append(("batch_norm_stats", "input-only", (make_input((3, 2, 4), f32, device, seed=220),)))

    full = make_input((7, 3, 4), f32, device, seed=230)
    table = torch.stack([OPS.batch_norm_stats(s) for s in (full[:3], full[3:3], full[3:])])
    _, _, rm, rv = make_params(3, f32, device, seed=240)
    samples.append(("batch_norm_gather_stats", "f32-3-partials-one-empty", (table, rm, rv, 0.1, EPS)))
    samples.append(("batch_norm_gather_stats", "f64-no-running", (table.double(), None, None, 0.1, EPS)))
    samples.append(("batch_norm_gather_stats", "f32-f16-running", (table, rm.half(), rv.half(), 0.3, 1e-3)))

    for sid, shape, layout, dtype, pdtype, activation, affine, residual, mask in [
        ("4d-f32-silu-res", (4, 3, 5, 5), "contiguous", f32, f32, "silu", True, True, [True, True]),
        ("cl-f16-f32params-relu", (2, 4, 3, 3), "channels_last", f16, f32, "relu", True, False, [True, False]),
        ("2d-f64-noaffine", (5, 3), "contiguous", f64, f64, "none", False, False, [True, False]),
        ("cl3d-bf16-leaky-res-residual-only", (2, 3, 2, 2, 3), "channels_last_3d", bf16, bf16, "leaky_relu", True,
         True, [False, True]),
    ]:
        seed = 250 + 10 * len(samples)
        x = make_input(shape, dtype, device, layout=layout, seed=seed)
        gy = make_input(shape, dtype, device, layout=layout, seed=seed + 1, scale=1.0, offset=False)
        res = make_input(shape, dtype, device, layout=layout, seed=seed + 2, offset=False) if residual else None
        w, b, _, _ = make_params(shape[1], pdtype, device, seed=seed + 3, affine=affine)
        _, mean, rstd = OPS.batch_norm_train(x, w, b, None, None, 0.1, EPS, activation, 0.2, res)
        mean_dz, mean_dz_xhat = (randn(shape[1], seed + k, mean.dtype, device) for k in (4, 5))
        samples.append(("batch_norm_backward_elemt", sid,
                        (gy, x, w, b, res, mean, rstd, mean_dz, mean_dz_xhat, activation, 0.2, mask)))
    return samples


SOURCES.append(SampleSource(sync_batch_norm_samples, on_every_device=True))
def cosine_norm_samples(device):
    """Cosine Normalization: cosine_linear (2-d and 3-d input, with and
    without a bias, float32, float64, bfloat16) and cosine_conv2d (padding,
    stride, dilation, groups), inputs requiring grad so autograd is checked
    (not bfloat16); and their backward ops from the forwards' outputs, with
    and without each gradient."""
    samples = []
    linear_cases = (("2d-f32-bias", (5, 6), 4, torch.float32, True), ("3d-f64", (2, 3, 6), 4, torch.float64, False),
                    ("2d-bf16-bias", (4, 6), 3, torch.bfloat16, True))
    for sid, shape, out, dtype, bias in linear_cases:
        x = make_input(shape, dtype, device, seed=150 + len(samples))
        w = randn((out, shape[-1]), 160 + len(samples), dtype, device, scale=0.5)
        b = randn((out,), 170 + len(samples), dtype, device, scale=0.5) if bias else None
        grad = dtype != torch.bfloat16
        samples.append(("cosine_linear", sid, (*[None if t is None else t.clone().requires_grad_(grad)
                                                 for t in (x, w, b)], 1e-8)))
        with torch.no_grad():
            y, rx, rw = OPS.cosine_linear(x, w, b, 1e-8)
        dy = make_input(tuple(y.shape), dtype, device, seed=180 + len(samples), scale=1.0, offset=False)
        mask = [True, True, bias] if sid != "3d-f64" else [False, True, False]
        samples.append(("cosine_linear_backward", sid, (dy, x, w, b, y, rx, rw, mask)))
    conv_cases = (("3x3-pad1-f32-bias", (2, 3, 5, 6), 4, 1, [1, 1], [1, 1], [1, 1], torch.float32, True),
                  ("stride2-dilation2-groups2-f64", (2, 4, 7, 7), 6, 2, [2, 1], [2, 0], [2, 1], torch.float64,
                   False),
                  ("3x3-bf16", (1, 2, 4, 4), 2, 1, [1, 1], [0, 0], [1, 1], torch.bfloat16, True))
    for sid, shape, out, groups, stride, padding, dilation, dtype, bias in conv_cases:
        conv = (stride, padding, dilation, groups)
        x = make_input(shape, dtype, device, seed=190 + len(samples))
        w = randn((out, shape[1] // groups, 3, 3), 200 + len(samples), dtype, device, scale=0.5)
        b = randn((out,), 210 + len(samples), dtype, device, scale=0.5) if bias else None
        grad = dtype != torch.bfloat16
        samples.append(("cosine_conv2d", sid, (*[None if t is None else t.clone().requires_grad_(grad)
                                                 for t in (x, w, b)], *conv, 1e-8)))
        with torch.no_grad():
            y, rx, rw = OPS.cosine_conv2d(x, w, b, *conv, 1e-8)
        dy = make_input(tuple(y.shape), dtype, device, seed=220 + len(samples), scale=1.0, offset=False)
        mask = [True, True, bias] if dtype != torch.float64 else [True, False, False]
        samples.append(("cosine_conv2d_backward", sid, (dy, x, w, b, y, rx, rw, *conv, mask)))
    return samples


SOURCES.append(SampleSource(cosine_norm_samples, on_every_device=True))
def streaming_norm_samples(device):
    """Streaming Normalization in training (1-d, spatial, channels-last,
    float64 state, bfloat16 with float32 state, one value per channel; with
    and without weight and bias; before and after a first weight update; the
    input requiring grad so autograd is checked), and its backward op from
    the forward's statistics, with and without the output masks."""
    samples = []
    for sid, shape, dtype, state_dtype, affine, updated, layout in (
        ("NC-f32", (4, 3), torch.float32, torch.float32, False, False, "contiguous"),
        ("NCHW-f32-affine-updated", (3, 2, 4, 5), torch.float32, torch.float32, True, True, "contiguous"),
        ("NCHW-f32-channels-last", (2, 3, 4, 4), torch.float32, torch.float32, True, False, "channels_last"),
        ("NCL-f64-affine", (3, 2, 6), torch.float64, torch.float64, True, True, "contiguous"),
        ("NCHW-bf16", (2, 3, 3, 3), torch.bfloat16, torch.float32, True, False, "contiguous"),
        ("1C-f32-one-value", (1, 3), torch.float32, torch.float32, True, True, "contiguous"),
    ):
        C = shape[1]
        x = make_input(shape, dtype, device, layout=layout, seed=150 + len(samples))
        grad = dtype != torch.bfloat16
        w, b = (make_params(C, dtype, device, seed=160 + len(samples))[:2] if affine else (None, None))
        gen = torch.Generator().manual_seed(170 + len(samples))

        def history(count):
            values = torch.stack([torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5])
            return values.to(device, state_dtype), torch.tensor(float(count), dtype=state_dtype, device=device)

        short, short_count = history(2)
        long, long_count = history(1 if updated else 0)
        grad_short, grad_short_count = history(1)
        grad_long, grad_long_count = history(3 if updated else 0)
        state = (short, short_count, long, long_count, grad_short, grad_short_count, grad_long, grad_long_count)
        rates = (0.3, 0.7, 0.2, 0.5, 0.3)
        leaf_or_none = [None if t is None else t.clone().requires_grad_(grad) for t in (x, w, b)]
        samples.append(("streaming_norm", sid, (*leaf_or_none, *[t.clone() for t in state], *rates, EPS)))
        with torch.no_grad():
            _, mean, rstd, mean_hat, rstd_hat = OPS.streaming_norm(x, w, b, *[t.clone() for t in state], *rates, EPS)
        dy = make_input(shape, dtype, device, layout=layout, seed=180 + len(samples), scale=1.0, offset=False)
        mask = [True, affine, affine] if sid != "NCL-f64-affine" else [False, True, False]
        samples.append(("streaming_norm_backward", sid, (dy, x, w, mean, rstd, mean_hat, rstd_hat,
                                                         *[t.clone() for t in state[4:]], *rates[2:], mask)))
    return samples


SOURCES.append(SampleSource(streaming_norm_samples, on_every_device=True))
# ---------------------------------------------------------------------------
# Weight Normalization
# ---------------------------------------------------------------------------


def weight_norm_samples(device):
    """weight_norm along dim 0, a middle dim, the last (negative) and the whole
    tensor (None), in float32, float64 and bfloat16 with a float32 g, v and g
    requiring grad (so autograd is checked) but for bfloat16; and
    weight_norm_backward from the forward's norms, with each output mask."""
    from test_weight_norm import g_shape

    samples = []
    for sid, shape, dim, dtype, g_dtype, mask in (
        ("2d-dim0-f32", (6, 5), 0, torch.float32, torch.float32, [True, True]),
        ("4d-dim1-f64", (4, 3, 3, 3), 1, torch.float64, torch.float64, [True, False]),
        ("3d-dim-1-f32", (3, 4, 20), -1, torch.float32, torch.float32, [False, True]),
        ("4d-none-f32", (4, 3, 2, 2), None, torch.float32, torch.float32, [True, True]),
        ("2d-dim0-bf16", (6, 40), 0, torch.bfloat16, torch.float32, [True, True]),
    ):
        seed = 200 + 3 * len(samples)
        v = randn(shape, seed, dtype, device)
        g = randn(g_shape(shape, dim), seed + 1, g_dtype, device, scale=0.5, offset=1.0)
        grad = dtype != torch.bfloat16
        samples.append(("weight_norm", sid, (v.clone().requires_grad_(grad), g.clone().requires_grad_(grad), dim,
                                             1e-12)))
        with torch.no_grad():
            _, norms = OPS.weight_norm(v, g, dim, 1e-12)
        grad_w = randn(shape, seed + 2, dtype, device)
        samples.append(("weight_norm_backward", sid, (grad_w, v, g, norms, dim, 1e-12, mask)))
    return samples


SOURCES.append(SampleSource(weight_norm_samples, on_every_device=True))


def _recipe_of(like, activation, seed):
    """(tensor, recipe args) with tensor = act(BN(pre_norm)) in batch
    statistics, shaped like `like`: what a fused block without residual hands
    the next (torchnorm/_rebuild_ops.py), in `like`'s memory layout (inductor
    hands the ops channels-last tensors)."""
    pre_norm = make_input(tuple(like.shape), like.dtype, like.device, seed=seed, scale=1.0, offset=True)
    pre_norm = torch.empty_like(like, requires_grad=False).copy_(pre_norm)
    w, b, _, _ = make_params(like.shape[1], like.dtype, like.device, seed=seed + 1)
    with torch.no_grad():
        y, mean, rstd = OPS.batch_norm_train(pre_norm, w, b, None, None, 0.1, EPS, activation, NEGATIVE_SLOPE, None)
    return y.requires_grad_(like.requires_grad), (pre_norm, mean, rstd, w, b, activation, NEGATIVE_SLOPE)


def conv_rebuilt_samples():
    """conv_rebuilt_input and conv_bn_train_rebuilt: schema, fake kernel and
    autograd (the gradient of the rebuilt input and of the parameters), over
    the conv cases of conv_bn_frozen (CPU: Python custom ops of CPU and CUDA
    ops alike) and each activation of the input's block."""
    samples = []
    for n, (sid, frozen_args) in enumerate(_conv_bn_frozen_cases()):
        activation = ACTIVATIONS[n % len(ACTIVATIONS)] or "none"
        x, w, b, _, _, _, _, _, stride, padding, dilation, groups, *rest = frozen_args
        if x.numel() // x.shape[1] < 2:
            continue  # batch statistics need two values per channel
        transposed, output_padding = rest if rest else (False, [])
        y, recipe = _recipe_of(x.requires_grad_(), activation, seed=700 + n)
        conv = (w.requires_grad_(), None if b is None else b.requires_grad_(), stride, padding, dilation, groups,
                transposed, output_padding)
        samples.append(("conv_rebuilt_input", sid, (y,) + recipe + conv))
        train = list(conv_bn_train_call(frozen_args, activation, with_residual=n % 2 == 0, seed=n))
        train = [a.requires_grad_(i in TRAIN_GRAD_ARGS) if isinstance(a, torch.Tensor) and i not in
                 TRAIN_RUNNING_STATS else a for i, a in enumerate(train)]
        train[0], in_recipe = _recipe_of(train[0], activation, seed=800 + n)
        res_recipe = (None, None, None, None, None, "none", 0.0)
        if train[11] is not None and n % 4 == 0:
            train[11], res_recipe = _recipe_of(train[11], ACTIVATIONS[(n + 1) % len(ACTIVATIONS)] or "none",
                                               seed=900 + n)
        args = (train[0],) + in_recipe + tuple(train[1:12]) + res_recipe + tuple(train[12:])
        samples.append(("conv_bn_train_rebuilt", sid, args))
    return samples


SOURCES.append(SampleSource(conv_rebuilt_samples))
