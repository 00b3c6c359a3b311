"""torchnorm.fx: fold_conv_bn (inference: BatchNorm folded into the layer
before it) and fuse_conv_bn / unfuse_conv_bn (training: Conv+BN(+add)(+act)
chains run as torchnorm's memory-saving blocks).

Every fold is checked against the unfused model (float64 tightly, float32
with the float32 tolerances of tests/tolerances.py) on random BatchNorm
statistics and affine parameters (the defaults, mean 0 and variance 1, would
hide formula errors). torchvision and timm models are used when installed.
"""
import copy
import gc
import math
import operator
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import torchnorm.nn as tnn
from torchnorm.fx import FusedChain, fold_conv_bn, fold_parameters, fuse_conv_bn, unfuse_conv_bn
from torchnorm.fx.fold import DEFAULT_TOLERANCE
from torchnorm.nn.conv_bn import _ConvBNNd

from conftest import assert_close, generator, make_input

_BN = nn.modules.batchnorm._BatchNorm


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def randomize(model, seed=0):
    """Random, nonzero BatchNorm statistics and affine parameters (variance in
    [0.5, 1.5], mean and bias around +-0.5, weight around 1) and random
    layer biases, so that no term of the fold formula is an identity."""
    g = generator(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BN):
                C = module.num_features
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64) * 0.5 + 0.1)
                    module.running_var.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
                    module.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64) * 0.5 + 0.25)
            elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=g, dtype=torch.float64) * 0.3)
    return model


def batch_norm_ops(model):
    """BatchNorms a model still runs: BatchNorm / ConvBN module calls and
    F.batch_norm calls of its graph (its modules when it is not traced)."""
    if not isinstance(model, fx.GraphModule):
        return sum(isinstance(m, (_BN, _ConvBNNd)) for m in model.modules())
    count = 0
    for node in model.graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), (_BN, _ConvBNNd)):
            count += 1
        elif node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm):
            count += 1
    return count


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"the original model's {k} changed"


def fused_blocks(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, FusedChain)}


def relative_error(got, want):
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max()).item()


def assert_outputs_close(got, want, dtype):
    """float64: tolerances.py's float64 forward tolerance. float32 through many
    layers: the float32 forward tolerance, relative to the largest output
    (folding reorders the rounding of every layer, so tiny outputs next to
    large ones carry the large ones' absolute error)."""
    if dtype == torch.float64:
        assert_close(got, want, torch.float64, "forward")
    else:
        err = relative_error(got, want)
        assert err <= 1e-5, f"max |folded - unfused| / max |unfused| = {err:.3e}"


# ---------------------------------------------------------------------------
# fold_conv_bn: every layer type
# ---------------------------------------------------------------------------

# name -> (layer factory, BatchNorm factory, input shape, memory format)
FOLD_CASES = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
               lambda: nn.BatchNorm1d(6, eps=1e-3), (3, 4, 13), None),
    "conv1d-nobias-noaffine": (lambda: nn.Conv1d(5, 7, 2, bias=False),
                               lambda: nn.BatchNorm1d(7, affine=False), (2, 5, 9), None),
    "conv2d": (lambda: nn.Conv2d(6, 9, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=3),
               lambda: nn.BatchNorm2d(9), (2, 6, 11, 9), None),
    "conv2d-nobias-channels_last": (lambda: nn.Conv2d(5, 7, 3, padding=1, bias=False),
                                    lambda: nn.BatchNorm2d(7, eps=1e-2), (2, 5, 7, 10), torch.channels_last),
    "conv2d-noaffine": (lambda: nn.Conv2d(3, 5, 1), lambda: nn.BatchNorm2d(5, affine=False), (3, 3, 5, 5), None),
    "conv2d-torchnorm-bn": (lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2),
                            lambda: tnn.BatchNorm2d(6), (2, 4, 9, 7), None),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, stride=(1, 2, 1), padding=1, dilation=(2, 1, 1), groups=2),
               lambda: nn.BatchNorm3d(6), (2, 4, 5, 7, 6), None),
    "conv3d-nobias-channels_last_3d": (lambda: nn.Conv3d(3, 5, 2, bias=False),
                                       lambda: nn.BatchNorm3d(5), (2, 3, 4, 5, 3), torch.channels_last_3d),
    "convT1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2),
                lambda: nn.BatchNorm1d(6), (2, 4, 7), None),
    "convT2d": (lambda: nn.ConvTranspose2d(6, 9, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2),
                                           groups=3, dilation=(1, 2)),
                lambda: nn.BatchNorm2d(9, eps=1e-4), (2, 6, 5, 4), None),
    "convT2d-nobias-channels_last": (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, bias=False),
                                     lambda: nn.BatchNorm2d(6), (2, 4, 3, 5), torch.channels_last),
    "convT3d-nobias-noaffine": (lambda: nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1,
                                                           groups=2, bias=False),
                                lambda: nn.BatchNorm3d(6, affine=False), (2, 4, 3, 4, 3), None),
    "linear": (lambda: nn.Linear(7, 5), lambda: nn.BatchNorm1d(5), (6, 7), None),
    "linear-nobias": (lambda: nn.Linear(7, 5, bias=False), lambda: nn.BatchNorm1d(5, affine=False), (6, 7), None),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(FOLD_CASES))
def test_fold_every_layer_type(case, dtype):
    make_layer, make_bn, shape, memory_format = FOLD_CASES[case]
    torch.manual_seed(0)
    model = randomize(nn.Sequential(make_layer(), make_bn()), seed=1).to(dtype).eval()
    x = make_input(shape, dtype, seed=2)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    before = snapshot(model)
    with torch.no_grad():
        want = model(x)

    linear = case.startswith("linear")  # Linear folds need example inputs showing a 2-D input
    folded = fold_conv_bn(model, (x,) if linear else None)

    # The BatchNorm is gone, the layer keeps its type with new parameters.
    assert isinstance(folded, fx.GraphModule)
    assert batch_norm_ops(folded) == 0
    assert not any(isinstance(m, _BN) for m in folded.modules())
    layer = folded.get_submodule("0")
    assert type(layer) is type(model[0])
    assert not torch.equal(layer.weight, model[0].weight)
    assert layer.bias is not None and layer.weight.dtype == dtype and layer.bias.dtype == dtype
    report = folded.fold_report
    assert [(f.layer, f.batch_norm, f.folded) for f in report.folds] == [("0", "1", True)]
    if linear:
        assert report.output_error is not None and report.folds[0].error is not None
    else:
        assert report.output_error is None and report.folds[0].error is None

    with torch.no_grad():
        got = folded(x)
    assert got.shape == want.shape
    assert_close(got, want, dtype, "forward", msg=case)

    # The original model is untouched: BatchNorm still there, same tensors, same output.
    assert isinstance(model[1], _BN)
    assert_state_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), want)


