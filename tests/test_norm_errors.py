"""Bad input to the LayerNorm / RMSNorm / GroupNorm / InstanceNorm ops,
torchnorm.functional and the modules: each is a clear error naming the
problem (normalized_shape, weight, bias, residual, num_groups, running
statistics, dtypes, devices, ranks), and running statistics are left untouched
by a rejected call.
"""
import pytest
import torch
import torch.nn as nn

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
    expect_error,
    make_affine,
    make_input,
    make_params,
)

OPS = torch.ops.torchnorm
EPS = 1e-5
DEVICE_MATCH = r"(?i)device|cpu|meta|cuda"
DTYPE_MATCH = r"(?i)dtype|float|type"

# ---------------------------------------------------------------------------
# LayerNorm / RMSNorm
# ---------------------------------------------------------------------------

LN_ENTRIES = ["ln-op", "ln-functional", "rms-op", "rms-functional"]


def ln_entry_args(whiches):
    """(entry, which) pairs, leaving out RMSNorm's (absent) bias."""
    return [
        pytest.param(e, w, id=f"{e}-{w}")
        for e in LN_ENTRIES
        for w in whiches
        if not (w == "b" and e.startswith("rms"))
    ]


def ln_args(shape=(4, 5, 7), ns=(7,), dtype=torch.float32, pdtype=None, device="cpu"):
    x = make_input(shape, dtype, device)
    w, b = make_affine(ns, pdtype or dtype, device, seed=3)
    res = make_input(shape, dtype, device, seed=9, offset=False)
    return dict(x=x, ns=ns, w=w, b=b, res=res)


def call_ln(entry, x, ns, w, b, res):
    if entry == "ln-op":
        return OPS.layer_norm(x, list(ns), w, b, EPS, res)
    if entry == "ln-functional":
        return tnf.layer_norm(x, ns, w, b, EPS, residual=res)
    if entry == "rms-op":
        return OPS.rms_norm(x, list(ns), w, EPS, res)
    return tnf.rms_norm(x, ns, w, EPS, residual=res)


@pytest.mark.parametrize(
    "bad_ns",
    [(6,), (5,), (4, 5), (5, 6), (7, 5), (3, 4, 5, 7)],
    ids=["D-1", "middle-dim", "leading-dims", "2dims-wrong", "reversed", "longer-than-input"],
)
@pytest.mark.parametrize("entry", LN_ENTRIES)
def test_normalized_shape_mismatch(entry, bad_ns):
    args = dict(ln_args(), ns=bad_ns, w=None, b=None, res=None)
    expect_error(lambda: call_ln(entry, **args), "normalized_shape")


@pytest.mark.parametrize("bad_shape", [(8,), (6,), (1, 7), (7, 1), ()], ids=["D+1", "D-1", "1xD", "Dx1", "0-D"])
@pytest.mark.parametrize("entry,which", ln_entry_args(["w", "b"]))
def test_weight_bias_shape_mismatch(entry, which, bad_shape):
    args = ln_args()
    args[which] = bad_shaped(bad_shape, 4)
    expect_error(lambda: call_ln(entry, **args), ARG_NAMES[which])


@pytest.mark.parametrize("entry", LN_ENTRIES)
def test_weight_shape_of_two_dim_normalized_shape(entry):
    args = ln_args((3, 4, 6), (4, 6))
    args["w"] = make_input((6, 4), torch.float32, seed=4, offset=False)
    expect_error(lambda: call_ln(entry, **args), "weight")


@pytest.mark.parametrize("bad_shape", [(4, 5, 6), (5, 7), (1, 5, 7), (4, 1, 7), (4, 35)], ids=["D-1", "no-batch", "broadcast-0", "broadcast-1", "flattened"])
@pytest.mark.parametrize("entry", LN_ENTRIES)
def test_residual_shape_mismatch(entry, bad_shape):
    args = ln_args()
    args["res"] = make_input(bad_shape, torch.float32, seed=4, offset=False)
    expect_error(lambda: call_ln(entry, **args), "residual")


@pytest.mark.parametrize("x_dtype,bad_dtype", DTYPE_MISMATCHES + [pytest.param(torch.float16, torch.float64, id="f16-f64")])
@pytest.mark.parametrize("entry,which", ln_entry_args(["w", "b", "res"]))
def test_ln_dtype_mismatch(entry, which, x_dtype, bad_dtype):
    args = ln_args(dtype=x_dtype)
    args[which] = args[which].to(bad_dtype)
    expect_error(lambda: call_ln(entry, **args), ARG_NAMES[which])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("entry", LN_ENTRIES)
