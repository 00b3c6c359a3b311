"""BatchNorm ops and torchnorm.functional.batch_norm: forward, gradients and running
statistics against torch.nn.functional.batch_norm (+ torch's activation) and the
float64 torchnorm.reference, across ranks, dtypes, layouts and options; the ops
directly (saved statistics, output masks); gradcheck; empty, odd,
large and numerically hard inputs. (opcheck: tests/test_opcheck.py.)
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import torchnorm  # noqa: F401  (registers the ops)
import torchnorm.functional as tnf
import torchnorm.reference as tnref
from conftest import (
    ACTIVATIONS,
    DEVICES,
    DTYPES_ALL,
    MODES,
    NEGATIVE_SLOPE,
    act_name,
    apply_layout,
    assert_close,
    assert_grads_close,
    batch_norm_inputs,
    clone_opt,
    grads_of,
    leaf,
    make_input,
    make_params,
    memory_format_of,
    poison,
    randn,
    to64,
    torch_act,
)
from tolerances import GRADCHECK, LARGE_MEAN_VARIANCE

OPS = torch.ops.torchnorm
EPS = 1e-5
MOMENTUM = 0.1

# (shape, layout): every rank, the dense layouts, non-contiguous views, C=1,
# odd sizes, batch 1 with spatial size > 1, channel counts not divisible by 4.
CASES = [
    pytest.param((6, 5), "contiguous", id="2d"),
    pytest.param((6, 5), "transposed", id="2d-transposed"),
    pytest.param((2, 123), "contiguous", id="2d-C123"),
    pytest.param((4, 3, 7), "contiguous", id="3d"),
    pytest.param((4, 3, 7), "sliced", id="3d-sliced"),
    pytest.param((2, 6, 123), "contiguous", id="3d-L123"),
    pytest.param((1, 7, 9), "contiguous", id="3d-batch1"),
    pytest.param((5, 1, 6), "contiguous", id="3d-C1"),
    pytest.param((3, 4, 7, 5), "contiguous", id="4d"),
    pytest.param((3, 4, 7, 5), "channels_last", id="4d-cl"),
    pytest.param((3, 17, 5, 7), "transposed", id="4d-transposed"),
    pytest.param((1, 5, 3, 3), "channels_last", id="4d-batch1-cl"),
    pytest.param((2, 3, 3, 5, 4), "contiguous", id="5d"),
    pytest.param((2, 3, 3, 5, 4), "channels_last_3d", id="5d-cl3d"),
]

REF_CASES = [
    pytest.param((6, 5), "contiguous", id="2d"),
    pytest.param((4, 3, 7), "transposed", id="3d-transposed"),
    pytest.param((5, 1, 6), "contiguous", id="3d-C1"),
    pytest.param((2, 6, 61), "sliced", id="3d-sliced-L61"),
    pytest.param((3, 4, 7, 5), "channels_last", id="4d-cl"),
    pytest.param((1, 5, 3, 3), "contiguous", id="4d-batch1"),
    pytest.param((2, 3, 3, 5, 4), "channels_last_3d", id="5d-cl3d"),
]


# ---------------------------------------------------------------------------
# Runners: the same call through torchnorm, torch and the float64 reference.
# ---------------------------------------------------------------------------


def _run_fused(mod, x, w, b, rm, rv, res, training, activation, grad_out, momentum, eps):
    """mod.batch_norm (torchnorm.functional or the reference) on leaves, and its gradients."""
    out = mod.batch_norm(x, rm, rv, weight=w, bias=b, training=training, momentum=momentum, eps=eps,
                         activation=activation, negative_slope=NEGATIVE_SLOPE, residual=res)
    return out, grads_of([out], [x, w, b, res], [grad_out])


def run_torchnorm(x, w, b, rm, rv, res, training, activation, grad_out, momentum=MOMENTUM, eps=EPS):
    x, w, b, res = (leaf(t) for t in (x, w, b, res))
    return _run_fused(tnf, x, w, b, rm, rv, res, training, activation, grad_out, momentum, eps)


def run_torch(x, w, b, rm, rv, res, training, activation, grad_out, momentum=MOMENTUM, eps=EPS):
    x, w, b, res = (leaf(t) for t in (x, w, b, res))
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if res is not None:
        y = y + res
    out = torch_act(y, activation)
    return out, grads_of([out], [x, w, b, res], [grad_out])


def run_reference(x, w, b, rm, rv, res, training, activation, grad_out, momentum=MOMENTUM, eps=EPS):
    """float64 on the CPU; rm / rv are float64 CPU tensors updated in place."""
    x, w, b, res = (leaf(to64(t)) for t in (x, w, b, res))
    out, grads = _run_fused(tnref, x, w, b, rm, rv, res, training, activation, to64(grad_out), momentum, eps)
    assert out.dtype == torch.float64
    return out, grads


GRAD_NAMES = ["grad_input", "grad_weight", "grad_bias", "grad_residual"]


# ---------------------------------------------------------------------------
# The dense matrix against torch (float32 / float64).
# ---------------------------------------------------------------------------


@pytest.mark.slow  # the whole matrix: `pytest -m "not slow"` leaves it out
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_functional_matches_torch(device, shape, layout, dtype, mode, activation, with_residual, affine):
    training, track = mode
    x, w, b, rm, rv, res, gy = batch_norm_inputs(shape, layout, dtype, dtype, device, affine, track, with_residual)
    x_before, res_before = x.clone(), clone_opt(res)
    rm_t, rv_t = clone_opt(rm), clone_opt(rv)

    poison(device)
    out, grads = run_torchnorm(x, w, b, rm, rv, res, training, activation, gy)
    exp, exp_grads = run_torch(x, w, b, rm_t, rv_t, res, training, activation, gy)

    assert out.dtype == dtype and out.device == x.device
    assert_close(out, exp, dtype, "forward", "output")
    if layout in ("contiguous", "channels_last", "channels_last_3d"):
        assert memory_format_of(out) == memory_format_of(x), f"output strides {out.stride()} for input {x.stride()}"
    assert_grads_close(GRAD_NAMES, grads, exp_grads, dtype)
    if track:
        assert_close(rm, rm_t, dtype, "stats", "running_mean")
        assert_close(rv, rv_t, dtype, "stats", "running_var")
    # inputs are not written
    assert torch.equal(x, x_before)
    if res is not None:
        assert torch.equal(res, res_before)


# ---------------------------------------------------------------------------
# Every dtype (half with half or float32 parameters) against the float64 reference.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("shape,layout", REF_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_functional_matches_reference(device, shape, layout, dtypes, mode, activation, with_residual, affine):
    dtype, pdtype = dtypes
    training, track = mode
    x, w, b, rm, rv, res, gy = batch_norm_inputs(shape, layout, dtype, pdtype, device, affine, track, with_residual, seed=1)
    rm64, rv64 = to64(rm), to64(rv)

    poison(device)
    out, grads = run_torchnorm(x, w, b, rm, rv, res, training, activation, gy)
    exp, exp_grads = run_reference(x, w, b, rm64, rv64, res, training, activation, gy)

    assert out.dtype == dtype, f"output dtype {out.dtype} for a {dtype} input"
    assert_close(out, exp, dtype, "forward", "output")
    assert_grads_close(GRAD_NAMES, grads, exp_grads, dtype, inputs=(x, w, b, res))
    if track:
        assert rm.dtype == pdtype and rv.dtype == pdtype
        assert_close(rm, rm64, pdtype, "stats", "running_mean")
        assert_close(rv, rv64, pdtype, "stats", "running_var")


# ---------------------------------------------------------------------------
# Running statistics over several steps.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, 0.35, 1.0])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_running_stats_several_steps_vs_torch(device, layout, momentum):
    shape = (3, 5, 4, 6)
    _, _, rm, rv = make_params(5, torch.float32, device, seed=7)
    w, b, _, _ = make_params(5, torch.float32, device, seed=8)
    rm_t, rv_t = rm.clone(), rv.clone()
    for step in range(4):
        x = make_input(shape, torch.float32, device, layout, seed=50 + step, scale=1.0 + step)
        out = tnf.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=EPS, activation="relu")
        exp = F.relu(F.batch_norm(x, rm_t, rv_t, w, b, True, momentum, EPS))
        assert_close(out, exp, torch.float32, "forward", f"output step {step}")
        assert_close(rm, rm_t, torch.float32, "stats", f"running_mean step {step}")
        assert_close(rv, rv_t, torch.float32, "stats", f"running_var step {step}")
    # then eval uses exactly these statistics
    x = make_input(shape, torch.float32, device, layout, seed=99)
    out = tnf.batch_norm(x, rm, rv, w, b, training=False, eps=EPS)
    assert_close(out, F.batch_norm(x, rm_t, rv_t, w, b, False, momentum, EPS), torch.float32, "forward", "eval")


@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("device", DEVICES)
def test_running_stats_several_steps_vs_reference(device, dtypes):
    dtype, pdtype = dtypes
    shape = (4, 3, 5, 5)
    _, _, rm, rv = make_params(3, pdtype, device, seed=9)
    rm64, rv64 = to64(rm), to64(rv)
    for step in range(3):
        x = make_input(shape, dtype, device, "channels_last", seed=60 + step)
        tnf.batch_norm(x, rm, rv, training=True, momentum=0.2, eps=EPS)
        tnref.batch_norm(to64(x), rm64, rv64, training=True, momentum=0.2, eps=EPS)
        assert rm.dtype == pdtype and rv.dtype == pdtype
        assert_close(rm, rm64, pdtype, "stats", f"running_mean step {step}")
        assert_close(rv, rv64, pdtype, "stats", f"running_var step {step}")


def test_reference_running_stats_follow_torch():
    """The reference itself: unbiased running variance, momentum, in place."""
    x = make_input((4, 3, 5), torch.float64, seed=3)
    _, _, rm, rv = make_params(3, torch.float64, seed=4)
    rm_t, rv_t = rm.clone(), rv.clone()
    out = tnref.batch_norm(x, rm, rv, training=True, momentum=0.3, eps=1e-3)
    exp = F.batch_norm(x, rm_t, rv_t, None, None, True, 0.3, 1e-3)
    assert_close(out, exp, torch.float64, "forward", "reference output")
    assert_close(rm, rm_t, torch.float64, "stats", "reference running_mean")
    assert_close(rv, rv_t, torch.float64, "stats", "reference running_var")
    # eval mode uses eps (the article forgot it)
    out = tnref.batch_norm(x, rm, rv, training=False, eps=0.5)
    assert_close(out, F.batch_norm(x, rm_t, rv_t, None, None, False, 0.1, 0.5), torch.float64, "forward", "eval eps")


# ---------------------------------------------------------------------------
# Layouts.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "shape,layout",
    [((2, 3, 4, 5), "contiguous"), ((2, 3, 4, 5), "channels_last"), ((2, 3, 2, 4, 5), "channels_last_3d")],
    ids=["nchw", "cl", "cl3d"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("device", DEVICES)
def test_output_and_grad_layout_follow_input(device, dtype, shape, layout, training):
    x = make_input(shape, dtype, device, layout).requires_grad_()
    res = make_input(shape, dtype, device, layout, seed=5).requires_grad_()
    w, b, rm, rv = make_params(shape[1], torch.float32, device)
    out = tnf.batch_norm(x, rm, rv, w, b, training=training, activation="relu", residual=res)
    fmt = memory_format_of(x)
    assert out.is_contiguous(memory_format=fmt), f"{layout} input gave output strides {out.stride()}"
    gx, gres = torch.autograd.grad(out, [x, res], torch.ones_like(out))
    assert gx.is_contiguous(memory_format=fmt), f"{layout} input gave grad_input strides {gx.stride()}"
    train_out = OPS.batch_norm_train(x.detach(), w, b, None, None, 0.1, EPS, "none", 0.0, None)[0]
    assert train_out.is_contiguous(memory_format=fmt)
    eval_out = OPS.batch_norm_eval(x.detach(), rm, rv, w, b, EPS, "none", 0.0, None)
    assert eval_out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("x_layout,res_layout", [("channels_last", "contiguous"), ("contiguous", "channels_last"), ("channels_last", "transposed")])
@pytest.mark.parametrize("device", DEVICES)
def test_residual_in_another_layout(device, x_layout, res_layout, training):
    shape = (3, 6, 5, 4)
    x, w, b, rm, rv, _, gy = batch_norm_inputs(shape, x_layout, torch.float32, torch.float32, device, True, True, False)
    res = make_input(shape, torch.float32, device, res_layout, seed=77)
    gy = apply_layout(gy, "channels_last")
    rm_t, rv_t = rm.clone(), rv.clone()
    out, grads = run_torchnorm(x, w, b, rm, rv, res, training, "silu", gy)
    exp, exp_grads = run_torch(x, w, b, rm_t, rv_t, res, training, "silu", gy)
    assert_close(out, exp, torch.float32, "forward", "output")
    for name, g, e in zip(GRAD_NAMES, grads, exp_grads):
        assert_close(g, e, torch.float32, "grad", name)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_with_expanded_grad_output(device, training, layout):
    """out.sum().backward() hands the backward a stride-0 grad_output."""
    shape = (3, 4, 5, 3)
    x = make_input(shape, torch.float32, device, layout).requires_grad_()
    w, b, rm, rv = (t.requires_grad_() if i < 2 else t for i, t in enumerate(make_params(4, torch.float32, device)))
    tnf.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training, activation="leaky_relu", negative_slope=NEGATIVE_SLOPE).sum().backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    F.leaky_relu(F.batch_norm(x2, rm.clone(), rv.clone(), w2, b2, training), NEGATIVE_SLOPE).sum().backward()
    for name, g, e in [("input", x.grad, x2.grad), ("weight", w.grad, w2.grad), ("bias", b.grad, b2.grad)]:
        assert_close(g, e, torch.float32, "grad", name)


@pytest.mark.parametrize("device", DEVICES)
def test_default_negative_slope_is_torchs(device):
    x = make_input((4, 3, 5), torch.float32, device)
    out = tnf.batch_norm(x, None, None, training=True, activation="leaky_relu")
    assert_close(out, F.leaky_relu(F.batch_norm(x, None, None, training=True)), torch.float32, "forward", "slope 0.01")


# ---------------------------------------------------------------------------
# The ops themselves: saved statistics and the output mask.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("shape,layout", [((7, 3), "contiguous"), ((3, 5, 4, 3), "channels_last"), ((2, 3, 13), "contiguous")])
@pytest.mark.parametrize("device", DEVICES)
def test_op_train(device, shape, layout, dtypes, activation, with_residual):
    dtype, pdtype = dtypes
    x, w, b, rm, rv, res, _ = batch_norm_inputs(shape, layout, dtype, pdtype, device, True, True, with_residual, seed=11)
    rm64, rv64 = to64(rm), to64(rv)
    poison(device)
    out, mean, rstd = OPS.batch_norm_train(x, w, b, rm, rv, 0.25, 1e-3, act_name(activation), NEGATIVE_SLOPE, res)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    C = shape[1]
    assert mean.dtype == acc and rstd.dtype == acc, (mean.dtype, rstd.dtype)
    assert tuple(mean.shape) == (C,) and tuple(rstd.shape) == (C,)
    assert out.dtype == dtype and tuple(out.shape) == shape
    x64 = to64(x)
    dims = [0] + list(range(2, x64.dim()))
    exp_mean = x64.mean(dims)
    exp_rstd = (x64.var(dims, unbiased=False) + 1e-3).rsqrt()
    assert_close(mean, exp_mean, acc, "stats", "saved mean")
    assert_close(rstd, exp_rstd, acc, "stats", "saved rstd")
    exp = tnref.batch_norm(
        x64, rm64, rv64, to64(w), to64(b), training=True, momentum=0.25, eps=1e-3,
        activation=activation, negative_slope=NEGATIVE_SLOPE, residual=to64(res),
    )
    assert_close(out, exp, dtype, "forward", "output")
    assert_close(rm, rm64, pdtype, "stats", "running_mean")
    assert_close(rv, rv64, pdtype, "stats", "running_var")


@pytest.mark.parametrize("device", DEVICES)
def test_op_train_without_running_stats_or_affine(device):
    x = make_input((5, 4, 3), torch.float32, device)
    out, mean, rstd = OPS.batch_norm_train(x, None, None, None, None, 0.1, EPS, "none", 0.0, None)
    exp = F.batch_norm(x, None, None, training=True, eps=EPS)
    assert_close(out, exp, torch.float32, "forward", "output")
    assert_close(mean, x.mean((0, 2)), torch.float32, "stats", "mean")


@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("shape,layout", [((7, 3), "contiguous"), ((3, 5, 4, 3), "channels_last"), ((2, 3, 2, 3, 5), "channels_last_3d")])
@pytest.mark.parametrize("device", DEVICES)
def test_op_eval(device, shape, layout, dtypes, activation, with_residual):
    dtype, pdtype = dtypes
    x, w, b, rm, rv, res, _ = batch_norm_inputs(shape, layout, dtype, pdtype, device, True, True, with_residual, seed=12)
    rm_before, rv_before = rm.clone(), rv.clone()
    poison(device)
    out = OPS.batch_norm_eval(x, rm, rv, w, b, 1e-2, act_name(activation), NEGATIVE_SLOPE, res)
    assert out.dtype == dtype and tuple(out.shape) == shape
    exp = tnref.batch_norm(
        to64(x), to64(rm), to64(rv), to64(w), to64(b), training=False, eps=1e-2,
        activation=activation, negative_slope=NEGATIVE_SLOPE, residual=to64(res),
    )
    assert_close(out, exp, dtype, "forward", "output")
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before), "eval changed the running statistics"


@pytest.mark.parametrize("mask", list(itertools.product([True, False], repeat=4)), ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device", DEVICES)
def test_op_backward_output_mask(device, training, mask):
    shape = (4, 3, 5)
    dtype = torch.float32
    x, w, b, rm, rv, res, gy = batch_norm_inputs(shape, "contiguous", dtype, dtype, device, True, True, True, seed=13)
    activation = "silu"
    if training:
        _, mean, rstd = OPS.batch_norm_train(x, w, b, None, None, 0.1, EPS, activation, 0.0, res)
    else:
        mean, rstd = rm, (rv + EPS).rsqrt()
    poison(device)
    got = OPS.batch_norm_backward(gy, x, w, b, res, mean, rstd, training, activation, 0.0, list(mask))
    assert len(got) == 4
    _, exp = run_reference(x, w, b, to64(rm), to64(rv), res, training, activation, gy, eps=EPS)
    for name, m, g, e in zip(GRAD_NAMES, mask, got, exp):
        if m:
            assert_close(g, e, dtype, "grad", name)
        else:
            assert tuple(g.shape) == (0,), f"masked-out {name} has shape {tuple(g.shape)}, expected (0,)"


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device", DEVICES)
def test_op_backward_dtypes(device, training, dtypes, activation):
    dtype, pdtype = dtypes
    shape = (3, 4, 3, 5)
    x, w, b, rm, rv, res, gy = batch_norm_inputs(shape, "channels_last", dtype, pdtype, device, True, True, True, seed=14)
    act = act_name(activation)
    if training:
        _, mean, rstd = OPS.batch_norm_train(x, w, b, None, None, 0.1, EPS, act, NEGATIVE_SLOPE, res)
    else:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        mean, rstd = rm.to(acc), (rv.to(acc) + EPS).rsqrt()
    got = OPS.batch_norm_backward(gy, x, w, b, res, mean, rstd, training, act, NEGATIVE_SLOPE, [True] * 4)
    _, exp = run_reference(x, w, b, to64(rm), to64(rv), res, training, activation, gy, eps=EPS)
    for name, g, e, src in zip(GRAD_NAMES, got, exp, (x, w, b, res)):
        assert g.dtype == src.dtype, f"{name} dtype {g.dtype}, expected {src.dtype}"
        assert_close(g, e, dtype, "grad", name)


# ---------------------------------------------------------------------------
# Empty batch, one larger case, numerics.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape,layout",
    [((0, 3), "contiguous"), ((0, 3, 5), "contiguous"), ((0, 3, 4, 4), "contiguous"), ((0, 3, 4, 4), "channels_last"), ((0, 2, 2, 3, 3), "channels_last_3d")],
    ids=["2d", "3d", "4d", "4d-cl", "5d-cl3d"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device, shape, layout, mode):
    training, track = mode
    x, w, b, rm, rv, res, gy = batch_norm_inputs(shape, layout, torch.float32, torch.float32, device, True, track, True)
    rm_before, rv_before = clone_opt(rm), clone_opt(rv)
    out, (gx, gw, gb, gres) = run_torchnorm(x, w, b, rm, rv, res, training, "relu", gy)
    assert tuple(out.shape) == shape and out.dtype == x.dtype
    assert tuple(gx.shape) == shape and tuple(gres.shape) == shape
    for name, g in (("grad_weight", gw), ("grad_bias", gb)):
        assert g is None or (tuple(g.shape) == (shape[1],) and torch.all(g == 0)), f"{name} of an empty batch: {g}"
    if track:
        assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before), "an empty batch changed the running statistics"
    # the ops directly
    if training:
        o = OPS.batch_norm_train(x, w, b, rm, rv, 0.1, EPS, "relu", 0.0, res)[0]
    else:
        o = OPS.batch_norm_eval(x, rm, rv, w, b, EPS, "relu", 0.0, res)
    assert tuple(o.shape) == shape
    if track:
        assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_large_case(device, layout):
    """One case big enough for every parallel / vectorized path, with tails:
    C=67 and H*W=61*59 are not multiples of any vector width."""
    shape = (4, 67, 61, 59)
    dtype = torch.float32
    x, w, b, rm, rv, res, gy = batch_norm_inputs(shape, layout, dtype, dtype, device, True, True, True, seed=21)
    rm_t, rv_t = rm.clone(), rv.clone()
    rm64, rv64 = to64(rm), to64(rv)
    poison(device, x.numel() * 4)
    out, grads = run_torchnorm(x, w, b, rm, rv, res, True, "relu", gy)
    exp, exp_grads = run_torch(x, w, b, rm_t, rv_t, res, True, "relu", gy)
    ref, ref_grads = run_reference(x, w, b, rm64, rv64, res, True, "relu", gy)
    assert_close(out, exp, dtype, "forward", "output vs torch")
    assert_close(out, ref, dtype, "forward", "output vs reference")
    for name, g, e, r in zip(GRAD_NAMES, grads, exp_grads, ref_grads):
        assert_close(g, e, dtype, "grad", f"{name} vs torch")
        assert_close(g, r, dtype, "grad", f"{name} vs reference")
    assert_close(rm, rm64, dtype, "stats", "running_mean")
    assert_close(rv, rv64, dtype, "stats", "running_var")
    # eval on the same tensor
    out = tnf.batch_norm(x, rm, rv, w, b, training=False, activation="silu", residual=res)
    ref = tnref.batch_norm(to64(x), rm64, rv64, to64(w), to64(b), training=False, activation="silu", residual=to64(res))
    assert_close(out, ref, dtype, "forward", "eval output vs reference")


@pytest.mark.parametrize(
    "dtype,mean,std",
    [(torch.float16, 1e4, 1.0), (torch.float16, 1e4, 8.0), (torch.float16, -1e3, 1.0), (torch.float32, 1e4, 1.0)],
)
@pytest.mark.parametrize("device", DEVICES)
def test_large_mean_variance(device, dtype, mean, std):
    """float16 input with mean 1e4 and std 1: the variance must come from the
    centred values (Welford / two-pass), never E[x^2] - E[x]^2."""
    shape = (16, 3, 16, 16)
    x = randn(shape, 31, dtype, device, scale=std, offset=mean)
    x64 = to64(x)
    dims = (0, 2, 3)
    var64 = x64.var(dims, unbiased=False)
    _, _, rm, rv = make_params(3, torch.float32, device)
    rm64, rv64 = to64(rm), to64(rv)
    out, saved_mean, rstd = OPS.batch_norm_train(x, None, None, rm, rv, 0.1, EPS, "none", 0.0, None)
    var = 1.0 / rstd.double() ** 2 - EPS
    assert torch.isfinite(rstd).all() and (rstd > 0).all(), f"rstd {rstd}"
    assert (var > -EPS * 1e-3).all(), f"negative variance {var} (float64 truth {var64})"
    torch.testing.assert_close(var.cpu(), var64, **LARGE_MEAN_VARIANCE)
    assert_close(saved_mean, x64.mean(dims), torch.float32, "stats", "saved mean")
    ref = tnref.batch_norm(x64, rm64, rv64, training=True, momentum=0.1, eps=EPS)
    if dtype == torch.float16:
        # (for float32 input the float32 mean alone is ~ulp(1e4) off, beyond the forward tolerance)
        assert_close(out, ref, dtype, "forward", "output")
    assert_close(rm, rm64, torch.float32, "stats", "running_mean")
    assert_close(rv, rv64, torch.float32, "stats", "running_var")
    assert (rv > 0).all()


# ---------------------------------------------------------------------------
# gradcheck (float64) (opcheck: tests/test_opcheck.py).
# ---------------------------------------------------------------------------


def _gradcheck_inputs(shape, training, activation, with_residual, affine, device):
    """Small float64 inputs; for relu / leaky_relu, a seed whose pre-activation
    stays away from the kink at 0 (finite differences would straddle it)."""
    for seed in range(200):
        x = make_input(shape, torch.float64, device, seed=seed, scale=1.0)
        w, b, rm, rv = make_params(shape[1], torch.float64, device, seed=seed + 1, affine=affine)
        res = make_input(shape, torch.float64, device, seed=seed + 2, scale=1.0, offset=False) if with_residual else None
        if activation not in ("relu", "leaky_relu"):
            break
        pre = tnref.batch_norm(to64(x), to64(rm), to64(rv), to64(w), to64(b), training=training, residual=to64(res))
        if pre.abs().min() > 1e-3:
            break
    return x, w, b, rm, rv, res


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(5, 2), (3, 2, 3), (2, 3, 2, 2)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_functional(device, shape, training, activation, with_residual, affine):
    x, w, b, rm, rv, res = _gradcheck_inputs(shape, training, activation, with_residual, affine, device)
    names = ["x", "w", "b", "res"]
    present = [(n, t) for n, t in zip(names, (x, w, b, res)) if t is not None]

    def fn(*args):
        kw = dict(zip([n for n, _ in present], args))
        return tnf.batch_norm(
            kw["x"],
            rm.clone(),  # fresh copies: gradcheck calls fn many times
            rv.clone(),
            weight=kw.get("w"),
            bias=kw.get("b"),
            training=training,
            momentum=0.1,
            eps=1e-3,
            activation=activation,
            negative_slope=NEGATIVE_SLOPE,
            residual=kw.get("res"),
        )

    args = [t.detach().requires_grad_() for _, t in present]
    assert torch.autograd.gradcheck(fn, args, **GRADCHECK)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_ops(training, layout):
    """The registered autograd of the ops themselves (output 0)."""
    shape = (2, 3, 2, 3)
    x, w, b, rm, rv, res = _gradcheck_inputs(shape, training, "silu", True, True, "cpu")
    x = apply_layout(x, layout)
    res = apply_layout(res, layout)

    if training:
        def fn(x, w, b, res):
            return OPS.batch_norm_train(x, w, b, None, None, 0.1, 1e-3, "silu", 0.0, res)[0]
    else:
        def fn(x, w, b, res):
            return OPS.batch_norm_eval(x, rm, rv, w, b, 1e-3, "silu", 0.0, res)

    args = [t.detach().requires_grad_() for t in (x, w, b, res)]
    assert torch.autograd.gradcheck(fn, args, **GRADCHECK)


def test_ops_are_registered_by_import():
    for name in ("batch_norm_train", "batch_norm_eval", "batch_norm_backward"):
        assert hasattr(torch.ops.torchnorm, name), name
    schema = str(OPS.batch_norm_train.default._schema)
    assert "Tensor(a!)" in schema and "Tensor(b!)" in schema, f"running stats must be declared mutable: {schema}"