def _hand_fold(layer, mean, var, eps, weight, bias):
    """The fold formula (docs/design.md, Numerics) in float64, one output channel at a time:
    W' = W * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta."""
    W = layer.weight.detach().double()
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(out, dtype=torch.float64)
    Wf, bf = W.clone(), torch.empty(out, dtype=torch.float64)
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    for o in range(out):
        g = 1.0 if weight is None else weight[o].double().item()
        beta = 0.0 if bias is None else bias[o].double().item()
        s = g / math.sqrt(var[o].double().item() + eps)
        if transposed:  # weight (in, out / groups, *k)
            per_group = out // layer.groups
            group, j = divmod(o, per_group)
            rows = slice(group * (W.shape[0] // layer.groups), (group + 1) * (W.shape[0] // layer.groups))
            Wf[rows, j] = W[rows, j] * s
        else:
            Wf[o] = W[o] * s
        bf[o] = (b[o].item() - mean[o].double().item()) * s + beta
    return Wf, bf


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("layer_kind", ["conv2d", "conv2d-nobias", "convT2d-groups", "convT3d", "linear"])
def test_fold_parameters_formula(layer_kind, affine):
    torch.manual_seed(3)
    layer = {
        "conv2d": lambda: nn.Conv2d(6, 8, 3, groups=2),
        "conv2d-nobias": lambda: nn.Conv2d(3, 4, 2, bias=False),
        "convT2d-groups": lambda: nn.ConvTranspose2d(6, 9, 3, groups=3),
        "convT3d": lambda: nn.ConvTranspose3d(4, 6, 2, groups=2, bias=False),
        "linear": lambda: nn.Linear(5, 7),
    }[layer_kind]().double()
    randomize(layer, seed=4)
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    g = generator(5)
    mean = torch.randn(out, generator=g, dtype=torch.float64) + 0.3
    var = torch.rand(out, generator=g, dtype=torch.float64) * 2 + 0.1
    weight = torch.randn(out, generator=g, dtype=torch.float64) + 0.5 if affine else None
    bias = torch.randn(out, generator=g, dtype=torch.float64) if affine else None
    eps = 1e-3

    W, b = fold_parameters(layer, mean, var, eps, weight, bias)
    W_hand, b_hand = _hand_fold(layer, mean, var, eps, weight, bias)
    assert W.dtype == torch.float64 and W.shape == layer.weight.shape and b.shape == (out,)
    torch.testing.assert_close(W, W_hand, atol=0, rtol=1e-13)
    torch.testing.assert_close(b, b_hand, atol=1e-14, rtol=1e-13)

    # A float32 layer gets float32 results: the float64 fold, rounded once.
    layer32 = copy.deepcopy(layer).float()
    W32, b32 = fold_parameters(layer32, mean.float(), var.float(), eps, None if weight is None else weight.float(),
                               None if bias is None else bias.float())
    W_hand32, b_hand32 = _hand_fold(layer32, mean.float(), var.float(), eps, None if weight is None else weight.float(),
                                    None if bias is None else bias.float())
    assert W32.dtype == torch.float32 and b32.dtype == torch.float32
    assert torch.allclose(W32.double(), W_hand32, rtol=2 ** -23, atol=0)
    assert torch.allclose(b32.double(), b_hand32, rtol=2 ** -23, atol=1e-30)


class FunctionalBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        g = generator(11)
        self.register_buffer("rm", torch.randn(5, generator=g, dtype=torch.float64).float())
        self.register_buffer("rv", (torch.rand(5, generator=g, dtype=torch.float64) + 0.5).float())
        self.w = nn.Parameter(torch.rand(5, generator=g, dtype=torch.float64).float() + 0.5)
        self.b = nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64).float())

    def forward(self, x):
        y = F.batch_norm(self.conv(x), self.rm, self.rv, self.w, self.b, training=False, eps=1e-3)
        return torch.tanh(y)


def test_fold_functional_batch_norm():
    model = FunctionalBN().double().eval()
    randomize(model, seed=12)
    x = make_input((2, 3, 6, 7), torch.float64, seed=13)
    folded = fold_conv_bn(model)
    assert batch_norm_ops(fx.symbolic_trace(model)) == 1
    assert batch_norm_ops(folded) == 0
    [fold] = folded.fold_report.folds
    assert fold.folded and fold.layer == "conv" and fold.batch_norm == "batch_norm"
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float64, "forward")


def test_fold_functional_batch_norm_training_is_refused():
    class TrainingFunctional(FunctionalBN):
        def forward(self, x):
            return F.batch_norm(self.conv(x), self.rm, self.rv, self.w, self.b, training=True)

    with pytest.raises(ValueError, match="training"):
        fold_conv_bn(TrainingFunctional().eval())


class FunctionalLayer(nn.Module):
    """A functional Conv / ConvTranspose / Linear call on model attributes,
    then a BatchNorm module (or F.batch_norm on attributes)."""

    def __init__(self, call, weight_shape, bias, bn, functional_bn=False):
        super().__init__()
        self.call, self.functional_bn = call, functional_bn
        self.w = nn.Parameter(torch.randn(weight_shape) * 0.3)
        self.b = nn.Parameter(torch.randn(bn.num_features)) if bias else None
        self.bn = bn

    def forward(self, x):
        z = self.call(x, self.w, self.b)
        if self.functional_bn:
            bn = self.bn
            return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        return self.bn(z)


# name -> (call, weight shape, bias, BatchNorm, functional BN, input shape)
FUNCTIONAL_FOLD_CASES = {
    "conv2d-groups-stride": (lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, groups=2), (6, 2, 3, 3), True,
                             lambda: nn.BatchNorm2d(6), False, (2, 4, 9, 8)),
    "conv1d-same-nobias": (lambda x, w, b: F.conv1d(x, w, b, padding="same", dilation=2), (5, 3, 3), False,
                           lambda: nn.BatchNorm1d(5), True, (3, 3, 11)),
    "conv3d": (lambda x, w, b: torch.conv3d(x, w, b, (1, 2, 1), 1), (4, 3, 2, 3, 2), True,
               lambda: tnn.BatchNorm3d(4), False, (2, 3, 4, 6, 5)),
    "conv_transpose2d-groups": (lambda x, w, b: F.conv_transpose2d(x, w, b, 2, 1, 1, 2), (4, 3, 3, 3), True,
                                lambda: nn.BatchNorm2d(6), True, (2, 4, 5, 4)),
    "linear": (lambda x, w, b: F.linear(x, w, b), (5, 7), True, lambda: nn.BatchNorm1d(5), False, (6, 7)),
}