def test_ln_integer_input(entry, dtype):
    args = dict(ln_args(), w=None, b=None, res=None)
    args["x"] = (args["x"] * 10).to(dtype)
    expect_error(lambda: call_ln(entry, **args), DTYPE_MATCH)


@pytest.mark.parametrize("entry,which", ln_entry_args(["x", "w", "b", "res"]))
def test_ln_device_mismatch(entry, which):
    args = ln_args()
    args[which] = args[which].to(OTHER_DEVICE)
    expect_error(lambda: call_ln(entry, **args), DEVICE_MATCH)


def test_layer_norm_backward_bad_arguments():
    args = ln_args((4, 3, 6), (6,))
    x, ns, w, b = args["x"], [6], args["w"], args["b"]
    _, _, mean, rstd = OPS.layer_norm(x, ns, w, b, EPS, None)
    gy = make_input(x.shape, torch.float32, seed=5, offset=False)
    mask = [True, True, True]
    with pytest.raises(ERRORS, match="grad"):
        OPS.layer_norm_backward(gy[..., :5], None, x, ns, mean, rstd, w, mask)
    with pytest.raises(ERRORS, match="grad_sum|sum"):
        OPS.layer_norm_backward(gy, gy[:2], x, ns, mean, rstd, w, mask)
    with pytest.raises(ERRORS, match=r"(?i)statistic|mean|rstd"):
        OPS.layer_norm_backward(gy, None, x, ns, mean[:2], rstd, w, mask)
    with pytest.raises(ERRORS, match=r"(?i)statistic|rstd"):
        OPS.layer_norm_backward(gy, None, x, ns, mean, rstd[:, :2], w, mask)
    with pytest.raises(ERRORS, match=r"(?i)statistic|mean|rstd|dtype"):
        OPS.layer_norm_backward(gy, None, x, ns, mean.double(), rstd.double(), w, mask)
    with pytest.raises(ERRORS, match="normalized_shape"):
        OPS.layer_norm_backward(gy, None, x, [5], mean, rstd, w, mask)
    with pytest.raises(ERRORS, match="weight"):
        OPS.layer_norm_backward(gy, None, x, ns, mean, rstd, w[:5], mask)


# ---------------------------------------------------------------------------
# GroupNorm
# ---------------------------------------------------------------------------

GN_ENTRIES = ["gn-op", "gn-functional"]


def gn_args(shape=(4, 6, 5, 5), G=3, dtype=torch.float32, device="cpu"):
    x = make_input(shape, dtype, device)
    w, b = make_affine((shape[1],), dtype, device, seed=3)
    return dict(x=x, G=G, w=w, b=b)


def call_gn(entry, x, G, w, b, activation="relu"):
    if entry == "gn-op":
        return OPS.group_norm(x, G, w, b, EPS, activation, NEGATIVE_SLOPE)
    act = None if activation == "none" else activation
    return tnf.group_norm(x, G, w, b, EPS, activation=act, negative_slope=NEGATIVE_SLOPE)


@pytest.mark.parametrize("G", [4, 5, 12, 0, -1, -3], ids=["4-of-6", "5-of-6", "more-than-C", "zero", "minus-1", "minus-3"])
@pytest.mark.parametrize("entry", GN_ENTRIES)
def test_num_groups_invalid(entry, G):
    args = dict(gn_args(), G=G)
    expect_error(lambda: call_gn(entry, **args), "num_groups")


@pytest.mark.parametrize("bad_shape", [(7,), (5,), (3,), (1, 6), ()], ids=["C+1", "C-1", "G", "1xC", "0-D"])
@pytest.mark.parametrize("which", ["w", "b"])
@pytest.mark.parametrize("entry", GN_ENTRIES)
def test_gn_weight_bias_shape_mismatch(entry, which, bad_shape):
    args = gn_args()
    args[which] = bad_shaped(bad_shape, 4)
    expect_error(lambda: call_gn(entry, **args), ARG_NAMES[which])


@pytest.mark.parametrize("shape", [(6,), ()], ids=["1-D", "0-D"])
@pytest.mark.parametrize("entry", GN_ENTRIES)
def test_gn_input_rank_too_small(entry, shape):
    args = dict(gn_args(), w=None, b=None, G=1)
    args["x"] = make_input(shape, torch.float32, offset=False) if shape else torch.tensor(1.0)
    expect_error(lambda: call_gn(entry, **args), r"(?i)shape|dim|input|rank")


