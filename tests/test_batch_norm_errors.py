"""Bad input to the BatchNorm ops, torchnorm.functional.batch_norm and the modules:
each is a clear error naming the problem, and the running statistics are left
untouched. NaN / Inf inputs propagate NaN like torch instead of crashing.
"""
import pytest
import torch
import torch.nn.functional as F

import torchnorm  # noqa: F401  (registers the ops)
import torchnorm.functional as tnf
import torchnorm.nn as tnn
from conftest import (
    ARG_NAMES,
    BAD_CHANNEL_SHAPES,
    DTYPE_MISMATCHES,
    ERRORS,
    NEGATIVE_SLOPE,
    OTHER_DEVICE,
    StatsUnchanged,
    bad_shaped,
    assert_close,
    expect_error,
    make_input,
    make_params,
    torch_act,
)

OPS = torch.ops.torchnorm
EPS = 1e-5

ENTRIES = ["op-train", "op-eval", "functional-train", "functional-eval"]


def call(entry, x, w, b, rm, rv, res=None, activation="relu"):
    """One BatchNorm forward through the named entry point."""
    if entry == "op-train":
        return OPS.batch_norm_train(x, w, b, rm, rv, 0.1, EPS, activation, NEGATIVE_SLOPE, res)
    if entry == "op-eval":
        return OPS.batch_norm_eval(x, rm, rv, w, b, EPS, activation, NEGATIVE_SLOPE, res)
    act = None if activation == "none" else activation
    training = entry == "functional-train"
    return tnf.batch_norm(
        x, rm, rv, weight=w, bias=b, training=training, momentum=0.1, eps=EPS,
        activation=act, negative_slope=NEGATIVE_SLOPE, residual=res,
    )


def good_args(shape=(4, 3, 5, 5), dtype=torch.float32, device="cpu"):
    x = make_input(shape, dtype, device)
    w, b, rm, rv = make_params(shape[1], dtype, device)
    res = make_input(shape, dtype, device, seed=9, offset=False)
    return dict(x=x, w=w, b=b, rm=rm, rv=rv, res=res)