@pytest.mark.parametrize("case", list(FUNCTIONAL_FOLD_CASES))
def test_fold_functional_layer(case):
    call, wshape, bias, make_bn, functional_bn, shape = FUNCTIONAL_FOLD_CASES[case]
    torch.manual_seed(0)
    model = randomize(FunctionalLayer(call, wshape, bias, make_bn(), functional_bn), seed=3).double().eval()
    x = make_input(shape, torch.float64, seed=4)
    before = snapshot(model)
    with torch.no_grad():
        want = model(x)
    folded = fold_conv_bn(model, (x,))
    assert batch_norm_ops(folded) == 0
    [fold] = folded.fold_report.folds
    assert fold.folded and fold.error <= 1e-10, str(folded.fold_report)
    layers = [m for m in folded.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d,
                                                             nn.Linear))]
    assert len(layers) == 1 and layers[0].bias is not None
    assert not hasattr(folded, "w") and not hasattr(folded, "b"), "the unfolded parameters were kept"
    assert [n for n in folded.graph.nodes if n.op == "get_attr"] == []
    with torch.no_grad():
        assert_close(folded(x), want, torch.float64, "forward", msg=case)
    assert_state_unchanged(model, before)


def test_fold_functional_layer_refusals():
    """A functional layer whose weight is computed, or whose output is used twice,
    is left alone, with the reason."""
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(F.conv2d(x, self.w * 2, padding=1))

    class UsedTwice(Computed):
        def forward(self, x):
            z = F.conv2d(x, self.w, padding=1)
            return self.bn(z) + z

    class SameWithStride(Computed):
        def forward(self, x):
            return self.bn(F.conv2d(x, self.w, None, 2, "same"))

    with pytest.raises(ValueError, match="weight is not a constant attribute"):
        fold_conv_bn(Computed().eval())
    with pytest.raises(ValueError, match="used more than once"):
        fold_conv_bn(UsedTwice().eval())
    with pytest.raises(ValueError, match="make no Conv2d"):
        fold_conv_bn(SameWithStride().eval())


def test_fold_functional_layer_keeps_weight_a_module_still_reads():
    """F.conv2d on a conv module's own weight, with the module also called:
    the folded call gets its own parameters and the module keeps its weight."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(x) + self.bn(F.conv2d(x, self.conv.weight, None, 1, 1))

    model = randomize(Shared(), seed=5).double().eval()
    x = make_input((2, 3, 5, 6), torch.float64, seed=6)
    folded = fold_conv_bn(model)
    assert batch_norm_ops(folded) == 0 and hasattr(folded.conv, "weight")
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float64, "forward")


# ---------------------------------------------------------------------------
# fold_conv_bn: BatchNorms with an activation / residual, ConvBN blocks
# ---------------------------------------------------------------------------


class ConvBNAct(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.conv = nn.Conv2d(4, bn.num_features, 3, padding=1)
        self.bn = bn

    def forward(self, x):
        return self.bn(self.conv(x))


class ConvBNActResidual(ConvBNAct):
    def forward(self, x):
        return self.bn(self.conv(x), x)


@pytest.mark.parametrize("activation", ["relu", "silu", "leaky_relu"])
def test_fold_torchnorm_batch_norm_act(activation):
    bn = tnn.BatchNormAct2d(6, activation=activation, negative_slope=0.2)
    model = randomize(ConvBNAct(bn), seed=20).double().eval()
    x = make_input((2, 4, 5, 6), torch.float64, seed=21)
    folded = fold_conv_bn(model)
    assert batch_norm_ops(folded) == 0
    # the activation stays, as a call after the folded conv
    assert [n.op for n in folded.graph.nodes] == ["placeholder", "call_module", "call_function", "output"]
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float64, "forward")


@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_fold_torchnorm_batch_norm_act_residual(activation):
    bn = tnn.BatchNormAct2d(4, activation=activation)
    model = randomize(ConvBNActResidual(bn), seed=22).double().eval()
    x = make_input((2, 4, 5, 6), torch.float64, seed=23)
    folded = fold_conv_bn(model)
    assert batch_norm_ops(folded) == 0
    adds = [n for n in folded.graph.nodes if n.op == "call_function" and n.target in (torch.add, operator.add)]
    assert len(adds) == 1 and adds[0].args[1].op == "placeholder"
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float64, "forward")


@pytest.mark.parametrize("act_layer", ["silu", "relu"])
def test_fold_timm_batch_norm_act(act_layer):
    timm_layers = pytest.importorskip("timm.layers")
    act = {"silu": nn.SiLU, "relu": nn.ReLU}[act_layer]
    bn = timm_layers.BatchNormAct2d(6, act_layer=act)
    model = randomize(ConvBNAct(bn), seed=24).double().eval()
    x = make_input((2, 4, 5, 6), torch.float64, seed=25)
    folded = fold_conv_bn(model)
    assert batch_norm_ops(folded) == 0
    assert not any(type(m).__name__ == "BatchNormAct2d" for m in folded.modules())
    assert any(isinstance(m, act) for m in folded.modules()), "the activation module is kept"
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float64, "forward")


class ConvBNBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = tnn.ConvBN2d(3, 6, 3, padding=1, activation="relu")
        self.b = tnn.ConvBN2d(6, 6, 3, padding=1, bias=True, activation="leaky_relu", negative_slope=0.2)
        self.c = tnn.ConvBN2d(6, 6, 1, activation=None)
        self.d = tnn.ConvBN2d(6, 6, 3, padding=1, activation="silu")
        self.e = tnn.ConvTransposeBN2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2, activation="relu")

    def forward(self, x):
        y = self.a(x)
        y = self.b(y, y * 0.5)  # residual + activation
        y = self.c(y)           # no activation
        y = self.d(y, residual=torch.tanh(y))
        return self.e(y)        # transposed


def test_fold_convbn_blocks():
    model = randomize(ConvBNBlocks(), seed=26).double().eval()
    x = make_input((2, 3, 6, 5), torch.float64, seed=27)
    folded = fold_conv_bn(model)
    assert batch_norm_ops(folded) == 0
    assert not any(isinstance(m, (_BN, _ConvBNNd)) for m in folded.modules())
    assert [(f.layer, f.batch_norm, f.folded) for f in folded.fold_report.folds] == [
        (f"{n}.conv", f"{n}.bn", True) for n in "abcde"]
    adds = [n for n in folded.graph.nodes if n.op == "call_function" and n.target is torch.add]
    assert len(adds) == 2
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float64, "forward")


class TransposedOutputSize(nn.Module):
    """ConvTranspose calls given an output_size: a module call (size from a
    tensor's shape at run time) and a torchnorm block (a constant size)."""

    def __init__(self):
        super().__init__()
        self.up, self.bn = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4)
        self.block = tnn.ConvTransposeBN2d(4, 3, 3, stride=2, padding=1, activation="relu")

    def forward(self, x):
        y = F.relu(self.bn(self.up(x, output_size=(2 * x.shape[2], 2 * x.shape[3]))))
        return self.block(y, output_size=[4 * x.shape[2] - 1, 4 * x.shape[3]])