@pytest.mark.parametrize("x_dtype,bad_dtype", DTYPE_MISMATCHES)
@pytest.mark.parametrize("which", ["w", "b"])
@pytest.mark.parametrize("entry", GN_ENTRIES)
def test_gn_dtype_mismatch(entry, which, x_dtype, bad_dtype):
    args = gn_args(dtype=x_dtype)
    args[which] = args[which].to(bad_dtype)
    expect_error(lambda: call_gn(entry, **args), ARG_NAMES[which])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("entry", GN_ENTRIES)
def test_gn_integer_input(entry, dtype):
    args = dict(gn_args(), w=None, b=None)
    args["x"] = (args["x"] * 10).to(dtype)
    expect_error(lambda: call_gn(entry, **args), DTYPE_MATCH)


@pytest.mark.parametrize("which", ["x", "w", "b"])
@pytest.mark.parametrize("entry", GN_ENTRIES)
def test_gn_device_mismatch(entry, which):
    args = gn_args()
    args[which] = args[which].to(OTHER_DEVICE)
    expect_error(lambda: call_gn(entry, **args), DEVICE_MATCH)


@pytest.mark.parametrize("activation", ["gelu", "ReLU", "relu6", "tanh"])
@pytest.mark.parametrize("entry", GN_ENTRIES)
def test_gn_bad_activation(entry, activation):
    args = gn_args()
    expect_error(lambda: call_gn(entry, activation=activation, **args), "activation")


def test_gn_module_bad_activation():
    with pytest.raises(ERRORS, match="activation"):
        m = tnn.GroupNorm(2, 4, activation="gelu")
        m(make_input((2, 4, 3), torch.float32))


def test_group_norm_backward_bad_arguments():
    args = gn_args((4, 6, 5), 3)
    x, w, b = args["x"], args["w"], args["b"]
    _, mean, rstd = OPS.group_norm(x, 3, w, b, EPS, "relu", 0.0)
    gy = make_input(x.shape, torch.float32, seed=5, offset=False)
    mask = [True] * 3
    with pytest.raises(ERRORS, match="grad"):
        OPS.group_norm_backward(gy[:, :, :4], x, 3, mean, rstd, w, b, "relu", 0.0, mask)
    with pytest.raises(ERRORS, match=r"(?i)statistic|mean|rstd"):
        OPS.group_norm_backward(gy, x, 3, mean[:, :2], rstd, w, b, "relu", 0.0, mask)
    with pytest.raises(ERRORS, match=r"(?i)statistic|mean|rstd|num_groups"):
        OPS.group_norm_backward(gy, x, 2, mean, rstd, w, b, "relu", 0.0, mask)
    with pytest.raises(ERRORS, match=r"(?i)statistic|mean|rstd|dtype"):
        OPS.group_norm_backward(gy, x, 3, mean.double(), rstd.double(), w, b, "relu", 0.0, mask)
    with pytest.raises(ERRORS, match="activation"):
        OPS.group_norm_backward(gy, x, 3, mean, rstd, w, b, "gelu", 0.0, mask)
    with pytest.raises(ERRORS, match="weight"):
        OPS.group_norm_backward(gy, x, 3, mean, rstd, w[:5], b, "relu", 0.0, mask)


def test_gn_module_groups_not_dividing_channels_like_torch():
    with pytest.raises(ValueError):
        nn.GroupNorm(4, 6)
    with pytest.raises(ValueError):
        tnn.GroupNorm(4, 6)


# ---------------------------------------------------------------------------
# InstanceNorm
# ---------------------------------------------------------------------------

IN_ENTRIES = ["in-op", "in-functional"]


def in_args(shape=(4, 3, 5, 5), dtype=torch.float32, device="cpu"):
    x = make_input(shape, dtype, device)
    w, b, rm, rv = make_params(shape[1], dtype, device)
    return dict(x=x, w=w, b=b, rm=rm, rv=rv)


def call_in(entry, x, w, b, rm, rv):
    if entry == "in-op":
        return OPS.instance_norm(x, w, b, rm, rv, 0.1, EPS)
    return tnf.instance_norm(x, rm, rv, w, b, True, 0.1, EPS)


def expect_in_error(entry, args, match, stats=None):
    stats = stats or StatsUnchanged(args["rm"], args["rv"])
    expect_error(lambda: call_in(entry, **args), match, stats)


