"""The frozen (eval-mode BatchNorm) Conv + BN op, conv_bn_frozen, through the
blocks: what backward keeps (never the conv output nor a folded weight), residuals
that broadcast or promote, the choice between folding the weight and scaling
the smaller conv output (with zero scales), bfloat16 against float64, every
device, torch.compile; the argument checks of conv_bn_frozen and of
conv_bn_train (which shares them), in eager and in their fake kernels.
(opcheck of both: tests/test_opcheck.py.)
"""
import copy

import pytest
import torch

import torchnorm  # noqa: F401  (registers the ops)
from conftest import (
    ACTIVATIONS,
    DEVICES,
    SavedTensors,
    act_name,
    assert_close,
    make_conv_bn_block,
    make_input,
    unfused_conv_bn,
)
from op_samples import conv_bn_train_call

OPS = torch.ops.torchnorm
EPS = 1e-5

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---------------------------------------------------------------------------
# conv_bn_frozen
# ---------------------------------------------------------------------------


# (id, block kwargs, input shape): the two paths of the frozen op (fold the
# weight, scale the smaller output) for a conv and a transposed conv.
FROZEN_KINDS = [
    ("fold", dict(), (2, 5, 7, 9)),
    ("scaled-output", dict(stride=4), (2, 5, 7, 9)),
    ("transposed-fold", dict(transposed=True), (2, 5, 7, 9)),
    ("transposed-scaled-output", dict(transposed=True), (1, 5, 1, 2)),
]


@pytest.mark.parametrize("kind", FROZEN_KINDS, ids=[k[0] for k in FROZEN_KINDS])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
def test_frozen_block_does_not_save_conv_output(activation, with_residual, kind):
    """Frozen BN: backward keeps only the conv input and the block output (and
    SiLU's input), never the conv output as such nor the folded weight (module
    docstring), whether it folds or scales the (then smaller) output."""
    _, kwargs, shape = kind
    block = make_conv_bn_block(2, torch.float32, activation, seed=60, in_channels=5, out_channels=5, **kwargs).eval()
    x = make_input(shape, torch.float32, seed=6).requires_grad_()
    out_shape = block(x).shape
    res = make_input(out_shape, torch.float32, seed=7, offset=False).requires_grad_() if with_residual else None
    with SavedTensors() as fused:
        out = block(x, residual=res)
    weight = block.conv.weight
    folded = fused.activation_sized(weight.shape, [weight])
    assert folded == [], "the frozen block saved a folded weight"
    extra = fused.activation_sized(out.shape, [x, res, out])
    # SiLU's derivative needs its input (the docstring says so); ReLU and
    # leaky ReLU run in place and keep only their output.
    allowed = 1 if activation == "silu" else 0
    assert len(extra) == allowed, (f"the frozen block saved {len(extra)} activation-sized tensor(s) besides x and "
                                   f"its output (expected {allowed})")


# (id, input batch, residual shape, residual dtype): residuals that z +
# residual broadcasts or promotes over, in place or not.
FROZEN_RESIDUALS = [
    ("broadcast-into-output", 2, (1, 7, 1, 9), torch.float32),
    ("broadcast-output", 1, (2, 7, 7, 9), torch.float32),
    ("float64", 2, (2, 7, 7, 9), torch.float64),
    ("bfloat16", 2, (2, 7, 7, 9), torch.bfloat16),
]


@pytest.mark.parametrize("case", FROZEN_RESIDUALS, ids=[c[0] for c in FROZEN_RESIDUALS])
def test_frozen_residual_shapes_and_dtypes(case):
    """Frozen BN adds the residual into the conv output in place only where
    z + residual has z's shape and dtype; otherwise (a residual that widens
    the batch or the dtype) it gives torch.nn's result."""
    name, batch, shape, dtype = case
    block = make_conv_bn_block(2, torch.float32, "relu", seed=81).eval()
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input((batch, 5, 7, 9), torch.float32, seed=82)
    res = make_input(shape, dtype, seed=83, offset=False).requires_grad_()
    res_ref = res.detach().clone().requires_grad_()
    out = block(x, residual=res)
    expected = unfused_conv_bn(ref_conv, ref_bn, x, res_ref, "relu")
    assert out.shape == expected.shape and out.dtype == expected.dtype, name
    assert_close(out, expected, torch.float32, "forward", name)
    g = torch.ones_like(out)
    assert_close(torch.autograd.grad(out, res, g)[0], torch.autograd.grad(expected, res_ref, g)[0], torch.float32,
                 "grad", name)