@pytest.mark.parametrize("checked", [False, True], ids=["unchecked", "checked"])
def test_fold_transposed_with_output_size(checked):
    """The folded ConvTranspose keeps the call's output_size (the output
    padding it picks), and the fold check runs the layer with it."""
    model = randomize(TransposedOutputSize(), seed=30).double().eval()
    x = make_input((2, 3, 3, 4), torch.float64, seed=31)
    folded = fold_conv_bn(model, (x,) if checked else None)
    assert batch_norm_ops(folded) == 0
    assert all(f.folded for f in folded.fold_report.folds) and len(folded.fold_report.folds) == 2
    if checked:
        assert all(f.error <= DEFAULT_TOLERANCE[torch.float64] for f in folded.fold_report.folds)
    with torch.no_grad():
        got = folded(x)
        assert got.shape == (2, 3, 11, 16)
        assert_close(got, model(x), torch.float64, "forward")


class ChainedResidual(nn.Module):
    """The ResNet shape: the residual of a fold is the output of the fold before."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        if kind == "ConvBN2d":
            self.a = tnn.ConvBN2d(3, 6, 3, padding=1, activation="relu")
            self.b = tnn.ConvBN2d(6, 6, 3, padding=1, activation="relu")
        else:
            self.c1, self.n1 = nn.Conv2d(3, 6, 3, padding=1), tnn.BatchNormAct2d(6, activation="relu")
            self.c2, self.n2 = nn.Conv2d(6, 6, 3, padding=1), tnn.BatchNormAct2d(6, activation="relu")

    def forward(self, x):
        if self.kind == "ConvBN2d":
            y = self.a(x)
            return self.b(y, y)
        y = self.n1(self.c1(x))
        return self.n2(self.c2(y), y)


@pytest.mark.parametrize("kind", ["ConvBN2d", "BatchNormAct2d"])
def test_fold_residual_from_previous_fold(kind):
    model = randomize(ChainedResidual(kind), seed=28).double().eval()
    x = make_input((2, 3, 5, 6), torch.float64, seed=29)
    folded = fold_conv_bn(model)
    assert batch_norm_ops(folded) == 0
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float64, "forward")


# ---------------------------------------------------------------------------
# fold_conv_bn: what is left alone, errors
# ---------------------------------------------------------------------------


class LeftAlone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)      # conv output used twice
        self.conv_b, self.conv_c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn_s = nn.BatchNorm2d(4)                                                   # shared BatchNorm
        self.conv_s = nn.Conv2d(3, 4, 3, padding=1)                                     # shared conv
        self.bn_d, self.bn_e = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.conv_t, self.bn_t = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)                  # training BatchNorm
        self.conv_f, self.bn_f = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)      # foldable

    def forward(self, x):
        y = self.conv_a(x)
        out = self.bn_a(y) + y
        out = out + self.bn_s(self.conv_b(x)) * self.bn_s(self.conv_c(x))
        out = out + self.bn_d(self.conv_s(x)) - self.bn_e(self.conv_s(x))
        out = out + self.bn_t(self.conv_t(x))
        return out + self.bn_f(self.conv_f(x))


def test_fold_leaves_alone_and_reports():
    model = randomize(LeftAlone(), seed=30).double().eval()
    model.bn_t.train()
    x = make_input((2, 3, 6, 5), torch.float64, seed=31)
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"training mode.*bn_t.*eval\(\)"):
        folded = fold_conv_bn(model)
    reasons = {f.batch_norm: (f.folded, f.reason) for f in folded.fold_report.folds}
    assert reasons["bn_f"] == (True, "")
    assert [f.batch_norm for f in folded.fold_report.folded] == ["bn_f"]
    assert not reasons["bn_a"][0] and "used more than once" in reasons["bn_a"][1]
    assert not reasons["bn_s"][0] and "more than once" in reasons["bn_s"][1]
    assert sum(f.batch_norm == "bn_s" for f in folded.fold_report.folds) == 2
    assert not reasons["bn_d"][0] and "conv_s is called more than once" in reasons["bn_d"][1]
    assert not reasons["bn_e"][0] and "conv_s is called more than once" in reasons["bn_e"][1]
    assert not reasons["bn_t"][0] and "training mode" in reasons["bn_t"][1]
    # every BatchNorm but bn_f is still called
    remaining = {n.target for n in folded.graph.nodes
                 if n.op == "call_module" and isinstance(folded.get_submodule(n.target), _BN)}
    assert remaining == {"bn_a", "bn_s", "bn_d", "bn_e", "bn_t"}
    assert batch_norm_ops(folded) == 6
    assert isinstance(model.bn_f, nn.BatchNorm2d)
    with torch.no_grad():
        assert_close(folded(x), reference(x), torch.float64, "forward")


def test_fold_no_warning_without_training_batch_norm():
    model = randomize(LeftAlone(), seed=32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fold_conv_bn(model)


def test_fold_nothing_to_fold_raises():
    with pytest.raises(ValueError, match=r"no Conv.*\(the model has no BatchNorm\)"):
        fold_conv_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval())
    with pytest.raises(ValueError, match="does not follow a Conv"):
        fold_conv_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval())


def test_fold_only_training_batch_norm_raises():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with pytest.raises(ValueError, match=r"training mode.*eval\(\)"):
        fold_conv_bn(model)
    block = tnn.ConvBN2d(3, 4, 3).train()
    with pytest.raises(ValueError, match=r"training mode.*eval\(\)"):
        fold_conv_bn(nn.Sequential(block))


def test_fold_linear_on_3d_input_is_not_folded_wrongly():
    model = randomize(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), seed=33).double().eval()
    x = make_input((2, 8, 8), torch.float64, seed=34)  # BatchNorm1d normalizes dim 1, Linear maps dim 2
    folded = fold_conv_bn(model)
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float64, "forward")


# ---------------------------------------------------------------------------
# fold_conv_bn: example_inputs, report, tolerance
# ---------------------------------------------------------------------------


class TwoFolds(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_b, self.bn_b = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(x)))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fold_report_with_example_inputs(dtype):
    model = randomize(TwoFolds(), seed=40).to(dtype).eval()
    x = make_input((2, 3, 7, 6), dtype, seed=41)
    folded = fold_conv_bn(model, (x,))
    report = folded.fold_report
    assert [(f.layer, f.batch_norm, f.folded) for f in report.folds] == [("conv_a", "bn_a", True),
                                                                         ("conv_b", "bn_b", True)]
    assert report.tolerance == DEFAULT_TOLERANCE[dtype]
    # each error is the fold's own: folded layer vs BatchNorm(layer) on the input the layer saw
    with torch.no_grad():
        h = model.conv_a(x)
        errors = [relative_error(folded.conv_a(x), model.bn_a(h)),
                  relative_error(folded.conv_b(F.relu(model.bn_a(h))), model.bn_b(model.conv_b(F.relu(model.bn_a(h)))))]
    for fold, want in zip(report.folds, errors):
        assert math.isfinite(fold.error) and 0 <= fold.error <= DEFAULT_TOLERANCE[dtype]
        assert fold.error == pytest.approx(want, rel=1e-2, abs=4 * torch.finfo(dtype).eps)
    with torch.no_grad():
        got, want = folded(x), model(x)
    assert report.output_error == pytest.approx(relative_error(got, want), rel=1e-6, abs=1e-300)
    assert report.output_error <= DEFAULT_TOLERANCE[dtype]
    assert_outputs_close(got, want, dtype)
    text = str(report)
    for name in ("conv_a", "bn_a", "conv_b", "bn_b", "folded", "2 of 2 BatchNorms folded"):
        assert name in text
    assert f"{report.folds[0].error:.2e}" in text


def test_fold_checks_run_without_tf32():
    """On a GPU, cuDNN convolutions default to TF32, whose rounding (~1e-3)
    is over the float32 tolerance: the fold checks turn it off while they run
    (every conv call sees it off) and restore the caller's setting after."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(torch.backends.cudnn.allow_tf32))
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        fold_conv_bn(model, (torch.randn(2, 3, 6, 6),))
        assert seen and not any(seen), seen
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_fold_tolerance_zero_refuses():
    model = randomize(TwoFolds(), seed=42).eval()
    x = make_input((2, 3, 7, 6), torch.float32, seed=43)
    folded = fold_conv_bn(model, (x,), tolerance=0.0)
    report = folded.fold_report
    assert len(report.folds) == 2 and report.folded == []
    for fold in report.folds:
        assert fold.error > 0, "float32 folds round differently from BatchNorm: the test needs a nonzero error"
        assert not fold.folded and "tolerance" in fold.reason
    assert batch_norm_ops(folded) == 2
    assert isinstance(folded.bn_a, nn.BatchNorm2d) and isinstance(folded.bn_b, nn.BatchNorm2d)
    assert "0 of 2 BatchNorms folded" in str(report) and "tolerance" in str(report)
    with torch.no_grad():
        assert_close(folded(x), model(x), torch.float32, "forward")
    assert report.output_error == 0.0


