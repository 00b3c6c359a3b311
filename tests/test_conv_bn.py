"""Conv + BatchNorm blocks (torchnorm.nn.ConvBN1d/2d/3d, conv_bn_forward,
rebuild_outputs, save_memory_in) and the batch_norm_apply op they rebuild
their outputs with.

* batch_norm_apply with batch_norm_train's mean / rstd gives batch_norm_train's
  output bit for bit (every dtype, activation, rank and layout); opcheck; errors.
* The blocks against unfused torch.nn Conv -> BatchNorm -> (+ residual) -> act,
  in training and frozen (eval) mode: outputs, every gradient and the running
  statistics over three steps, inside rebuild_outputs() and outside it.
* The memory saving is real: block outputs are freed after forward inside
  rebuild_outputs() (weakrefs), a residual block does not save its conv output,
  a frozen block does not save its conv output.
* gradcheck, from_modules, state_dict, save_memory_in, and block outputs
  modified in place (the recipe must not be used then).
"""
import contextlib
import copy
import types
import weakref

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune

import torchnorm  # noqa: F401  (registers the ops)
from torchnorm.nn import (ConvBN1d, ConvBN2d, ConvBN3d, ConvTransposeBN1d, ConvTransposeBN2d, ConvTransposeBN3d,
                          conv_bn_forward, rebuild_outputs, save_memory_in)
from conftest import (
    ACTIVATIONS,
    DEVICES,
    DTYPES_ALL,
    NEGATIVE_SLOPE,
    act_name,
    assert_close,
    make_input,
    make_params,
    memory_format_of,
    randn,
    torch_act,
)
from tolerances import GRADCHECK

OPS = torch.ops.torchnorm
EPS = 1e-5
CLASSES = {1: ConvBN1d, 2: ConvBN2d, 3: ConvBN3d}
TRANSPOSED_CLASSES = {1: ConvTransposeBN1d, 2: ConvTransposeBN2d, 3: ConvTransposeBN3d}


@pytest.fixture(autouse=True)
def _one_intra_op_thread(request):
    """The block tests run hundreds of tiny convolutions, each a parallel region;
    on a small, shared machine every region's OpenMP hand-off can cost
    milliseconds (the file takes minutes with 2 threads, seconds with 1). The
    kernels' multi-threaded paths are what the batch_norm_apply tests (kept at
    the default thread count) and tests/test_batch_norm.py exercise."""
    if request.node.name.startswith("test_apply"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# batch_norm_apply
# ---------------------------------------------------------------------------

# (shape, layout): every rank, NCHW and channels-last, odd sizes, and shapes
# large enough for the vectorized and parallel paths of both layouts.
APPLY_CASES = [
    pytest.param((6, 5), "contiguous", id="2d"),
    pytest.param((4, 3, 7), "contiguous", id="3d"),
    pytest.param((3, 5, 7, 9), "contiguous", id="4d"),
    pytest.param((3, 5, 7, 9), "channels_last", id="4d-cl"),
    pytest.param((2, 3, 3, 5, 4), "contiguous", id="5d"),
    pytest.param((2, 3, 3, 5, 4), "channels_last_3d", id="5d-cl3d"),
    pytest.param((2, 19, 33, 35), "contiguous", id="4d-large"),
    pytest.param((2, 19, 33, 35), "channels_last", id="4d-large-cl"),
]


@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("shape,layout", APPLY_CASES)
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("device", DEVICES)
def test_apply_rebuilds_train_output_bitwise(device, dtypes, shape, layout, with_residual):
    dtype, pdtype = dtypes
    x = make_input(shape, dtype, device, layout, seed=1)
    res = make_input(shape, dtype, device, layout, seed=2, scale=1.0, offset=False) if with_residual else None
    for affine in (True, False):
        w, b, rm, rv = make_params(shape[1], pdtype, device, seed=3, affine=affine)
        for activation in ACTIVATIONS:
            name = act_name(activation)
            out, mean, rstd = OPS.batch_norm_train.default(
                x, w, b, rm, rv, 0.1, EPS, name, NEGATIVE_SLOPE, res)
            rebuilt = OPS.batch_norm_apply.default(x, mean, rstd, w, b, name, NEGATIVE_SLOPE, res)
            where = f"{name}, affine={affine}"
            assert rebuilt.dtype == out.dtype, where
            assert rebuilt.stride() == out.stride(), where
            if not torch.equal(rebuilt, out):
                diff = (rebuilt.double() - out.double()).abs()
                raise AssertionError(f"{where}: rebuilt output differs from batch_norm_train's in "
                                     f"{int((diff > 0).sum())} of {diff.numel()} elements (max {diff.max()})")


@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("device", DEVICES)
def test_apply_with_given_statistics(device, dtypes, activation, with_residual):
    """Any mean / rstd (not only batch statistics): act((x - mean) * rstd * w + b + res)."""
    dtype, pdtype = dtypes
    shape = (3, 5, 4, 6)
    x = make_input(shape, dtype, device, "channels_last", seed=4)
    res = make_input(shape, dtype, device, seed=5, scale=1.0, offset=False) if with_residual else None
    w, b, _, _ = make_params(5, pdtype, device, seed=6)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    mean = randn((5,), 7, stat_dtype, device, scale=1.0)
    rstd = randn((5,), 8, stat_dtype, device, scale=0.2, offset=1.0)
    out = OPS.batch_norm_apply.default(x, mean, rstd, w, b, act_name(activation), NEGATIVE_SLOPE, res)
    view = (1, 5, 1, 1)
    expected = (x.double() - mean.double().view(view)) * rstd.double().view(view) * w.double().view(view) \
        + b.double().view(view)
    if res is not None:
        expected = expected + res.double()
    expected = torch_act(expected, activation)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, "forward", f"batch_norm_apply {act_name(activation)}")


def _apply_opcheck_samples():
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
        samples.append((sid, (x, mean, rstd, w, b, activation, 0.2, res)))
    return samples


@pytest.mark.parametrize("sample", _apply_opcheck_samples(), ids=lambda s: s[0])
def test_apply_opcheck(sample):
    torch.library.opcheck(OPS.batch_norm_apply.default, sample[1])