def expect_bn_error(entry, args, match, stats=None):
    stats = stats or StatsUnchanged(args["rm"], args["rv"])
    expect_error(lambda: call(entry, **args), match, stats)


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad_shape", BAD_CHANNEL_SHAPES)
@pytest.mark.parametrize("which", ["w", "b", "rm", "rv"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_wrong_per_channel_shape(entry, which, bad_shape):
    args = good_args()
    stats = StatsUnchanged(args["rm"], args["rv"])
    args[which] = bad_shaped(bad_shape, 3)
    expect_bn_error(entry, args, ARG_NAMES[which], stats)


@pytest.mark.parametrize("bad_shape", [(4, 3, 5, 6), (4, 3), (4, 3, 25), (1, 3, 1, 1)], ids=["W+1", "2-D", "flattened", "broadcastable"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_residual_wrong_shape(entry, bad_shape):
    args = good_args()
    args["res"] = make_input(bad_shape, torch.float32, seed=4, offset=False)
    expect_bn_error(entry, args, "residual")


@pytest.mark.parametrize("entry", ENTRIES)
def test_residual_transposed_shape(entry):
    args = good_args((2, 3, 4, 5))
    args["res"] = make_input((2, 3, 5, 4), torch.float32, seed=4, offset=False)
    expect_bn_error(entry, args, "residual")


@pytest.mark.parametrize("shape", [(3,), ()], ids=["1-D", "0-D"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_input_rank_too_small(entry, shape):
    args = good_args()
    args["x"] = make_input(shape, torch.float32, offset=False) if shape else torch.tensor(1.0)
    args["res"] = None
    expect_bn_error(entry, args, r"(?i)shape|dim|input")


def test_running_stats_must_come_together():
    args = good_args()
    stats = StatsUnchanged(args["rm"])
    with pytest.raises(ERRORS, match="running_(mean|var)"):
        OPS.batch_norm_train(args["x"], args["w"], args["b"], args["rm"], None, 0.1, EPS, "none", 0.0, None)
    stats.check()


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("x_dtype,bad_dtype", DTYPE_MISMATCHES)
@pytest.mark.parametrize("which", ["w", "b", "rm", "rv"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_per_channel_dtype_mismatch(entry, which, x_dtype, bad_dtype):
    args = good_args(dtype=x_dtype)
    stats = StatsUnchanged(args["rm"], args["rv"])
    args[which] = args[which].to(bad_dtype)
    expect_bn_error(entry, args, ARG_NAMES[which], stats)


@pytest.mark.parametrize("bad_dtype", [torch.float64, torch.float16], ids=["f64", "f16"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_residual_dtype_mismatch(entry, bad_dtype):
    args = good_args()
    args["res"] = args["res"].to(bad_dtype)
    expect_bn_error(entry, args, "residual")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("entry", ENTRIES)
def test_non_float_input(entry, dtype):
    args = good_args()
    args["x"] = (args["x"] * 10).to(dtype)
    args["res"] = None
    expect_bn_error(entry, args, r"(?i)dtype|float|type")


# ---------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["x", "w", "b", "rm", "rv", "res"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_device_mismatch(entry, which):
    args = good_args()
    args[which] = args[which].to(OTHER_DEVICE)
    stats = StatsUnchanged(args["rm"], args["rv"])
    expect_bn_error(entry, args, r"(?i)device|cpu|meta|cuda", stats)


def test_backward_bad_arguments():
    args = good_args((4, 3, 5))
    x, w, b = args["x"], args["w"], args["b"]
    _, mean, rstd = OPS.batch_norm_train(x, w, b, None, None, 0.1, EPS, "relu", 0.0, None)
    gy = make_input(x.shape, torch.float32, seed=5, offset=False)
    with pytest.raises(ERRORS, match="grad_output"):
        OPS.batch_norm_backward(gy[:, :, :4], x, w, b, None, mean, rstd, True, "relu", 0.0, [True] * 3 + [False])
    with pytest.raises(ERRORS, match=r"(?i)statistic|mean|rstd"):
        OPS.batch_norm_backward(gy, x, w, b, None, mean[:2], rstd, True, "relu", 0.0, [True] * 3 + [False])
    with pytest.raises(ERRORS, match=r"(?i)statistic|mean|rstd|dtype"):
        OPS.batch_norm_backward(gy, x, w, b, None, mean.double(), rstd.double(), True, "relu", 0.0, [True] * 3 + [False])
    with pytest.raises(ERRORS, match="activation"):
        OPS.batch_norm_backward(gy, x, w, b, None, mean, rstd, True, "gelu", 0.0, [True] * 3 + [False])


# ---------------------------------------------------------------------------
# One value per channel, activation names
# ---------------------------------------------------------------------------

ONE_VALUE = "Expected more than 1 value per channel when training"


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)], ids=["2d", "3d", "4d", "5d"])
@pytest.mark.parametrize("entry", ["op-train", "functional-train", "module"])
def test_one_value_per_channel_in_training(entry, shape):
    args = good_args(shape)
    stats = StatsUnchanged(args["rm"], args["rv"])
    with pytest.raises(ValueError, match=ONE_VALUE):
        if entry == "module":
            cls = {2: tnn.BatchNorm1d, 3: tnn.BatchNorm1d, 4: tnn.BatchNorm2d, 5: tnn.BatchNorm3d}[len(shape)]
            m = cls(3)
            m.running_mean.copy_(args["rm"])
            m.running_var.copy_(args["rv"])
            stats = StatsUnchanged(m.running_mean, m.running_var, m.num_batches_tracked)
            m(args["x"])
        else:
            call(entry, **args)
    stats.check()
    # torch.nn agrees, and eval mode is fine with one value per channel
    with pytest.raises(ValueError, match=ONE_VALUE):
        F.batch_norm(args["x"], args["rm"].clone(), args["rv"].clone(), training=True)
    out = tnf.batch_norm(args["x"], args["rm"], args["rv"], args["w"], args["b"], training=False)
    exp = F.batch_norm(args["x"], args["rm"], args["rv"], args["w"], args["b"], training=False)
    assert_close(out, exp, torch.float32, "forward", "eval with one value per channel")


@pytest.mark.parametrize("activation", ["gelu", "ReLU", "relu6", "tanh"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_activation(entry, activation):
    args = good_args()
    expect_bn_error(entry, dict(args, activation=activation), "activation")


def test_bad_activation_module():
    x = make_input((2, 3, 3, 3), torch.float32)
    with pytest.raises(ERRORS, match="activation"):
        m = tnn.BatchNormAct2d(3, activation="gelu")
        m(x)


@pytest.mark.parametrize(
    "cls,shape",
    [("BatchNorm1d", (2, 3, 4, 4)), ("BatchNorm2d", (2, 3, 4)), ("BatchNorm2d", (2, 3, 4, 4, 4)), ("BatchNorm3d", (2, 3, 4, 4)), ("BatchNormAct2d", (2, 3, 4))],
)
def test_module_wrong_rank_like_torch(cls, shape):
    m = getattr(tnn, cls)(3)
    stats = StatsUnchanged(m.running_mean, m.running_var, m.num_batches_tracked)
    with pytest.raises(ValueError, match=r"(?i)(\dD input|dim)"):
        m(make_input(shape, torch.float32))
    stats.check()


# ---------------------------------------------------------------------------
# NaN / Inf propagate like torch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"], ids=["none", "relu", "leaky_relu"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_inf_propagate(layout, training, value, activation):
    x = make_input((3, 4, 3, 5), torch.float32, layout=layout)
    x[1, 0, 2, 3] = value
    w, b, rm, rv = make_params(4, torch.float32)
    rm_t, rv_t = rm.clone(), rv.clone()
    out = tnf.batch_norm(x, rm, rv, w, b, training=training, activation=activation, negative_slope=NEGATIVE_SLOPE)
    exp = torch_act(F.batch_norm(x, rm_t, rv_t, w, b, training), activation)
    if training:
        assert torch.isnan(out[:, 0]).all(), "a NaN/Inf in channel 0 must make its whole batch output NaN"
    assert torch.isfinite(out[:, 1:]).all(), "other channels must stay finite"
    assert torch.equal(torch.isnan(out), torch.isnan(exp)), "NaN pattern differs from torch"
    assert torch.equal(torch.isinf(out), torch.isinf(exp)), "Inf pattern differs from torch"
    finite = torch.isfinite(exp)
    assert_close(out[finite], exp[finite], torch.float32, "forward", "finite elements")
    # the polluted channel's statistics become non-finite (NaN or Inf) like torch's
    assert torch.equal(torch.isfinite(rm), torch.isfinite(rm_t)) and torch.equal(torch.isfinite(rv), torch.isfinite(rv_t))
    assert_close(rm[1:], rm_t[1:], torch.float32, "stats", "running_mean of the clean channels")
    assert_close(rv[1:], rv_t[1:], torch.float32, "stats", "running_var of the clean channels")


def test_nan_gradient_does_not_crash():
    x = make_input((3, 4, 5), torch.float32).requires_grad_()
    out = tnf.batch_norm(x, None, None, training=True, activation="silu")
    gy = torch.ones_like(out)
    gy[0, 1, 2] = float("nan")
    (gx,) = torch.autograd.grad(out, [x], gy)
    assert torch.isnan(gx[:, 1]).all()
    assert torch.isfinite(gx[:, [0, 2, 3]]).all()
