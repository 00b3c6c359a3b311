"""Conv + BatchNorm blocks (torchnorm.nn.ConvBN1d/2d/3d, ConvTransposeBN1d/2d/3d,
conv_bn_forward) against unfused torch.nn Conv -> BatchNorm -> (+ residual) ->
act, in training and frozen (eval) mode: outputs, every gradient and the
running statistics over three steps, with an input given as an earlier block's
recipe (rebuilt in backward, torchnorm/_rebuild_ops.py) and as a plain tensor,
over ranks, conv options (groups, stride, dilation, padding modes, bias,
layouts, outputs smaller than the weight) and ConvTranspose options; gradcheck;
conv hooks (pruning); autocast; partial requires_grad; from_modules,
construction and state_dict.
"""
import copy
import types

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune

import torchnorm  # noqa: F401  (registers the ops)
from torchnorm.nn import ConvBN1d, ConvBN2d, ConvBN3d, conv_bn_forward
from conftest import (
    ACTIVATIONS,
    NEGATIVE_SLOPE,
    act_name,
    assert_close,
    make_conv_bn_block,
    make_input,
    memory_format_of,
    block_output_with_recipe,
    randomize_conv_bn,
    torch_act,
    unfused_conv_bn,
)
from tolerances import GRADCHECK


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---------------------------------------------------------------------------
# Blocks against unfused torch.nn modules
# ---------------------------------------------------------------------------


SPATIAL = {1: (9,), 2: (7, 9), 3: (3, 4, 5)}


def _compare_steps(block, dim, dtype, activation, with_residual, training, layout="contiguous", steps=3,
                   contexts=(True, False, True), seed=0, spatial=None, input_scale=2.0):
    """Runs `steps` forward/backward steps of the block and of unfused torch.nn
    copies of its conv and bn; compares outputs, every gradient and the running
    statistics. In step i the input comes with its recipe when contexts[i]
    (an earlier block's output, act(BN(pre_norm)): the block keeps the recipe,
    not the input, where it takes a conv op, and rebuilds the input in
    backward)."""
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    block.train(training)
    ref_conv.train(training)
    ref_bn.train(training)
    conv, bn = block.conv, block.bn
    in_shape = (2, conv.in_channels) + (spatial or SPATIAL[dim])
    params = [("conv.weight", conv.weight, ref_conv.weight), ("conv.bias", conv.bias, ref_conv.bias),
              ("bn.weight", bn.weight, ref_bn.weight), ("bn.bias", bn.bias, ref_bn.bias)]
    params = [p for p in params if p[1] is not None]
    for step in range(steps):
        s = seed + 1000 * step
        x = make_input(in_shape, dtype, layout=layout, seed=s, scale=input_scale)
        in_context = contexts[step % len(contexts)]
        recipe = None
        if in_context:
            x, recipe = block_output_with_recipe(x, seed=s + 3)
        x_ref = x.clone().requires_grad_()
        x = x.requires_grad_()
        with torch.no_grad():
            out_shape = ref_conv(x).shape
        res = make_input(out_shape, dtype, layout=layout, seed=s + 1, scale=1.0, offset=False) \
            if with_residual else None
        res_ref = None if res is None else res.clone().requires_grad_()
        res = None if res is None else res.requires_grad_()
        g = make_input(out_shape, dtype, seed=s + 2, scale=1.0, offset=False)

        out = block(x, residual=res, input_recipe=recipe)
        loss = (out * out * g).sum()
        expected = unfused_conv_bn(ref_conv, ref_bn, x_ref, res_ref, activation)
        loss_ref = (expected * expected * g).sum()
        where = f"step {step}, input {'with' if in_context else 'without'} its recipe"
        assert_close(out, expected, dtype, "forward", f"output, {where}")
        assert memory_format_of(out) == memory_format_of(expected), f"output layout, {where}"

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
    block = make_conv_bn_block(dim, dtype, activation, seed=dim)
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
    # the weight (output_is_smaller in csrc/conv_bn.cpp).
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
    block = make_conv_bn_block(dim, dtype, activation, seed=11, **kwargs)
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
    block = make_conv_bn_block(dim, dtype, activation, seed=13, transposed=True, **kwargs)
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
    block = make_conv_bn_block(2, dtype, "relu", seed=90, transposed=True, stride=2).train(training)
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input((2, 5, 4, 3), dtype, seed=91).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    size = (8, 5)  # 7 or 8 rows, 5 or 6 columns are possible: output padding (1, 0)
    res = make_input((2, 7) + size, dtype, seed=92, offset=False) if with_residual else None
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
    block = make_conv_bn_block(2, torch.float32, "relu", seed=93, transposed=True, stride=2)
    x = make_input((2, 5, 4, 3), torch.float32, seed=94)
    with pytest.raises(ValueError, match="requested an output size of"):
        block(x, output_size=(20, 5))
    conv_block = make_conv_bn_block(2, torch.float32, "relu", seed=95)
    with pytest.raises(TypeError, match="output_size applies to ConvTranspose only"):
        conv_bn_forward(conv_block.conv, conv_block.bn, x, "relu", output_size=(4, 3))


# ---------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------


def _gradcheck_setup(training, activation, with_residual, transposed=False):
    """A tiny float64 block and inputs; for relu / leaky_relu a seed whose
    pre-activation stays away from the kink at 0."""
    # a 2x2 kernel takes 3x3 to 2x2; transposed, 2x2 to 3x3
    in_size, out_size = (2, 3) if transposed else (3, 2)
    for seed in range(200):
        block = make_conv_bn_block(2, torch.float64, activation, seed=seed, in_channels=2, out_channels=3,
                            kernel_size=2, padding=0, bias=True, transposed=transposed).train(training)
        x = make_input((2, 2, in_size, in_size), torch.float64, seed=seed, scale=1.0)
        res = make_input((2, 3, out_size, out_size), torch.float64, seed=seed + 1, scale=1.0, offset=False) \
            if with_residual else None
        if activation not in ("relu", "leaky_relu"):
            break
        with torch.no_grad():
            ref = copy.deepcopy(block)
            pre = unfused_conv_bn(ref.conv, ref.bn, x, res, None)
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
    block = make_conv_bn_block(2, dtype, "relu", seed=97, in_channels=5, out_channels=5,
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
        out = block(x, residual=res)
        loss = (out * out).sum()
        expected = unfused_conv_bn(ref_conv, ref_bn, x, res, "relu")
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
    block = make_conv_bn_block(2, torch.float32, "relu", seed=98, in_channels=5, out_channels=5,
                        transposed=transposed).train(training)
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input((2, 5, 6, 7), torch.float32, seed=17).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    # the residual an autocast model passes: the previous block's bfloat16 output
    res = make_input((2, 5, 6, 7), torch.bfloat16, seed=18, offset=False).requires_grad_() if with_residual else None
    res_ref = None if res is None else res.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, residual=res)
        loss = (out * out).sum()
        expected = unfused_conv_bn(ref_conv, ref_bn, x_ref, res_ref, "relu")
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
    block = make_conv_bn_block(2, dtype, "silu", seed=99, bias=True, transposed=transposed).train(training)
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
    out = block(x, residual=res)
    loss = (out * out).sum()
    expected = unfused_conv_bn(ref_conv, ref_bn, x_ref, res_ref, "silu")
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
    randomize_conv_bn(block, seed=70)
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
    randomize_conv_bn(types.SimpleNamespace(conv=seq[0], bn=seq[1]), seed=71)
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