@pytest.mark.parametrize("which", ["mean", "rstd"])
def test_apply_rejects_wrong_size_statistics(which):
    x = make_input((2, 5, 3, 4), torch.float32)
    stats = {"mean": torch.zeros(5), "rstd": torch.ones(5)}
    stats[which] = stats[which][:4]
    # the message must name the argument as the schema does (not, say, running_var)
    with pytest.raises(RuntimeError, match=rf"(?<![\w]){which}(?![\w])"):
        OPS.batch_norm_apply.default(x, stats["mean"], stats["rstd"], None, None, "none", 0.0, None)


def test_apply_is_registered():
    schema = str(OPS.batch_norm_apply.default._schema)
    assert "Tensor mean" in schema and "Tensor rstd" in schema and "(a!)" not in schema, schema


# ---------------------------------------------------------------------------
# Blocks against unfused torch.nn modules
# ---------------------------------------------------------------------------


def _randomize(block, seed):
    """Random, nonzero conv weight / bias, BN parameters and running statistics."""
    conv, bn = block.conv, block.bn
    dtype = conv.weight.dtype
    with torch.no_grad():
        fan_in = conv.weight[0].numel()
        conv.weight.copy_(randn(conv.weight.shape, seed, dtype, scale=fan_in ** -0.5))
        if conv.bias is not None:
            conv.bias.copy_(randn(conv.bias.shape, seed + 1, dtype, scale=0.5, offset=0.2))
        w, b, rm, rv = make_params(bn.num_features, dtype, seed=seed + 2)
        if bn.weight is not None:
            bn.weight.copy_(w)
            bn.bias.copy_(b)
        if bn.running_mean is not None:
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
    return block


def _make_block(dim, dtype, activation, seed=0, in_channels=5, out_channels=7, kernel_size=3, padding=1,
                transposed=False, **kwargs):
    classes = TRANSPOSED_CLASSES if transposed else CLASSES
    block = classes[dim](in_channels, out_channels, kernel_size, padding=padding, activation=activation,
                         negative_slope=NEGATIVE_SLOPE, dtype=dtype, **kwargs)
    return _randomize(block, seed)


def _unfused(conv, bn, x, residual, activation):
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return torch_act(y, activation)


SPATIAL = {1: (9,), 2: (7, 9), 3: (3, 4, 5)}