def test_fold_overflowing_fold_is_refused():
    """A zero-variance channel (var = smallest float32 denormal, eps = 0) with a
    large BN weight: BatchNorm's own scale g / sqrt(var) = 2.7e37 still fits
    float32, but the folded weight W * g / sqrt(var) = 2.7e40 overflows to inf.
    BatchNorm maps the constant conv output 0 to beta; the folded conv gives
    inf - inf = nan."""
    conv = nn.Conv2d(2, 2, 1, bias=False)
    bn = nn.BatchNorm2d(2, eps=0.0)
    with torch.no_grad():
        conv.weight.fill_(1e3)
        bn.running_mean.zero_()
        bn.running_var.fill_(1e-45)
        bn.weight.fill_(1e15)
        bn.bias.fill_(0.5)
    # a healthy fold next to it, which must still be folded
    model = nn.Sequential(conv, bn, nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).eval()
    randomize(model[3], seed=44)
    x = torch.randn(2, 1, 4, 4, generator=generator(45))
    x = torch.cat([x, -x], dim=1)  # the conv output is exactly 0
    with torch.no_grad():
        want = model(x)
    assert torch.isfinite(want).all()
    folded = fold_conv_bn(model, (x,))
    f1, f3 = folded.fold_report.folds
    assert (f1.layer, f1.batch_norm, f1.folded) == ("0", "1", False)
    assert f1.error == math.inf and "tolerance" in f1.reason
    assert (f3.layer, f3.batch_norm, f3.folded) == ("2", "3", True)
    assert isinstance(folded.get_submodule("1"), nn.BatchNorm2d)
    with torch.no_grad():
        got = folded(x)
    assert torch.isfinite(got).all()
    assert_close(got, want, torch.float32, "forward")
    # Unchecked, the fold is made and is wrong: that is what the check is for.
    with torch.no_grad():
        assert not torch.isfinite(fold_conv_bn(model)(x)).all()


# ---------------------------------------------------------------------------
# fold_conv_bn on real models, against torch.fx.experimental.optimization.fuse
# ---------------------------------------------------------------------------