def _aten_calls(fn):
    """Names of the ATen ops that ``fn()`` runs, those the C++ ops call included."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, [event.name for event in prof.events()]


# (id, input shape, block kwargs, whether the output is scaled): on the CPU
# the output is scaled where it is smaller than the conv weight; otherwise the
# weight is folded. Neither divides by the scale: a zero one is fine.
FROZEN_PATHS = [
    ("large-output", (2, 5, 7, 9), dict(), False),
    ("large-output-zero-scale", (2, 5, 7, 9), dict(), False),
    ("small-output", (2, 5, 7, 9), dict(stride=4), True),
    ("small-output-zero-scale", (2, 5, 7, 9), dict(stride=4), True),
    ("transposed-large-output", (2, 5, 7, 9), dict(transposed=True), False),
    ("transposed-small-output-zero-scale", (1, 5, 1, 2), dict(transposed=True), True),
    ("transposed-groups-large-output-zero-scale", (2, 6, 3, 4), dict(transposed=True, in_channels=6, out_channels=9,
                                                                      groups=3), False),
    ("transposed-groups-small-output", (1, 6, 1, 1), dict(transposed=True, in_channels=6, out_channels=9,
                                                          groups=3), True),
]


@pytest.mark.parametrize("case", FROZEN_PATHS, ids=[c[0] for c in FROZEN_PATHS])
def test_frozen_path_choice(case):
    """Frozen BN scales the smaller of the weight and the conv output. Either
    path gives the unfused gradients, including the BN weight's where the
    scale is zero (a zero-initialized BN weight)."""
    name, shape, kwargs, scaled = case
    dtype = torch.float64
    block = make_conv_bn_block(2, dtype, None, seed=70, **kwargs).eval()
    if "zero-scale" in name:
        with torch.no_grad():
            block.bn.weight[2] = 0.0
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input(shape, dtype, seed=71).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, calls = _aten_calls(lambda: block(x))
    assert ("aten::addcmul" in calls) == scaled, f"{name}: ops {calls}"
    expected = unfused_conv_bn(ref_conv, ref_bn, x_ref, None, None)
    assert_close(out, expected, dtype, "forward", name)
    g = make_input(out.shape, dtype, seed=72, offset=False)
    params = [x, block.conv.weight, block.bn.weight, block.bn.bias]
    params_ref = [x_ref, ref_conv.weight, ref_bn.weight, ref_bn.bias]
    grads_ref = torch.autograd.grad(expected, params_ref, g)
    for got, want, what in zip(torch.autograd.grad(out, params, g), grads_ref,
                               ("input", "conv.weight", "bn.weight", "bn.bias")):
        assert_close(got, want, dtype, "grad", f"{name}: {what}")
    if "zero-scale" in name:
        assert grads_ref[2][2] != 0, "the zero-scale channel's BN weight gradient should be nonzero"


@pytest.mark.parametrize("stride", [1, 4], ids=["fold", "scaled-output"])
def test_frozen_bfloat16_matches_float64(stride):
    """A bfloat16 block (its per-channel arithmetic by ATen ops, not the float
    and double loops) against the unfused pair in float64 on the same values."""
    block = make_conv_bn_block(2, torch.bfloat16, "relu", seed=73, stride=stride, bias=True).eval()
    ref_conv, ref_bn = copy.deepcopy(block.conv).double(), copy.deepcopy(block.bn).double()
    x = make_input((2, 5, 7, 9), torch.bfloat16, seed=74).requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    out = block(x)
    expected = unfused_conv_bn(ref_conv, ref_bn, x_ref, None, "relu")
    assert_close(out, expected, torch.bfloat16, "forward", "output")
    g = make_input(out.shape, torch.bfloat16, seed=75, offset=False)
    params = [x, block.conv.weight, block.conv.bias, block.bn.weight, block.bn.bias]
    params_ref = [x_ref, ref_conv.weight, ref_conv.bias, ref_bn.weight, ref_bn.bias]
    grads_ref = torch.autograd.grad(expected, params_ref, g.double())
    for got, want, what in zip(torch.autograd.grad(out, params, g), grads_ref,
                               ("input", "conv.weight", "conv.bias", "bn.weight", "bn.bias")):
        assert got.dtype == torch.bfloat16, what
        assert_close(got, want, torch.bfloat16, "grad", what)


# FROZEN_KINDS and grouped convs: on a GPU the per-channel loops are CUDA
# kernels (csrc/cuda/conv_bn.cu) whose channel_dot walks groups and rows.
DEVICE_KINDS = FROZEN_KINDS + [
    ("groups", dict(in_channels=6, out_channels=9, groups=3), (2, 6, 7, 9)),
    ("transposed-groups", dict(transposed=True, in_channels=6, out_channels=9, groups=3, stride=2), (2, 6, 5, 4)),
]


@pytest.mark.parametrize("kind", DEVICE_KINDS, ids=[k[0] for k in DEVICE_KINDS])
@pytest.mark.parametrize("device", DEVICES)
def test_frozen_block_on_device(device, kind):
    """The frozen op on each device (on a GPU it always folds) against the
    unfused pair on that device, in float64 (where TF32 does not apply)."""
    _, kwargs, shape = kind
    dtype = torch.float64
    block = make_conv_bn_block(2, dtype, "relu", seed=78, bias=True, **kwargs).eval().to(device)
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input(shape, dtype, device=device, seed=79).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out = block(x)
    expected = unfused_conv_bn(ref_conv, ref_bn, x_ref, None, "relu")
    assert_close(out, expected, dtype, "forward", "output")
    g = make_input(out.shape, dtype, device=device, seed=80, offset=False)
    params = [x, block.conv.weight, block.conv.bias, block.bn.weight, block.bn.bias]
    params_ref = [x_ref, ref_conv.weight, ref_conv.bias, ref_bn.weight, ref_bn.bias]
    for got, want, what in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(expected, params_ref, g),
                               ("input", "conv.weight", "conv.bias", "bn.weight", "bn.bias")):
        assert_close(got, want, dtype, "grad", what)


@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("kind", FROZEN_KINDS, ids=[k[0] for k in FROZEN_KINDS])
def test_frozen_block_compiles(kind, with_residual):
    """torch.compile(fullgraph=True) of a frozen block (the op's fake kernel
    must pick the same path as the CPU kernel; the residual add must not
    break the graph) gives eager's outputs and gradients."""
    _, kwargs, shape = kind
    block = make_conv_bn_block(2, torch.float32, "relu", seed=76, **kwargs).eval()
    x = make_input(shape, torch.float32, seed=77).requires_grad_()
    res = None
    if with_residual:
        with torch.no_grad():
            res = make_input(block(x).shape, torch.float32, seed=78, offset=False).requires_grad_()
    params = [x, block.conv.weight, block.bn.weight, block.bn.bias] + ([res] if with_residual else [])
    want = block(x, res)
    grads_want = torch.autograd.grad(want.sum(), params)
    got = torch.compile(block, fullgraph=True, backend="aot_eager")(x, res)
    assert torch.equal(got, want)
    for g, w in zip(torch.autograd.grad(got.sum(), params), grads_want):
        assert torch.equal(g, w)