def _compare_steps(block, dim, dtype, activation, with_residual, training, layout="contiguous", steps=3,
                   contexts=(True, False, True), seed=0, spatial=None, input_scale=2.0):
    """Runs `steps` forward/backward steps of the block and of unfused torch.nn
    copies of its conv and bn; compares outputs, every gradient and the running
    statistics. Step i runs inside rebuild_outputs() when contexts[i]. The loss
    saves the output ((out * out * g).sum()), so inside the context the rebuild
    path runs in backward."""
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    block.train(training)
    ref_conv.train(training)
    ref_bn.train(training)
    conv, bn = block.conv, block.bn
    in_shape = (2, conv.in_channels) + (spatial or SPATIAL[dim])
    params = [("conv.weight", conv.weight, ref_conv.weight), ("conv.bias", conv.bias, ref_conv.bias),
              ("bn.weight", bn.weight, ref_bn.weight), ("bn.bias", bn.bias, ref_bn.bias)]
    params = [p for p in params if p[1] is not None]
    # outputs that are tagged with a recipe: batch statistics, no residual
    rebuildable = not with_residual and (training or not bn.track_running_stats)
    for step in range(steps):
        s = seed + 1000 * step
        x = make_input(in_shape, dtype, layout=layout, seed=s, scale=input_scale)
        x_ref = x.clone().requires_grad_()
        x = x.requires_grad_()
        with torch.no_grad():
            out_shape = ref_conv(x).shape
        res = make_input(out_shape, dtype, layout=layout, seed=s + 1, scale=1.0, offset=False) \
            if with_residual else None
        res_ref = None if res is None else res.clone().requires_grad_()
        res = None if res is None else res.requires_grad_()
        g = make_input(out_shape, dtype, seed=s + 2, scale=1.0, offset=False)

        in_context = contexts[step % len(contexts)]
        with rebuild_outputs() if in_context else contextlib.nullcontext():
            out = block(x, residual=res) if with_residual else block(x)
            loss = (out * out * g).sum()
        expected = _unfused(ref_conv, ref_bn, x_ref, res_ref, activation)
        loss_ref = (expected * expected * g).sum()
        where = f"step {step}, {'inside' if in_context else 'outside'} rebuild_outputs"
        assert_close(out, expected, dtype, "forward", f"output, {where}")
        assert memory_format_of(out) == memory_format_of(expected), f"output layout, {where}"

        # Training without a residual: the output was saved by `out * out` as a
        # recipe inside the context (so nothing keeps it), as itself outside it.
        out_ref = weakref.ref(out)
        del out
        if rebuildable:
            assert (out_ref() is None) == in_context, \
                f"{where}: block output {'kept' if in_context else 'freed'} after forward"

        inputs = [x] + ([res] if res is not None else []) + [p[1] for p in params]
        inputs_ref = [x_ref] + ([res_ref] if res_ref is not None else []) + [p[2] for p in params]
        names = ["grad_input"] + (["grad_residual"] if res is not None else []) + [p[0] for p in params]
        grads = torch.autograd.grad(loss, inputs)
        grads_ref = torch.autograd.grad(loss_ref, inputs_ref)
        for name, got, want in zip(names, grads, grads_ref):
            if name == "conv.bias" and (training or not bn.track_running_stats):
                # Batch statistics subtract the mean, so the conv bias's exact
                # gradient is zero: both blocks' values are rounding noise
                # (1e-4 in float32), and two noises need not be within the
                # tolerance of each other. Each must be within it of zero.
                assert_close(want, torch.zeros_like(want), dtype, "grad", f"torch.nn's {name}, {where}")
                want = torch.zeros_like(want)
            assert_close(got, want, dtype, "grad", f"{name}, {where}")

        for name in ("running_mean", "running_var", "num_batches_tracked"):
            got, want = getattr(bn, name), getattr(ref_bn, name)
            assert (got is None) == (want is None), name
            if got is not None:
                assert_close(got, want, dtype, "stats", f"{name} after step {step}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("dim", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_block_matches_unfused(dim, training, activation, with_residual, dtype):
    block = _make_block(dim, dtype, activation, seed=dim)
    _compare_steps(block, dim, dtype, activation, with_residual, training, seed=dim)


# (id, dim, block kwargs, layout, activation)
CONFIGS = [
    ("groups", 2, dict(in_channels=6, out_channels=9, groups=3), "contiguous", "relu"),
    ("depthwise", 2, dict(in_channels=5, out_channels=5, groups=5), "channels_last", "silu"),
    ("dilation", 2, dict(dilation=2, padding=2), "contiguous", "leaky_relu"),
    ("stride", 2, dict(stride=2), "contiguous", "relu"),
    ("bias", 2, dict(bias=True), "contiguous", "silu"),
    ("bias-1d-stride", 1, dict(bias=True, stride=2), "contiguous", "leaky_relu"),
    ("channels_last", 2, dict(bias=True, stride=2), "channels_last", "relu"),
    ("channels_last_3d", 3, dict(), "channels_last_3d", "silu"),
    ("momentum_none", 2, dict(momentum=None), "contiguous", "relu"),
    ("noaffine", 2, dict(affine=False), "contiguous", "silu"),
    ("notrack", 2, dict(track_running_stats=False), "contiguous", "leaky_relu"),
    ("noaffine-notrack-bias", 1, dict(affine=False, track_running_stats=False, bias=True), "contiguous", None),
    ("reflect", 2, dict(padding_mode="reflect", bias=True), "contiguous", "relu"),
    ("padding-same", 2, dict(padding="same", dilation=(1, 2)), "contiguous", "silu"),
    ("1x1", 2, dict(kernel_size=1, padding=0, out_channels=5), "channels_last", None),
    ("asymmetric", 2, dict(kernel_size=(1, 3), padding=(0, 1), stride=(2, 1)), "contiguous", "leaky_relu"),
    # Outputs smaller than the weight: frozen BN scales the conv output, not
    # the weight (csrc/conv_bn.cpp, scales_output).
    ("small-output", 2, dict(stride=4, bias=True), "contiguous", "relu"),
    ("small-output-cl", 2, dict(stride=4), "channels_last", "silu"),
    ("small-output-1d", 1, dict(stride=4, bias=True), "contiguous", None),
    ("small-output-3d", 3, dict(stride=2), "contiguous", "leaky_relu"),
    ("small-output-groups", 2, dict(in_channels=6, out_channels=9, groups=3, stride=4), "contiguous", "relu"),
    ("small-output-reflect", 2, dict(stride=4, padding_mode="reflect"), "contiguous", "silu"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_block_options_match_unfused(config, training, with_residual, dtype):
    _, dim, kwargs, layout, activation = config
    block = _make_block(dim, dtype, activation, seed=11, **kwargs)
    _compare_steps(block, dim, dtype, activation, with_residual, training, layout=layout, seed=11)


# (id, dim, block kwargs, input spatial size, layout, activation) for the
# ConvTranspose blocks. A transposed weight is (in, out / groups, kernel...),
# so frozen BN scales it along dimension 1, per group; "small-output" cases
# (a latent 1x1 input, as a DCGAN generator's first layer) scale the conv
# output instead.
TRANSPOSED_CONFIGS = [
    ("1d", 1, dict(), None, "contiguous", "relu"),
    ("2d", 2, dict(), None, "contiguous", "leaky_relu"),
    ("3d", 3, dict(), None, "contiguous", "silu"),
    ("stride-output-padding", 2, dict(stride=2, output_padding=1, bias=True), None, "contiguous", "relu"),
    ("groups", 2, dict(in_channels=6, out_channels=9, groups=3, stride=2), None, "contiguous", "silu"),
    ("dilation", 1, dict(dilation=2, padding=2, stride=3, output_padding=2), None, "contiguous", "leaky_relu"),
    ("channels_last", 2, dict(stride=2, bias=True), None, "channels_last", "relu"),
    ("small-output", 2, dict(kernel_size=4, padding=0, bias=True), (1, 1), "contiguous", "relu"),
    ("small-output-groups", 2, dict(in_channels=6, out_channels=8, groups=2, kernel_size=3, padding=0), (1, 2),
     "contiguous", "silu"),
    ("small-output-1d", 1, dict(kernel_size=4, padding=0, stride=2), (1,), "contiguous", None),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("config", TRANSPOSED_CONFIGS, ids=[c[0] for c in TRANSPOSED_CONFIGS])
def test_transposed_block_matches_unfused(config, training, with_residual, dtype):
    _, dim, kwargs, spatial, layout, activation = config
    block = _make_block(dim, dtype, activation, seed=13, transposed=True, **kwargs)
    # Inputs of half the usual scale: at the usual one, conv weight gradients
    # reach ~1e3, where float32 rounding alone (torch.nn's own float32
    # gradient differs from its float64 one by 1.5e-4 on "groups") exceeds
    # the table's absolute tolerance on an entry that cancels to near zero.
    _compare_steps(block, dim, dtype, activation, with_residual, training, layout=layout, seed=13, spatial=spatial,
                   input_scale=0.5)


@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_transposed_block_output_size(training, with_residual):
    """A ConvTranspose block called with output_size, as ConvTranspose2d is
    (here one output padding per dimension: 1 and 0), in every path."""
    dtype = torch.float64
    block = _make_block(2, dtype, "relu", seed=90, transposed=True, stride=2).train(training)
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input((2, 5, 4, 3), dtype, seed=91).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    size = (8, 5)  # 7 or 8 rows, 5 or 6 columns are possible: output padding (1, 0)
    res = make_input((2, 7) + size, dtype, seed=92, offset=False) if with_residual else None
    with rebuild_outputs():
        out = block(x, res, output_size=size)
        loss = (out * out).sum()
    expected = torch_act(ref_bn(ref_conv(x_ref, output_size=size)) + (0 if res is None else res), "relu")
    assert out.shape == (2, 7) + size
    assert_close(out, expected, dtype, "forward", "output")
    params = [x, block.conv.weight, block.bn.weight, block.bn.bias]
    params_ref = [x_ref, ref_conv.weight, ref_bn.weight, ref_bn.bias]
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad((expected * expected).sum(),
                                                                                params_ref)):
        assert_close(got, want, dtype, "grad", "grads")
    for name in ("running_mean", "running_var"):
        assert_close(getattr(block.bn, name), getattr(ref_bn, name), dtype, "stats", name)


def test_output_size_errors():
    """An impossible output_size fails as ConvTranspose2d's does; a plain
    conv takes none."""
    block = _make_block(2, torch.float32, "relu", seed=93, transposed=True, stride=2)
    x = make_input((2, 5, 4, 3), torch.float32, seed=94)
    with pytest.raises(ValueError, match="requested an output size of"):
        block(x, output_size=(20, 5))
    conv_block = _make_block(2, torch.float32, "relu", seed=95)
    with pytest.raises(TypeError, match="output_size applies to ConvTranspose only"):
        conv_bn_forward(conv_block.conv, conv_block.bn, x, "relu", output_size=(4, 3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_block_followed_by_conv(training):
    """A following conv (not an element-wise op) saves the block output."""
    dtype = torch.float64
    block = _make_block(2, dtype, "relu", seed=3)
    after = torch.nn.Conv2d(7, 4, 3, padding=1, dtype=dtype)
    ref_conv, ref_bn, ref_after = (copy.deepcopy(m) for m in (block.conv, block.bn, after))
    for m in (block, ref_conv, ref_bn):
        m.train(training)
    x = make_input((2, 5, 7, 9), dtype, seed=4).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with rebuild_outputs():
        out = block(x)
        out_ref = weakref.ref(out)
        loss = after(out).square().sum()
        del out
    assert (out_ref() is None) == training
    expected = ref_after(_unfused(ref_conv, ref_bn, x_ref, None, "relu")).square().sum()
    assert_close(loss, expected, dtype, "forward", "loss")
    params = [x, block.conv.weight, block.bn.weight, block.bn.bias, after.weight]
    params_ref = [x_ref, ref_conv.weight, ref_bn.weight, ref_bn.bias, ref_after.weight]
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params_ref)):
        assert_close(got, want, dtype, "grad", "grads")


# ---------------------------------------------------------------------------
# Memory: the saving really happens
# ---------------------------------------------------------------------------


def _chain(depth=4, activation="relu", seed=20):
    return [_make_block(2, torch.float32, activation, seed=seed + i, in_channels=5, out_channels=5).train()
            for i in range(depth)]


def _run_chain(blocks, x, context):
    """Forward through the chain; returns (loss, weakrefs to each block output)
    with no Python reference left to the outputs."""
    refs = []
    h = x
    with context:
        for block in blocks:
            h = block(h)
            refs.append(weakref.ref(h))
        loss = (h * h).sum()
    del h
    return loss, refs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
def test_chain_outputs_freed_inside_rebuild_outputs(activation, dtype):
    blocks = [b.to(dtype) for b in _chain(activation=activation)]
    blocks_plain = copy.deepcopy(blocks)
    x = make_input((2, 5, 7, 9), dtype, seed=1).requires_grad_()
    x_plain = x.detach().clone().requires_grad_()

    loss, refs = _run_chain(blocks, x, rebuild_outputs())
    alive = [r() is not None for r in refs]
    # every output is freed: the next block's conv (or the loss) saved a recipe
    assert alive == [False] * len(blocks), f"block outputs kept after forward: {alive}"

    loss_plain, refs_plain = _run_chain(blocks_plain, x_plain, contextlib.nullcontext())
    alive_plain = [r() is not None for r in refs_plain]
    assert alive_plain == [True] * len(blocks), f"without rebuild_outputs every output is kept: {alive_plain}"

    # The rebuild is bit-identical, so the gradients are too.
    params = [x] + [p for b in blocks for p in b.parameters()]
    params_plain = [x_plain] + [p for b in blocks_plain for p in b.parameters()]
    grads = torch.autograd.grad(loss, params)
    grads_plain = torch.autograd.grad(loss_plain, params_plain)
    assert torch.equal(loss, loss_plain)
    for i, (got, want) in enumerate(zip(grads, grads_plain)):
        assert torch.equal(got, want), f"gradient {i} differs with rebuilt outputs"
    assert all(r() is None for r in refs_plain)


def test_chain_with_pool_between_blocks():
    """Any op that saves a block output (max_pool2d saves its input) saves the recipe."""
    a, b = _chain(depth=2, activation="silu", seed=30)
    ra, rb = copy.deepcopy(a), copy.deepcopy(b)
    x = make_input((2, 5, 8, 10), torch.float32, seed=2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with rebuild_outputs():
        h = a(x)
        first = weakref.ref(h)
        h = b(F.max_pool2d(h, 2))
        loss = (h * h).sum()
        del h
    assert first() is None, "block output saved by max_pool2d was kept"
    h = rb(F.max_pool2d(ra(x_ref), 2))
    loss_ref = (h * h).sum()
    assert torch.equal(loss, loss_ref)
    for got, want in zip(torch.autograd.grad(loss, [x, a.conv.weight, b.bn.weight]),
                         torch.autograd.grad(loss_ref, [x_ref, ra.conv.weight, rb.bn.weight])):
        assert torch.equal(got, want)


def test_rebuild_outputs_on_save_reports_what_is_kept():
    """on_save sees every tensor kept for backward: for a recipe its pre-norm
    tensor and statistics, never the block output itself."""
    a, b = _chain(depth=2, activation="relu", seed=35)
    x = make_input((2, 5, 7, 9), torch.float32, seed=3).requires_grad_()
    reported = []
    with rebuild_outputs(on_save=reported.append):
        h = a(x)
        first, first_ptr = weakref.ref(h), h.untyped_storage().data_ptr()
        out = b(h)
        del h
    assert first() is None, "block output kept with on_save"
    assert all(isinstance(t, torch.Tensor) for t in reported)
    ptrs = [t.untyped_storage().data_ptr() for t in reported]
    assert first_ptr not in ptrs, "the block output itself was reported as kept"
    # b's conv saved a's output as a recipe: a's statistics were reported
    assert any(t.shape == (5,) and t.dtype == torch.float32 for t in reported)
    assert any(t.shape == (2, 5, 7, 9) for t in reported)  # pre-norm tensors
    out.sum().backward()
    assert a.conv.weight.grad is not None and x.grad is not None


class _SavedTensors:
    """Records every tensor saved for backward (only usable where no inner
    saved_tensors_hooks, e.g. rebuild_outputs, is active: the innermost wins)."""

    def __init__(self):
        self.saved = []

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _pack(self, t):
        self.saved.append((tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    def activation_sized(self, shape, known):
        """Saved tensors of `shape` whose memory is none of the `known` tensors'."""
        ptrs = {t.untyped_storage().data_ptr() for t in known if t is not None}
        return [s for s, p in self.saved if s == tuple(shape) and p not in ptrs]


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
def test_residual_block_does_not_save_conv_output(activation):
    block = _make_block(2, torch.float32, activation, seed=40, in_channels=5, out_channels=5).train()
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input((2, 5, 7, 9), torch.float32, seed=3).requires_grad_()
    res = make_input((2, 5, 7, 9), torch.float32, seed=4, offset=False).requires_grad_()
    with _SavedTensors() as fused:
        out = block(x, residual=res)
    extra = fused.activation_sized(out.shape, [x, res, out])
    assert extra == [], f"the residual block saved {len(extra)} activation-sized tensor(s) besides x and residual"
    # the measurement sees the conv output unfused torch.nn keeps
    with _SavedTensors() as unfused:
        expected = _unfused(ref_conv, ref_bn, x, res, activation)
    assert len(unfused.activation_sized(out.shape, [x, res, expected])) >= 1
    assert_close(out, expected, torch.float32, "forward", "output")


def test_residual_block_input_is_rebuilt():
    """The ResNet tail: the residual block's input and identity are the previous
    block's output, which it saves as a recipe inside rebuild_outputs."""
    a = _make_block(2, torch.float64, "relu", seed=50, in_channels=5, out_channels=5).train()
    b = _make_block(2, torch.float64, "relu", seed=51, in_channels=5, out_channels=5).train()
    ra, rb = copy.deepcopy(a), copy.deepcopy(b)
    x = make_input((2, 5, 7, 9), torch.float64, seed=5).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with rebuild_outputs():
        h = a(x)
        first = weakref.ref(h)
        out = b(h, residual=h)
        del h
        loss = (out * out).sum()
    assert first() is None, "the residual block kept its (rebuildable) input"
    h = _unfused(ra.conv, ra.bn, x_ref, None, "relu")
    expected = _unfused(rb.conv, rb.bn, h, h, "relu")
    loss_ref = (expected * expected).sum()
    assert_close(out, expected, torch.float64, "forward", "output")
    params = [x, a.conv.weight, a.bn.weight, a.bn.bias, b.conv.weight, b.bn.weight, b.bn.bias]
    params_ref = [x_ref, ra.conv.weight, ra.bn.weight, ra.bn.bias, rb.conv.weight, rb.bn.weight, rb.bn.bias]
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(loss_ref, params_ref)):
        assert_close(got, want, torch.float64, "grad", "grads")


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
    block = _make_block(2, torch.float32, activation, seed=60, in_channels=5, out_channels=5, **kwargs).eval()
    x = make_input(shape, torch.float32, seed=6).requires_grad_()
    out_shape = block(x).shape
    res = make_input(out_shape, torch.float32, seed=7, offset=False).requires_grad_() if with_residual else None
    with _SavedTensors() as fused:
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
    block = _make_block(2, torch.float32, "relu", seed=81).eval()
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input((batch, 5, 7, 9), torch.float32, seed=82)
    res = make_input(shape, dtype, seed=83, offset=False).requires_grad_()
    res_ref = res.detach().clone().requires_grad_()
    out = block(x, residual=res)
    expected = _unfused(ref_conv, ref_bn, x, res_ref, "relu")
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
    block = _make_block(2, dtype, None, seed=70, **kwargs).eval()
    if "zero-scale" in name:
        with torch.no_grad():
            block.bn.weight[2] = 0.0
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input(shape, dtype, seed=71).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, calls = _aten_calls(lambda: block(x))
    assert ("aten::addcmul" in calls) == scaled, f"{name}: ops {calls}"
    expected = _unfused(ref_conv, ref_bn, x_ref, None, None)
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
    block = _make_block(2, torch.bfloat16, "relu", seed=73, stride=stride, bias=True).eval()
    ref_conv, ref_bn = copy.deepcopy(block.conv).double(), copy.deepcopy(block.bn).double()
    x = make_input((2, 5, 7, 9), torch.bfloat16, seed=74).requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    out = block(x)
    expected = _unfused(ref_conv, ref_bn, x_ref, None, "relu")
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
    block = _make_block(2, dtype, "relu", seed=78, bias=True, **kwargs).eval().to(device)
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input(shape, dtype, device=device, seed=79).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out = block(x)
    expected = _unfused(ref_conv, ref_bn, x_ref, None, "relu")
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
    block = _make_block(2, torch.float32, "relu", seed=76, **kwargs).eval()
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


def _frozen_opcheck_samples():
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


@pytest.mark.parametrize("sample", _frozen_opcheck_samples(), ids=lambda s: s[0])
@pytest.mark.parametrize("device", DEVICES)
def test_conv_bn_frozen_opcheck(device, sample):
    args = sample[1]
    args = tuple(a.to(device).requires_grad_(i in (0, 1, 2, 3, 4)) if isinstance(a, torch.Tensor) else a
                 for i, a in enumerate(args))
    torch.library.opcheck(OPS.conv_bn_frozen.default, args)


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


def _train_call(frozen_args, activation, with_residual, seed=0):
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


@pytest.mark.parametrize("sample", _frozen_opcheck_samples(), ids=lambda s: s[0])
@pytest.mark.parametrize("device", DEVICES)
def test_conv_bn_train_opcheck(device, sample):
    """The training op (conv input kept, conv recomputed in backward): schema
    (it mutates the running statistics), fake kernel, autograd, with and
    without a residual and with each activation."""
    n = [sid for sid, _ in _frozen_opcheck_samples()].index(sample[0])
    activation = ACTIVATIONS[n % len(ACTIVATIONS)] or "none"
    args = _train_call(sample[1], activation, with_residual=n % 2 == 0, seed=n)
    grads = (0, 1, 2, 3, 4, 11)
    args = tuple(a.to(device).requires_grad_(i in grads) if isinstance(a, torch.Tensor) and i not in (5, 6)
                 else a.to(device) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
    torch.library.opcheck(OPS.conv_bn_train.default, args)


@pytest.mark.parametrize("which", [w for w in BAD_FROZEN_ARGUMENTS if "stats" not in w])
@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
def test_conv_bn_train_rejects_bad_arguments(which, fake):
    """The training op checks the conv's arguments like the frozen op, in
    eager and in its fake kernel."""
    if fake and which not in ("output-padding-length", "output-padding-not-transposed"):
        pytest.skip("aten::convolution's fake makes this check itself")
    args = _train_call(_bad_frozen_call(which), "relu", with_residual=False)
    if not fake:
        with pytest.raises(ValueError, match=BAD_FROZEN_ARGUMENTS[which]):
            OPS.conv_bn_train(*args)
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match=BAD_FROZEN_ARGUMENTS[which]):
            OPS.conv_bn_train(*args)


# ---------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------


def _gradcheck_setup(training, activation, with_residual, transposed=False):
    """A tiny float64 block and inputs; for relu / leaky_relu a seed whose
    pre-activation stays away from the kink at 0."""
    # a 2x2 kernel takes 3x3 to 2x2; transposed, 2x2 to 3x3
    in_size, out_size = (2, 3) if transposed else (3, 2)
    for seed in range(200):
        block = _make_block(2, torch.float64, activation, seed=seed, in_channels=2, out_channels=3,
                            kernel_size=2, padding=0, bias=True, transposed=transposed).train(training)
        x = make_input((2, 2, in_size, in_size), torch.float64, seed=seed, scale=1.0)
        res = make_input((2, 3, out_size, out_size), torch.float64, seed=seed + 1, scale=1.0, offset=False) \
            if with_residual else None
        if activation not in ("relu", "leaky_relu"):
            break
        with torch.no_grad():
            ref = copy.deepcopy(block)
            pre = _unfused(ref.conv, ref.bn, x, res, None)
        if pre.abs().min() > 1e-3:
            break
    return block, x, res


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_gradcheck(training, activation, with_residual, transposed):
    block, x, res = _gradcheck_setup(training, activation, with_residual, transposed)
    names = [n for n, _ in block.named_parameters()]
    buffers = {n: b for n, b in block.named_buffers()}

    def fn(x, res, *params):
        state = dict(zip(names, params))
        # fresh running statistics each call: training mode updates them
        state.update({n: b.clone() for n, b in buffers.items()})
        with rebuild_outputs():
            out = torch.func.functional_call(block, state, (x,), {"residual": res})
            return out * out  # saves the block output (a recipe in training mode)

    args = [x.requires_grad_(), None if res is None else res.requires_grad_()]
    args += [p.detach().clone().requires_grad_() for _, p in block.named_parameters()]
    assert torch.autograd.gradcheck(fn, args, **GRADCHECK)


class _Functional(torch.nn.Module):
    """Calls conv_bn_forward on its conv and bn (for functional_call)."""

    def __init__(self, block):
        super().__init__()
        self.conv, self.bn = block.conv, block.bn

    def forward(self, x, residual):
        return conv_bn_forward(self.conv, self.bn, x, "silu", NEGATIVE_SLOPE, residual)


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_gradcheck_conv_bn_forward(training):
    """The functional entry point with a residual and a parameter that needs no gradient."""
    block, x, res = _gradcheck_setup(training, "silu", True)
    block.conv.bias.requires_grad_(False)
    module = _Functional(block)
    buffers = dict(module.named_buffers())

    def fn(x, res, weight):
        state = {"conv.weight": weight}
        state.update({n: b.clone() for n, b in buffers.items()})
        return torch.func.functional_call(module, state, (x, res))

    args = [x.requires_grad_(), res.requires_grad_(), block.conv.weight.detach().clone().requires_grad_()]
    assert torch.autograd.gradcheck(fn, args, **GRADCHECK)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_conv_hooks_run_in_every_mode(training, with_residual, transposed):
    """The block's conv is a torch.nn.Conv2d (or ConvTranspose2d): its forward
    pre-hooks and hooks run on every forward, whatever the mode.
    torch.nn.utils.prune recomputes the weight in a pre-hook, so skipping it
    trains a stale weight."""
    dtype = torch.float64
    block = _make_block(2, dtype, "relu", seed=97, in_channels=5, out_channels=5,
                        transposed=transposed).train(training)
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    for conv in (block.conv, ref_conv):
        torch.nn.utils.prune.l1_unstructured(conv, "weight", amount=0.4)
    assert torch.equal(block.conv.weight_mask, ref_conv.weight_mask)
    calls = []
    block.conv.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    block.conv.register_forward_hook(lambda m, args, out: calls.append("post"))
    opt = torch.optim.SGD(block.parameters(), lr=0.05)
    opt_ref = torch.optim.SGD(list(ref_conv.parameters()) + list(ref_bn.parameters()), lr=0.05)
    for step in range(2):
        calls.clear()
        x = make_input((2, 5, 6, 7), dtype, seed=200 + step)
        res = make_input((2, 5, 6, 7), dtype, seed=300 + step, offset=False) if with_residual else None
        with rebuild_outputs():
            out = block(x, residual=res)
            loss = (out * out).sum()
        expected = _unfused(ref_conv, ref_bn, x, res, "relu")
        assert calls == ["pre", "post"], f"step {step}: conv hooks called {calls}"
        assert_close(out, expected, dtype, "forward", f"step {step}")
        loss.backward()
        (expected * expected).sum().backward()
        assert_close(block.conv.weight_orig.grad, ref_conv.weight_orig.grad, dtype, "grad", f"step {step}")
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_autocast_matches_unfused(training, with_residual, transposed):
    """Mixed precision: under CPU autocast to bfloat16 every mode runs forward
    and backward like unfused torch.nn under the same autocast (a custom
    autograd.Function's backward runs outside autocast unless it restores it).
    Outputs are compared; gradient values are not (the fused and unfused
    blocks round different intermediates to bfloat16, which the tolerance
    table does not cover; float32 / float64 tests check the gradients)."""
    block = _make_block(2, torch.float32, "relu", seed=98, in_channels=5, out_channels=5,
                        transposed=transposed).train(training)
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input((2, 5, 6, 7), torch.float32, seed=17).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    # the residual an autocast model passes: the previous block's bfloat16 output
    res = make_input((2, 5, 6, 7), torch.bfloat16, seed=18, offset=False).requires_grad_() if with_residual else None
    res_ref = None if res is None else res.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with rebuild_outputs():
            out = block(x, residual=res)
            loss = (out * out).sum()
        expected = _unfused(ref_conv, ref_bn, x_ref, res_ref, "relu")
        loss_ref = (expected * expected).sum()
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close(out, expected, torch.bfloat16, "forward", "output")
    params = [x, block.conv.weight, block.bn.weight, block.bn.bias] + ([res] if res is not None else [])
    params_ref = [x_ref, ref_conv.weight, ref_bn.weight, ref_bn.bias] + ([res_ref] if res is not None else [])
    names = ["x", "conv.weight", "bn.weight", "bn.bias", "residual"]
    for name, got, want in zip(names, torch.autograd.grad(loss, params), torch.autograd.grad(loss_ref, params_ref)):
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape and torch.isfinite(got).all(), name


# (id, which of x, conv weight, conv bias, bn weight, bn bias, residual require grad)
REQUIRES_GRAD = [
    ("input-only", (True, False, False, False, False, True)),
    ("bn-only", (False, False, False, True, True, False)),
    ("conv-weight-only", (False, True, False, False, False, False)),
    ("conv-bias-and-bn-weight", (False, False, True, True, False, False)),
    ("all-but-input", (False, True, True, True, True, True)),
]


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("wanted", REQUIRES_GRAD, ids=[r[0] for r in REQUIRES_GRAD])
def test_partial_requires_grad(wanted, training, with_residual, transposed):
    """Frozen layers and fine-tuning: only some of the inputs need gradients."""
    dtype = torch.float64
    block = _make_block(2, dtype, "silu", seed=99, bias=True, transposed=transposed).train(training)
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input((2, 5, 6, 7), dtype, seed=20)
    res = make_input((2, 7, 6, 7), dtype, seed=21, offset=False) if with_residual else None
    x_ref, res_ref = x.clone(), None if res is None else res.clone()
    ours = [x, block.conv.weight, block.conv.bias, block.bn.weight, block.bn.bias, res]
    theirs = [x_ref, ref_conv.weight, ref_conv.bias, ref_bn.weight, ref_bn.bias, res_ref]
    for a, b, flag in zip(ours, theirs, wanted[1]):
        if a is not None:
            a.requires_grad_(flag)
            b.requires_grad_(flag)
    with rebuild_outputs():
        out = block(x, residual=res)
        loss = (out * out).sum()
    expected = _unfused(ref_conv, ref_bn, x_ref, res_ref, "silu")
    assert_close(out, expected, dtype, "forward", "output")
    pairs = [(a, b) for a, b in zip(ours, theirs) if a is not None and a.requires_grad]
    got = torch.autograd.grad(loss, [a for a, _ in pairs])
    want = torch.autograd.grad((expected * expected).sum(), [b for _, b in pairs])
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, dtype, "grad", f"gradient {i}")


# ---------------------------------------------------------------------------
# from_modules, construction, state_dict
# ---------------------------------------------------------------------------


def test_from_modules_shares_parameters():
    conv = torch.nn.Conv2d(5, 7, 3, padding=1, bias=True)
    bn = torch.nn.BatchNorm2d(7)
    block = ConvBN2d.from_modules(conv, bn, activation="leaky_relu", negative_slope=NEGATIVE_SLOPE)
    assert block.conv is conv and block.bn is bn
    assert block.conv.weight is conv.weight and block.bn.running_mean is bn.running_mean
    assert block.activation == "leaky_relu" and block.negative_slope == NEGATIVE_SLOPE
    assert "leaky_relu" in repr(block) and str(NEGATIVE_SLOPE) in repr(block)
    _randomize(block, seed=70)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    x = make_input((2, 5, 7, 9), torch.float32, seed=8)
    out = block(x)
    expected = F.leaky_relu(ref_bn(ref_conv(x)), NEGATIVE_SLOPE)
    assert_close(out, expected, torch.float32, "forward", "from_modules")
    # the running statistics of the shared bn itself were updated
    assert_close(bn.running_mean, ref_bn.running_mean, torch.float32, "stats", "running_mean")
    assert_close(bn.running_var, ref_bn.running_var, torch.float32, "stats", "running_var")
    assert int(bn.num_batches_tracked) == 1
    # and a change to the shared conv is seen by the block
    with torch.no_grad():
        conv.weight.mul_(2.0)
        ref_conv.weight.mul_(2.0)
    block.eval()
    ref_bn.eval()
    assert_close(block(x), F.leaky_relu(ref_bn(ref_conv(x)), NEGATIVE_SLOPE), torch.float32, "forward", "shared")


@pytest.mark.parametrize("cls,conv,bn,error,match", [
    pytest.param(ConvBN2d, torch.nn.ConvTranspose2d(5, 7, 3), torch.nn.BatchNorm2d(7), TypeError, "ConvTranspose2d",
                 id="conv-transpose"),
    pytest.param(ConvBN2d, torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), TypeError, "Linear", id="linear"),
    pytest.param(ConvBN2d, torch.nn.Conv1d(5, 7, 3), torch.nn.BatchNorm2d(7), TypeError, "Conv1d", id="wrong-rank"),
    pytest.param(ConvBN2d, torch.nn.Conv2d(5, 7, 3), torch.nn.BatchNorm2d(6), ValueError, "7 features",
                 id="bn-width"),
    pytest.param(ConvBN2d, torch.nn.Conv2d(5, 7, 3), torch.nn.GroupNorm(1, 7), ValueError, "BatchNorm",
                 id="not-bn"),
    pytest.param(ConvBN1d, torch.nn.Conv1d(5, 7, 3), torch.nn.BatchNorm1d(5), ValueError, "7 features",
                 id="bn-width-1d"),
])
def test_from_modules_rejects(cls, conv, bn, error, match):
    with pytest.raises(error, match=match):
        cls.from_modules(conv, bn)


def test_unknown_activation_rejected():
    with pytest.raises(ValueError, match="gelu"):
        ConvBN2d(3, 4, 3, activation="gelu")
    with pytest.raises(ValueError, match="tanh"):
        ConvBN2d.from_modules(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), activation="tanh")


def test_state_dict_keys_and_loading_from_sequential():
    block = ConvBN2d(5, 7, 3, padding=1, bias=True, activation="relu")
    assert list(block.state_dict()) == [
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked"]
    assert list(ConvBN3d(2, 3, 1).state_dict())[0] == "conv.weight"
    seq = torch.nn.Sequential(torch.nn.Conv2d(5, 7, 3, padding=1), torch.nn.BatchNorm2d(7), torch.nn.ReLU())
    _randomize(types.SimpleNamespace(conv=seq[0], bn=seq[1]), seed=71)
    seq[1].num_batches_tracked.fill_(3)
    remapped = {{"0": "conv", "1": "bn"}[k.split(".")[0]] + k[1:]: v for k, v in seq.state_dict().items()}
    block.load_state_dict(remapped, strict=True)
    for k, v in seq.state_dict().items():
        assert torch.equal(block.state_dict()[{"0": "conv", "1": "bn"}[k[0]] + k[1:]], v), k
    x = make_input((2, 5, 7, 9), torch.float32, seed=9)
    for training in (False, True):
        block.train(training)
        seq.train(training)
        assert_close(block(x), seq(x), torch.float32, "forward", f"after load, training={training}")
    assert_close(block.bn.running_mean, seq[1].running_mean, torch.float32, "stats", "running_mean")
    assert int(block.bn.num_batches_tracked) == 4


# ---------------------------------------------------------------------------
# save_memory_in
# ---------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self, fail=False):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_chain(depth=3, activation="relu", seed=80))
        self.fail = fail

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        if self.fail:
            raise RuntimeError("forward failed on purpose")
        return (x * x).sum()


def _outputs_alive(net, x):
    """Runs net(x); returns the loss and which block outputs are still alive."""
    refs = []
    handles = [b.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o))) for b in net.blocks]
    loss = net(x)
    for h in handles:
        h.remove()
    return loss, [r() is not None for r in refs]