def _real_model(name):
    if name.startswith("tv_"):
        torchvision = pytest.importorskip("torchvision")
        return getattr(torchvision.models, name[3:])(num_classes=10)
    timm = pytest.importorskip("timm")
    return timm.create_model(name[5:], num_classes=10)


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_mobilenet_v2", "timm_resnet18", "timm_mobilenetv3_small_100"])
def test_fold_real_models_vs_torch_fuse(name):
    from torch.fx.experimental.optimization import fuse as torch_fuse

    torch.manual_seed(50)
    model = randomize(_real_model(name), seed=51).eval()
    x = make_input((2, 3, 64, 64), torch.float32, seed=52, offset=False)
    n_bn = batch_norm_ops(model)
    folded = fold_conv_bn(model)
    by_torch = torch_fuse(model)
    assert batch_norm_ops(model) == n_bn > 0, "the original model is untouched"
    left, left_by_torch = batch_norm_ops(folded), batch_norm_ops(by_torch)
    assert left <= left_by_torch
    assert left == 0
    assert len(folded.fold_report.folded) == n_bn
    with torch.no_grad():
        want = model(x)
        assert_outputs_close(folded(x), want, torch.float32)
    if name == "timm_mobilenetv3_small_100":
        # timm's BatchNormAct2d (Hardswish / ReLU / Identity): torch's fuse
        # traces through it and keeps its F.batch_norm; fold_conv_bn folds it.
        timm_layers = pytest.importorskip("timm.layers")
        assert any(isinstance(m, timm_layers.BatchNormAct2d) for m in model.modules())
        assert left_by_torch == n_bn


# ---------------------------------------------------------------------------
# fuse_conv_bn (training)
# ---------------------------------------------------------------------------


def _train_steps(model, steps, shape, seed, dtype):
    """SGD with momentum on a cross-entropy loss, parameters in name order."""
    params = [p for _, p in sorted(model.named_parameters())]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    for step in range(steps):
        x = make_input(shape, dtype, seed=seed + step)
        target = torch.randint(0, 10, (shape[0],), generator=generator(seed + 100 + step))
        opt.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()


def _check_fused_training(model, expected_blocks, shape):
    """fuse_conv_bn of `model` (float64): block count, shared state_dict,
    training steps and eval-mode outputs / gradients against an unfused copy."""
    model = model.double()
    randomize(model, seed=60)
    reference = copy.deepcopy(model).train()
    keys = list(model.state_dict())
    fused = fuse_conv_bn(model.train())
    blocks = fused_blocks(fused)
    assert len(blocks) == expected_blocks

    # (b) the same state_dict keys, the very same tensors
    fused_state, state = fused.state_dict(), model.state_dict()
    assert list(fused_state) == keys
    for k in keys:
        assert fused_state[k].data_ptr() == state[k].data_ptr(), k
    fused_params = dict(fused.named_parameters())
    assert sorted(fused_params) == sorted(n for n, _ in model.named_parameters())

    # (c) three training steps give the same parameters and running statistics
    before = snapshot(model)
    _train_steps(fused, 3, shape, seed=61, dtype=torch.float64)
    _train_steps(reference, 3, shape, seed=61, dtype=torch.float64)
    want = reference.state_dict()
    changed = []
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            assert v.item() == want[k].item() == 3, k
        else:
            assert_close(v, want[k], torch.float64, "stats", msg=k)
            changed.append(not torch.equal(v, before[k]))
            if "running_" in k:
                assert changed[-1], f"{k} was not updated"
    # (a BatchNorm bias right before another training BatchNorm has no gradient)
    assert sum(changed) >= 0.9 * len(changed), "the steps must change the model for the comparison to mean something"

    # (d) frozen BatchNorm (eval): outputs and gradients
    fused.eval()
    reference.eval()
    x = make_input(shape, torch.float64, seed=70)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, out_ref = fused(xa), reference(xb)
    assert_close(out, out_ref, torch.float64, "forward")
    g = torch.randn(out.shape, generator=generator(71), dtype=torch.float64)
    fused.zero_grad()
    reference.zero_grad()
    out.backward(g)
    out_ref.backward(g)
    assert_close(xa.grad, xb.grad, torch.float64, "grad", msg="input grad")
    ref_params = dict(reference.named_parameters())
    for n, p in fused.named_parameters():
        assert_close(p.grad, ref_params[n].grad, torch.float64, "grad", msg=n)
    return fused


def test_fuse_torchvision_resnet18_trains_like_unfused():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(62)
    model = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in model.double().state_dict().items()}
    _check_fused_training(model, 20, (4, 3, 64, 64))
    # training the fused model trained the original one (shared parameters)
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])
    assert not torch.equal(model.bn1.running_mean, before["bn1.running_mean"])


def test_fuse_timm_batch_norm_act_trains_like_unfused():
    timm = pytest.importorskip("timm")
    timm_layers = pytest.importorskip("timm.layers")
    name = "test_efficientnet"
    if name not in timm.list_models(name):
        pytest.skip(f"timm has no {name}")
    torch.manual_seed(63)
    model = timm.create_model(name, num_classes=10, drop_rate=0.0)
    bn_acts = [m for m in model.modules() if isinstance(m, timm_layers.BatchNormAct2d)]
    assert bn_acts and any(isinstance(m.act, nn.SiLU) for m in bn_acts)
    n_bn = sum(isinstance(m, _BN) for m in model.modules())
    # 64x64, not 32x32: the last stage must have more than 1x1 pixels per
    # sample, or its BatchNorms see 2 values per channel, where the backward
    # is ill-conditioned and two correct float64 kernels already differ by ~1e-7.
    fused = _check_fused_training(model, n_bn, (2, 3, 64, 64))
    assert any(b.activation == "silu" for b in fused_blocks(fused).values())


class Generator(nn.Module):
    """A DCGAN-style generator (ConvTranspose -> BatchNorm -> ReLU from a 1x1
    latent), with a residual block and a last layer given an output_size
    that needs an output padding of 1, and a linear head for a class loss."""

    def __init__(self):
        super().__init__()
        self.up1, self.bn1 = nn.ConvTranspose2d(8, 16, 4, bias=False), nn.BatchNorm2d(16)  # 1x1 -> 4x4
        self.up2, self.bn2 = nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False), nn.BatchNorm2d(8)  # -> 8x8
        self.up3, self.bn3 = nn.ConvTranspose2d(8, 8, 3, 1, 1, groups=2), nn.BatchNorm2d(8)
        self.up4, self.bn4 = nn.ConvTranspose2d(8, 4, 3, 2, 1), nn.BatchNorm2d(4)  # -> 16x16
        self.head = nn.Linear(4 * 16 * 16, 10)

    def forward(self, z):
        y = F.relu(self.bn1(self.up1(z)))
        y = F.relu(self.bn2(self.up2(y)))
        y = F.relu(self.bn3(self.up3(y)) + y)
        y = torch.tanh(self.bn4(self.up4(y, output_size=[16, 16])))
        return self.head(y.flatten(1))