@pytest.mark.parametrize("shape", [(4, 3), (3,), ()], ids=["2-D", "1-D", "0-D"])
@pytest.mark.parametrize("entry", IN_ENTRIES)
def test_in_input_rank_too_small(entry, shape):
    args = in_args()
    args["x"] = make_input(shape, torch.float32, offset=False) if shape else torch.tensor(1.0)
    expect_in_error(entry, args, r"(?i)shape|dim|input|rank|spatial")


@pytest.mark.parametrize("bad_shape", BAD_CHANNEL_SHAPES)
@pytest.mark.parametrize("which", ["w", "b", "rm", "rv"])
@pytest.mark.parametrize("entry", IN_ENTRIES)
def test_in_per_channel_shape_mismatch(entry, which, bad_shape):
    args = in_args()
    stats = StatsUnchanged(args["rm"], args["rv"])
    args[which] = bad_shaped(bad_shape, 3)
    expect_in_error(entry, args, ARG_NAMES[which], stats)


@pytest.mark.parametrize("x_dtype,bad_dtype", DTYPE_MISMATCHES)
@pytest.mark.parametrize("which", ["w", "b", "rm", "rv"])
@pytest.mark.parametrize("entry", IN_ENTRIES)
def test_in_dtype_mismatch(entry, which, x_dtype, bad_dtype):
    args = in_args(dtype=x_dtype)
    stats = StatsUnchanged(args["rm"], args["rv"])
    args[which] = args[which].to(bad_dtype)
    expect_in_error(entry, args, ARG_NAMES[which], stats)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("entry", IN_ENTRIES)
def test_in_integer_input(entry, dtype):
    args = in_args()
    args["x"] = (args["x"] * 10).to(dtype)
    expect_in_error(entry, args, DTYPE_MATCH)


@pytest.mark.parametrize("which", ["x", "w", "b", "rm", "rv"])
@pytest.mark.parametrize("entry", IN_ENTRIES)
def test_in_device_mismatch(entry, which):
    args = in_args()
    args[which] = args[which].to(OTHER_DEVICE)
    stats = StatsUnchanged(args["rm"], args["rv"])
    expect_in_error(entry, args, DEVICE_MATCH, stats)


@pytest.mark.parametrize("entry", IN_ENTRIES)
def test_in_running_stats_must_come_together(entry):
    args = in_args()
    stats = StatsUnchanged(args["rm"], args["rv"])
    args["rv"] = None
    expect_in_error(entry, args, "running_(mean|var)", stats)


@pytest.mark.parametrize(
    "cls,shape",
    [("InstanceNorm1d", (2, 3, 4, 4)), ("InstanceNorm1d", (3,)), ("InstanceNorm2d", (3, 4)), ("InstanceNorm2d", (2, 3, 4, 4, 4)), ("InstanceNorm3d", (2, 3, 4))],
    ids=["1d-4D", "1d-1D", "2d-2D", "2d-5D", "3d-3D"],
)
def test_in_module_wrong_rank_like_torch(cls, shape):
    with pytest.raises(ValueError):
        getattr(nn, cls)(3, track_running_stats=True)(make_input(shape, torch.float32))
    m = getattr(tnn, cls)(3, track_running_stats=True)
    stats = StatsUnchanged(m.running_mean, m.running_var, m.num_batches_tracked)
    with pytest.raises(ValueError, match=r"(?i)(\dD.*input|dim)"):
        m(make_input(shape, torch.float32))
    stats.check()


@pytest.mark.parametrize("bad", ["channels", "dtype", "device"])
def test_in_module_rejected_input_leaves_state(bad):
    m = tnn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    _, _, rm, rv = make_params(3, torch.float32, seed=2)
    with torch.no_grad():
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
    stats = StatsUnchanged(m.running_mean, m.running_var, m.num_batches_tracked, m.weight, m.bias)
    if bad == "channels":
        x = make_input((2, 4, 3, 3), torch.float32)
    elif bad == "dtype":
        x = make_input((2, 3, 3, 3), torch.float64)
    else:
        x = make_input((2, 3, 3, 3), torch.float32).to(OTHER_DEVICE)
    with pytest.raises(ERRORS):
        m(x).cpu()
    stats.check()


# ---------------------------------------------------------------------------
# Modules of LayerNorm / RMSNorm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
def test_ln_module_wrong_input_shape(name):
    m = getattr(tnn, name)((5, 7))
    with pytest.raises(ERRORS, match="normalized_shape"):
        m(make_input((3, 7, 5), torch.float32))
    with pytest.raises(ERRORS, match="residual"):
        m(make_input((3, 5, 7), torch.float32), residual=make_input((1, 5, 7), torch.float32))
    with pytest.raises(ERRORS, match=r"weight|dtype|type"):
        m(make_input((3, 5, 7), torch.float64))