def _a_block_output_outside_is_kept():
    """True when no rebuild_outputs context is left active: a block output
    saved by a later op is kept as itself."""
    block = _make_block(2, torch.float32, "relu", seed=90).train()
    out = block(make_input((2, 5, 4, 4), torch.float32, seed=1))
    ref = weakref.ref(out)
    loss = (out * out).sum()  # noqa: F841  (keeps the graph alive)
    del out
    return ref() is not None


def test_save_memory_in():
    net = _Net()
    plain = copy.deepcopy(net)
    keys = list(net.state_dict())
    assert save_memory_in(net) is net
    assert save_memory_in(net) is net  # twice: harmless, hooks registered once
    assert len(net._forward_pre_hooks) == 1 and len(net._forward_hooks) == 1
    assert list(net.state_dict()) == keys
    x = make_input((2, 5, 7, 9), torch.float32, seed=10).requires_grad_()
    x_plain = x.detach().clone().requires_grad_()

    loss, alive = _outputs_alive(net, x)
    assert alive == [False, False, False], f"save_memory_in: block outputs kept after forward: {alive}"
    loss_plain, alive_plain = _outputs_alive(plain, x_plain)
    assert alive_plain == [True, True, True]
    assert _a_block_output_outside_is_kept(), "rebuild_outputs still active after the forward"

    # entered once per forward even after two calls: the forward still works
    # and the gradients are those of the plain model, bit for bit
    assert torch.equal(loss, loss_plain)
    params = [x] + list(net.parameters())
    params_plain = [x_plain] + list(plain.parameters())
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(loss_plain, params_plain)):
        assert torch.equal(got, want)
    net.load_state_dict(plain.state_dict())  # same keys both ways
    plain.load_state_dict(net.state_dict())