BAD_FROZEN_ARGUMENTS = {
    "stats": "one entry per output channel",
    "transposed-stats": "one entry per output channel",
    "weight-rank": "as many dimensions",
    "stride": "one entry per spatial dimension",
    "groups": "must be positive and divide",
    "output-padding-length": "output_padding needs one entry per spatial dimension",
    "output-padding-not-transposed": "output_padding applies to transposed convolutions only",
}


def _bad_frozen_call(which):
    """Arguments to conv_bn_frozen with the fault `which` (BAD_FROZEN_ARGUMENTS)."""
    x = make_input((2, 4, 6, 5), torch.float32)
    w = torch.randn(6, 4, 3, 3)
    mean, var = torch.zeros(6), torch.ones(6)
    stride, groups, transposed, output_padding = [1, 1], 1, False, []
    if which == "stats":
        mean = torch.zeros(5)
    elif which == "transposed-stats":  # a transposed weight's output channels are dimension 1
        w, transposed = torch.randn(4, 6, 3, 3), True
        mean, var = torch.zeros(4), torch.ones(4)
    elif which == "weight-rank":
        w = torch.randn(6, 4, 3)
    elif which == "stride":
        stride = [1]
    elif which == "groups":
        groups = 4
    elif which == "output-padding-length":
        w, transposed, output_padding = torch.randn(4, 6, 3, 3), True, [1]
    else:
        output_padding = [1, 0]
    return (x, w, None, None, None, mean, var, EPS, stride, [1, 1], [1, 1], groups, transposed, output_padding)


@pytest.mark.parametrize("which", list(BAD_FROZEN_ARGUMENTS))
def test_conv_bn_frozen_rejects_bad_arguments(which):
    with pytest.raises(ValueError, match=BAD_FROZEN_ARGUMENTS[which]):
        OPS.conv_bn_frozen(*_bad_frozen_call(which))


@pytest.mark.parametrize("which", ["stats", "transposed-stats", "output-padding-length",
                                   "output-padding-not-transposed"])
def test_conv_bn_frozen_fake_rejects_bad_arguments(which):
    """Under torch.compile the fake kernel meets the arguments first: it refuses
    what the op refuses (and aten::convolution's fake would let through)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in _bad_frozen_call(which)]
        with pytest.raises(ValueError, match=BAD_FROZEN_ARGUMENTS[which]):
            OPS.conv_bn_frozen(*args)


@pytest.mark.parametrize("which", [w for w in BAD_FROZEN_ARGUMENTS if "stats" not in w])
@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
def test_conv_bn_train_rejects_bad_arguments(which, fake):
    """The training op checks the conv's arguments like the frozen op, in
    eager and in its fake kernel."""
    if fake and which not in ("output-padding-length", "output-padding-not-transposed"):
        pytest.skip("aten::convolution's fake makes this check itself")
    args = conv_bn_train_call(_bad_frozen_call(which), "relu", with_residual=False)
    if not fake:
        with pytest.raises(ValueError, match=BAD_FROZEN_ARGUMENTS[which]):
            OPS.conv_bn_train(*args)
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match=BAD_FROZEN_ARGUMENTS[which]):
            OPS.conv_bn_train(*args)