# ---------------------------------------------------------------------------
# Compatibility with torch's own refusals (found with PyTorch's test inputs).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape,groups", [((2, 0, 4), 1), ((2, 4, 0), 2), ((2, 4, 3, 0), 2), ((3, 0), 1)],
                         ids=["zero-channels", "zero-length", "zero-width", "2d-zero-channels"])
@pytest.mark.parametrize("entry", GN_ENTRIES)
def test_gn_zero_channels_or_spatial_size_raise_as_torch(entry, shape, groups):
    x = torch.randn(shape)
    with pytest.raises(RuntimeError):  # torch's own behaviour, which ours follows
        torch.nn.functional.group_norm(x, groups)
    expect_error(lambda: call_gn(entry, x, groups, None, None), "greater than 0", types=RuntimeError)


@pytest.mark.parametrize("shape", [(2, 0, 4), (2, 4, 0)], ids=["zero-channels", "zero-length"])
def test_in_zero_channels_or_spatial_size_allowed_as_torch(shape):
    """instance_norm shares group_norm's kernels but, as torch's, accepts these."""
    x = torch.randn(shape)
    assert tnf.instance_norm(x).shape == torch.nn.functional.instance_norm(x).shape == shape


def _batch_norm_modules(eps):
    from torchnorm.nn import SyncBatchNorm
    return [tnn.BatchNorm1d(3, eps=eps), tnn.BatchNorm2d(3, eps=eps), tnn.BatchNorm3d(3, eps=eps),
            tnn.BatchNormAct2d(3, eps=eps), SyncBatchNorm(3, eps=eps), tnn.SequenceBatchNorm1d(3, eps=eps)]


_BN_INPUT = {"BatchNorm1d": (4, 3), "BatchNorm2d": (4, 3, 2, 2), "BatchNorm3d": (4, 3, 2, 2, 2),
             "BatchNormAct2d": (4, 3, 2, 2), "SyncBatchNorm": (4, 3, 2, 2), "SequenceBatchNorm1d": (5, 4, 3)}


@pytest.mark.parametrize("eps,train,message", [(0.0, True, "positive during training"),
                                                (-1e-5, True, "positive during training"),
                                                (-1e-5, False, "non-negative")],
                         ids=["zero-train", "negative-train", "negative-eval"])
def test_bn_modules_refuse_eps_as_torch(eps, train, message):
    """torch.nn's BatchNorm modules raise ValueError at forward for eps <= 0 in
    training and eps < 0 in evaluation; ours do the same, before touching any
    state."""
    torch_bn = torch.nn.BatchNorm2d(3, eps=eps).train(train)
    with pytest.raises(ValueError, match=message):
        torch_bn(torch.randn(4, 3, 2, 2))
    for module in _batch_norm_modules(eps):
        module.train(train)
        name = type(module).__name__
        stats = StatsUnchanged(module.running_mean, module.running_var, module.num_batches_tracked)
        x = torch.randn(_BN_INPUT[name])
        expect_error(lambda: module(x), message, stats=stats, types=ValueError)


def test_bn_modules_accept_zero_eps_in_evaluation_as_torch():
    x = torch.randn(4, 3, 2, 2)
    ours, theirs = tnn.BatchNorm2d(3, eps=0.0).eval(), torch.nn.BatchNorm2d(3, eps=0.0).eval()
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("fn", ["batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm"])
def test_functionals_refuse_negative_eps(fn):
    """Documented: a negative eps is refused (torch computes with it, except
    batch_norm, which refuses it too)."""
    x = torch.randn(4, 3, 5)
    calls = {"batch_norm": lambda: tnf.batch_norm(x, None, None, training=True, eps=-1e-3),
             "layer_norm": lambda: tnf.layer_norm(x, (5,), eps=-1e-3),
             "rms_norm": lambda: tnf.rms_norm(x, (5,), eps=-1e-3),
             "group_norm": lambda: tnf.group_norm(x, 3, eps=-1e-3),
             "instance_norm": lambda: tnf.instance_norm(x, eps=-1e-3)}
    expect_error(calls[fn], "eps", types=RuntimeError)
    assert "negative eps" in getattr(tnf, fn).__doc__