def test_save_memory_in_exits_on_error():
    net = save_memory_in(_Net(fail=True))
    with pytest.raises(RuntimeError, match="on purpose"):
        net(make_input((2, 5, 7, 9), torch.float32, seed=11).requires_grad_())
    assert _a_block_output_outside_is_kept(), "rebuild_outputs left active by a failing forward"
    net.fail = False
    loss, alive = _outputs_alive(net, make_input((2, 5, 7, 9), torch.float32, seed=12).requires_grad_())
    assert alive == [False, False, False]
    loss.backward()


# ---------------------------------------------------------------------------
# Block outputs modified in place
# ---------------------------------------------------------------------------

INPLACE = {
    "add_": lambda out, s: out.add_(1.5),
    "view-mul_": lambda out, s: (out[:, 1:3].mul_(-2.0), out)[1],
    "mul_-param": lambda out, s: out.mul_(s),
    "sigmoid_": lambda out, s: out.sigmoid_(),  # saves its (changed) result
    "no_grad-add_": lambda out, s: _no_grad(out.add_, 0.75),
}


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


@pytest.mark.parametrize("activation", ["silu", "leaky_relu"])
@pytest.mark.parametrize("op", list(INPLACE))
def test_inplace_modified_output(op, activation):
    """A block output changed in place before a later op saves it is saved as
    it is, not rebuilt from its (stale) recipe."""
    dtype = torch.float64
    block = _make_block(2, dtype, activation, seed=95).train()
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input((2, 5, 7, 9), dtype, seed=13).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    s = randn((1, 7, 1, 1), 14, dtype, scale=0.5, offset=1.0).requires_grad_()
    s_ref = s.detach().clone().requires_grad_()
    g = make_input((2, 7, 7, 9), dtype, seed=15, offset=False)
    with rebuild_outputs():
        out = block(x)
        out = INPLACE[op](out, s)
        loss = (out * out * g).sum()
    expected = INPLACE[op](_unfused(ref_conv, ref_bn, x_ref, None, activation), s_ref)
    loss_ref = (expected * expected * g).sum()
    assert_close(out, expected, dtype, "forward", op)
    params = [x, s, block.conv.weight, block.bn.weight, block.bn.bias]
    params_ref = [x_ref, s_ref, ref_conv.weight, ref_bn.weight, ref_bn.bias]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    want = torch.autograd.grad(loss_ref, params_ref, allow_unused=True)
    for name, a, b in zip(["x", "s", "conv.weight", "bn.weight", "bn.bias"], got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(a, b, dtype, "grad", f"{op}: grad of {name}")