def _assert_same_outputs_in_both_modes(restored, fused, x):
    """An unfused model and the fused one it came from compute the same, in
    training and in eval mode."""
    for mode in (False, True):
        fused.train(mode)
        restored.train(mode)
        with torch.no_grad():
            assert_close(restored(x), fused(x), torch.float64, "forward", msg=f"training={mode}")


def test_fuse_transposed_generator_trains_like_unfused():
    """ConvTranspose chains fuse like conv ones: batch statistics, frozen BN
    (the 1x1-latent layer's output is smaller than its weight, so frozen BN
    scales the output there and folds the weight elsewhere), the residual
    block and the call given an output_size; unfuse_conv_bn gives the plain
    graph back."""
    torch.manual_seed(64)
    model = Generator()
    fused = _check_fused_training(model, 4, (4, 8, 1, 1))
    blocks = {b.steps[0][1]: b for b in fused_blocks(fused).values()}
    assert sorted(blocks) == ["up1", "up2", "up3", "up4"]
    up4 = next(n for n in fused.graph.nodes if n.op == "call_module" and n.target == "up4_fused")
    assert up4.kwargs == {"output_size": [16, 16]}
    up3 = next(n for n in fused.graph.nodes if n.op == "call_module" and n.target == "up3_fused")
    assert len(up3.args) == 2, "the residual block takes its identity"
    restored = unfuse_conv_bn(fused)
    assert not fused_blocks(restored)
    x = make_input((4, 8, 1, 1), torch.float64, seed=65)
    _assert_same_outputs_in_both_modes(restored, fused, x)


class UNetUp(nn.Module):
    """A U-Net decoder step: upsample to the skip connection's size (the
    output padding depends on it: 0 for odd sizes, 1 for even ones),
    BatchNorm, ReLU, then a conv block on the concatenation; the size comes
    from a tensor's shape at run time, and one call gives it positionally."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.up, self.bn_up = nn.ConvTranspose2d(6, 3, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(3)
        self.up2, self.bn_up2 = nn.ConvTranspose2d(6, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv, self.bn = nn.Conv2d(12, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10)

    def forward(self, x):
        skip = x
        y = self.down(x)
        up = F.relu(self.bn_up(self.up(y, output_size=skip.shape[-2:])))
        up2 = F.relu(self.bn_up2(self.up2(y, skip.shape)))
        out = F.relu(self.bn(self.conv(torch.cat([skip, up, up2], 1))))
        return out.mean((2, 3))  # class scores


@pytest.mark.parametrize("size", [(9, 7), (10, 8)], ids=["output-padding-0", "output-padding-1"])
def test_fuse_transposed_with_run_time_output_size(size):
    """A ConvTranspose given an output_size from a tensor's shape (keyword or
    positional) fuses, trains like the unfused model at both output paddings,
    and unfuses to calls with the same output_size."""
    torch.manual_seed(66)
    shape = (4, 3) + size
    fused = _check_fused_training(UNetUp(), 3, shape)
    nodes = {n.target: n for n in fused.graph.nodes if n.op == "call_module"}
    assert isinstance(nodes["up_fused"].kwargs["output_size"], torch.fx.Node)
    assert isinstance(nodes["up2_fused"].kwargs["output_size"], torch.fx.Node)
    restored = unfuse_conv_bn(fused)
    assert not fused_blocks(restored)
    calls = {n.target: n for n in restored.graph.nodes if n.op == "call_module"}
    assert set(calls["up"].kwargs) == {"output_size"} and set(calls["up2"].kwargs) == {"output_size"}
    x = make_input(shape, torch.float64, seed=67)
    _assert_same_outputs_in_both_modes(restored, fused, x)


class Patterns(nn.Module):
    """Every chain shape fuse_conv_bn knows, and two it must not take whole."""

    def __init__(self):
        super().__init__()
        C = 4
        conv = lambda: nn.Conv2d(C, C, 3, padding=1)  # noqa: E731
        for i in range(1, 11):
            setattr(self, f"c{i}", conv())
            setattr(self, f"b{i}", nn.BatchNorm2d(C))
        self.c1d, self.b1d = nn.Conv1d(C, C, 3, padding=1, bias=False), nn.BatchNorm1d(C)
        self.c3d, self.b3d = nn.Conv3d(C, C, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(C)
        self.relu = nn.ReLU(inplace=True)
        self.leaky = nn.LeakyReLU(0.2)
        self.silu = nn.SiLU()

    def forward(self, x):
        y = self.relu(self.b1(self.c1(x)))                 # module activation
        y = F.relu(self.b2(self.c2(y)))                    # call_function
        y = self.b3(self.c3(y)).relu()                     # call_method
        y = self.leaky(self.b4(self.c4(y)))                # LeakyReLU(0.2)
        y = self.silu(self.b5(self.c5(y)))                 # SiLU
        y = torch.tanh(self.b6(self.c6(y)))                # no activation
        y = F.relu(self.b7(self.c7(y)) + y)                # residual, operator.add, identity = the block input
        identity = y
        out = self.b8(self.c8(y))
        out += identity                                    # residual, in place
        y = self.relu(out)
        n, c, h, w = y.shape
        y = F.leaky_relu(self.b1d(self.c1d(y.reshape(n, c, h * w))), 0.2).reshape(n, c, h, w)
        y = F.silu(self.b3d(self.c3d(y.unsqueeze(2)))).squeeze(2)
        z = self.c9(y)                                     # conv output used twice: left alone
        y = F.relu(self.b9(z) + z)
        t = self.b10(self.c10(y))                          # BN output used twice: the add stays outside
        return F.relu(t + y) * t


PATTERN_BLOCKS = {  # conv -> (activation, negative slope, has residual)
    "c1": ("relu", None, False), "c2": ("relu", None, False), "c3": ("relu", None, False),
    "c4": ("leaky_relu", 0.2, False), "c5": ("silu", None, False), "c6": ("none", None, False),
    "c7": ("relu", None, True), "c8": ("relu", None, True), "c1d": ("leaky_relu", 0.2, False),
    "c3d": ("silu", None, False), "c10": ("none", None, False),
}


def _pattern_model():
    torch.manual_seed(80)
    return randomize(Patterns(), seed=81).double()


def _fwd_bwd(model, x, seed):
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(torch.randn(out.shape, generator=generator(seed), dtype=out.dtype))
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("save_memory", [True, False], ids=["save_memory", "plain"])
def test_fuse_patterns(save_memory):
    model = _pattern_model()
    reference = copy.deepcopy(model)
    fused = fuse_conv_bn(model, save_memory=save_memory)
    blocks = {b.steps[0][1]: b for b in fused_blocks(fused).values()}
    assert sorted(blocks) == sorted(PATTERN_BLOCKS)
    for conv, (activation, slope, residual) in PATTERN_BLOCKS.items():
        block = blocks[conv]
        assert block.activation == activation, conv
        if slope is not None:
            assert block.negative_slope == slope, conv
        node = next(n for n in fused.graph.nodes if n.op == "call_module" and fused.get_submodule(n.target) is block)
        assert (len(node.args) == 2) == residual, conv
    # c9 (output used twice) is not fused; b9 is still called
    called = {n.target for n in fused.graph.nodes if n.op == "call_module"}
    assert {"c9", "b9"} <= called and "c10" not in called and "b10" not in called

    x = make_input((2, 4, 5, 6), torch.float64, seed=82)
    for mode in ("train", "eval"):
        fused.train(mode == "train")
        reference.train(mode == "train")
        fused.zero_grad()
        reference.zero_grad()
        out, xg, grads = _fwd_bwd(fused, x, seed=83)
        out_ref, xg_ref, grads_ref = _fwd_bwd(reference, x, seed=83)
        assert_close(out, out_ref, torch.float64, "forward", msg=mode)
        assert_close(xg, xg_ref, torch.float64, "grad", msg=mode)
        assert sorted(grads) == sorted(grads_ref)
        for n in grads:
            assert_close(grads[n], grads_ref[n], torch.float64, "grad", msg=f"{mode} {n}")
        want = reference.state_dict()
        for k, v in model.state_dict().items():
            assert_close(v.double(), want[k].double(), torch.float64, "stats", msg=f"{mode} {k}")


def test_fuse_shared_conv_two_batch_norms():
    class SharedConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn1(self.conv(x)) - self.bn2(self.conv(x))

    model = randomize(SharedConv(), seed=84).double()
    reference = copy.deepcopy(model)
    fused = fuse_conv_bn(model)
    x = make_input((2, 3, 5, 5), torch.float64, seed=85)
    assert_close(fused(x), reference(x), torch.float64, "forward")


def test_fuse_timm_batch_norm_act_with_dropout_in_training():
    timm_layers = pytest.importorskip("timm.layers")
    bn = timm_layers.BatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=lambda: nn.Dropout(0.5))
    model = ConvBNAct(bn)
    model.conv = nn.Conv2d(3, 4, 3, padding=1)
    model = randomize(model, seed=86).double().train()
    # Its dropout would be lost in a fused block, so the chain is left alone:
    # here that leaves nothing to fuse.
    with pytest.raises(ValueError, match="found no Conv"):
        fuse_conv_bn(model)
    # Next to a fusable chain, it stays unfused and its dropout still runs.
    both = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), model).double().train()
    reference = copy.deepcopy(both)
    fused = fuse_conv_bn(both)
    assert sum(isinstance(m, FusedChain) for m in fused.modules()) == 1
    x = make_input((2, 3, 6, 6), torch.float64, seed=87)
    torch.manual_seed(0)
    want = reference(x)
    torch.manual_seed(0)
    got = fused(x)
    assert_close(got, want, torch.float64, "forward")


# ---------------------------------------------------------------------------
# unfuse_conv_bn, errors
# ---------------------------------------------------------------------------


def test_unfuse_restores_the_graph():
    model = _pattern_model().eval()
    original_targets = [n.target for n in fx.symbolic_trace(model).graph.nodes if n.op == "call_module"]
    keys = list(model.state_dict())
    fused = fuse_conv_bn(model)
    assert fused_blocks(fused)
    restored = unfuse_conv_bn(fused)
    assert isinstance(restored, fx.GraphModule)
    assert not fused_blocks(restored)
    assert not any(n.op == "call_module" and isinstance(restored.get_submodule(n.target), FusedChain)
                   for n in restored.graph.nodes)
    assert sorted(restored.state_dict()) == sorted(keys)  # (in graph order: c9 before c1d)
    for k, v in restored.state_dict().items():
        assert v.data_ptr() == model.state_dict()[k].data_ptr(), k
    targets = [n.target for n in restored.graph.nodes if n.op == "call_module"]
    assert sorted(targets) == sorted(original_targets)
    x = make_input((2, 4, 5, 6), torch.float64, seed=90)
    _assert_same_outputs_in_both_modes(restored, fused, x)


def test_unfuse_and_fuse_errors():
    with pytest.raises(TypeError, match="GraphModule"):
        unfuse_conv_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="no FusedChain"):
        unfuse_conv_bn(fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    with pytest.raises(ValueError, match="no Conv"):
        fuse_conv_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="no Conv"):
        fuse_conv_bn(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))


# ---------------------------------------------------------------------------
# fuse_conv_bn: memory kept for backward
# ---------------------------------------------------------------------------


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Weak references to the storage of every tensor an op makes."""

    def __init__(self):
        super().__init__()
        self.storages = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                known = self.storages.get(storage.data_ptr())
                if known is None or known[0].expired():
                    self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out


def _bytes_kept_after_forward(model, x, grad=True):
    """Bytes of the tensors made during model(x) that are still alive after it,
    less the output: what autograd keeps for backward (rebuild recipes included)."""
    tracker = _Allocations()
    with torch.set_grad_enabled(grad), tracker:
        out = model(x)
    gc.collect()
    out_storage = out.untyped_storage().data_ptr()
    kept = sum(nbytes for ptr, (ref, nbytes) in tracker.storages.items()
               if ptr != out_storage and not ref.expired())
    if grad:
        out.sum().backward()  # the graph is whole: nothing it needed was freed
    return kept


def test_fuse_keeps_less_memory_for_backward():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(95)
    model = torchvision.models.resnet18(num_classes=10).train()
    x = make_input((2, 3, 64, 64), torch.float32, seed=96)
    unfused = _bytes_kept_after_forward(copy.deepcopy(model), x)
    no_grad = _bytes_kept_after_forward(copy.deepcopy(model), x, grad=False)
    assert no_grad < 0.05 * unfused, "the measure counts what autograd keeps"
    saving = _bytes_kept_after_forward(fuse_conv_bn(copy.deepcopy(model), save_memory=True), x)
    plain = _bytes_kept_after_forward(fuse_conv_bn(copy.deepcopy(model), save_memory=False), x)
    assert saving <= 0.75 * unfused, (saving, plain, unfused)
    assert plain > 1.2 * saving, (saving, plain, unfused)
