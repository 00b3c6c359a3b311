"""torchnorm.nn BatchNorm modules against torch.nn (outputs, gradients, running
statistics over several steps, momentum=None, eval/train switching, state_dict
both ways, .to(dtype)), BatchNormAct2d, torchnorm.convert, torch.fx and
torch.compile.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchnorm
import torchnorm.nn as tnn
import torchnorm.reference as tnref
from conftest import (
    assert_same_model_state,
    ACTIVATIONS,
    DEVICES,
    NEGATIVE_SLOPE,
    act_name,
    assert_close,
    assert_round_trip,
    assert_same_state,
    make_input,
    make_module_pair,
    memory_format_of,
    randn,
    to64,
    torch_act,
)

TORCH_BN = {"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d, "BatchNorm3d": nn.BatchNorm3d}
TORCH_BN_TYPES = tuple(TORCH_BN.values())

# (class name, input shape, layout)
MODULE_CASES = [
    pytest.param("BatchNorm1d", (6, 5), "contiguous", id="1d-NC"),
    pytest.param("BatchNorm1d", (4, 5, 7), "contiguous", id="1d-NCL"),
    pytest.param("BatchNorm2d", (3, 5, 4, 6), "contiguous", id="2d"),
    pytest.param("BatchNorm2d", (3, 5, 4, 6), "channels_last", id="2d-cl"),
    pytest.param("BatchNorm3d", (2, 5, 3, 4, 3), "contiguous", id="3d"),
    pytest.param("BatchNorm3d", (2, 5, 3, 4, 3), "channels_last_3d", id="3d-cl3d"),
]


def randomize_(module, seed):
    """Nonzero random parameters and running statistics (same for the same seed)."""
    with torch.no_grad():
        C = module.num_features
        if module.affine:
            module.weight.copy_(randn((C,), seed, torch.float64, scale=0.5, offset=1.0))
            module.bias.copy_(randn((C,), seed + 1, torch.float64, scale=0.5, offset=0.25))
        if module.track_running_stats:
            module.running_mean.copy_(randn((C,), seed + 2, torch.float64, scale=0.5))
            module.running_var.copy_(randn((C,), seed + 3, torch.float64, scale=0.2).abs() + 0.5)
            module.num_batches_tracked.fill_(3)
    return module


def make_pair(name, C, device, dtype=torch.float32, seed=0, **kwargs):
    """(torch.nn module, torchnorm.nn module) with identical state."""
    return make_module_pair(TORCH_BN[name], getattr(tnn, name), (C,), kwargs, randomize_, device, dtype, seed)


def step(module, x, gy, residual=None):
    x = x.detach().requires_grad_()
    out = module(x) if residual is None else module(x, residual=residual)
    (gx,) = torch.autograd.grad(out, [x], gy, retain_graph=True)
    out.backward(gy)
    return out, gx


@pytest.mark.slow  # the whole matrix: `pytest -m "not slow"` leaves it out
@pytest.mark.parametrize("momentum", [0.1, 0.5, None], ids=["m0.1", "m0.5", "mNone"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,shape,layout", MODULE_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_torch(device, name, shape, layout, dtype, affine, track, momentum):
    ref, ours = make_pair(name, shape[1], device, dtype, momentum=momentum, affine=affine, track_running_stats=track, eps=1e-3)
    assert_same_state(ours, ref, dtype, "initial")
    # several training steps, then eval, then training again
    plan = ["train"] * 3 + ["eval"] * 2 + ["train"]
    for i, mode in enumerate(plan):
        ref.train(mode == "train")
        ours.train(mode == "train")
        assert ours.training == (mode == "train")
        x = make_input(shape, dtype, device, layout, seed=10 + i, scale=1.0 + 0.5 * i)
        gy = make_input(shape, dtype, device, "contiguous", seed=40 + i, offset=False)
        out, gx = step(ours, x, gy)
        exp, egx = step(ref, x, gy)
        what = f"step {i} ({mode})"
        assert out.dtype == dtype
        assert_close(out, exp, dtype, "forward", f"{what} output")
        assert memory_format_of(out) == memory_format_of(exp), f"{what}: output strides {out.stride()} vs torch {exp.stride()}"
        assert_close(gx, egx, dtype, "grad", f"{what} grad_input")
        if affine:
            assert_close(ours.weight.grad, ref.weight.grad, dtype, "grad", f"{what} weight.grad (accumulated)")
            assert_close(ours.bias.grad, ref.bias.grad, dtype, "grad", f"{what} bias.grad (accumulated)")
        assert_same_state(ours, ref, dtype, what)


@pytest.mark.parametrize("name,shape,layout", MODULE_CASES)
def test_module_attributes_match_torch(name, shape, layout):
    for kwargs in [{}, dict(eps=1e-3, momentum=None), dict(affine=False), dict(track_running_stats=False)]:
        ref = TORCH_BN[name](shape[1], **kwargs)
        ours = getattr(tnn, name)(shape[1], **kwargs)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(ours, attr) == getattr(ref, attr), (attr, kwargs)
        assert isinstance(ours, nn.Module)
        if not ours.track_running_stats:
            assert ours.running_mean is None and ours.running_var is None
        assert ours.training
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
        # defaults as torch.nn: weight 1, bias 0, running mean 0, var 1
        assert_same_state(ours, ref, torch.float32, f"defaults {kwargs}")


# ---------------------------------------------------------------------------
# state_dict both ways, .to(dtype), half inputs.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("name,shape,layout", MODULE_CASES[1::2])
@pytest.mark.parametrize("device", DEVICES)
def test_load_state_dict_both_ways(device, name, shape, layout, affine, track):
    kwargs = dict(affine=affine, track_running_stats=track)
    src_torch = randomize_(TORCH_BN[name](shape[1], device=device, **kwargs), seed=5)
    src_ours = randomize_(getattr(tnn, name)(shape[1], device=device, **kwargs), seed=6)
    ours = getattr(tnn, name)(shape[1], device=device, **kwargs)
    theirs = TORCH_BN[name](shape[1], device=device, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(src_torch.state_dict(), strict=True)  # torch.nn -> torchnorm
    theirs.load_state_dict(src_ours.state_dict(), strict=True)  # torchnorm -> torch.nn
    assert_same_state(ours, src_torch, torch.float32, "torch -> torchnorm")
    assert_same_state(theirs, src_ours, torch.float32, "torchnorm -> torch")
    x = make_input(shape, torch.float32, device, layout, seed=8)
    for mode in (False, True):
        for a, b in ((ours, src_torch), (theirs, src_ours)):
            a.train(mode)
            b.train(mode)
            assert_close(a(x), b(x), torch.float32, "forward", f"after load, training={mode}")
        assert_same_state(ours, src_torch, torch.float32, "after a step")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=["f64", "f16", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_module_to_dtype(device, dtype):
    ours = randomize_(tnn.BatchNorm2d(4, device=device), seed=3)
    ref = copy.deepcopy(ours)
    ours = ours.to(dtype)
    assert ours.weight.dtype == dtype and ours.bias.dtype == dtype
    assert ours.running_mean.dtype == dtype and ours.running_var.dtype == dtype
    assert ours.num_batches_tracked.dtype == torch.int64
    x = make_input((3, 4, 5, 5), dtype, device, "channels_last", seed=4)
    for training in (True, False):
        ours.train(training)
        rm64, rv64 = to64(ours.running_mean), to64(ours.running_var)
        out = ours(x)
        assert out.dtype == dtype
        exp = tnref.batch_norm(
            to64(x), rm64, rv64, to64(ours.weight), to64(ours.bias), training=training, momentum=0.1, eps=ours.eps
        )
        assert_close(out, exp, dtype, "forward", f"training={training}")
        assert_close(ours.running_mean, rm64, dtype, "stats", "running_mean")
        assert_close(ours.running_var, rv64, dtype, "stats", "running_var")
    if dtype == torch.float64:
        ref = ref.to(torch.float64)
        ref_torch = nn.BatchNorm2d(4, device=device, dtype=torch.float64)
        ref_torch.load_state_dict(ref.state_dict())
        ref.train()
        ref_torch.train()
        assert_close(ref(x), ref_torch(x), dtype, "forward", "float64 module vs torch.nn")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_module_half_input_float32_params(device, dtype):
    ours = randomize_(tnn.BatchNorm2d(6, device=device), seed=3)
    x = make_input((4, 6, 3, 5), dtype, device, "contiguous", seed=9).requires_grad_()
    rm64, rv64 = to64(ours.running_mean), to64(ours.running_var)
    w64, b64 = to64(ours.weight).requires_grad_(), to64(ours.bias).requires_grad_()
    out = ours(x)
    assert out.dtype == dtype
    assert ours.running_mean.dtype == torch.float32
    x64 = to64(x).requires_grad_()
    exp = tnref.batch_norm(x64, rm64, rv64, w64, b64, training=True, momentum=0.1, eps=ours.eps)
    assert_close(out, exp, dtype, "forward", "output")
    assert_close(ours.running_mean, rm64, torch.float32, "stats", "running_mean")
    assert_close(ours.running_var, rv64, torch.float32, "stats", "running_var")
    gy = make_input(x.shape, dtype, device, seed=10, offset=False)
    out.backward(gy)
    exp.backward(to64(gy))
    assert ours.weight.grad.dtype == torch.float32 and x.grad.dtype == dtype
    assert_close(x.grad, x64.grad, dtype, "grad", "grad_input")
    assert_close(ours.weight.grad, w64.grad, dtype, "grad", "weight.grad")
    assert_close(ours.bias.grad, b64.grad, dtype, "grad", "bias.grad")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_module(device):
    ref, ours = make_pair("BatchNorm2d", 3, device)
    x = make_input((0, 3, 4, 4), torch.float32, device)
    out, exp = ours(x), ref(x)
    assert out.shape == exp.shape
    assert_same_state(ours, ref, torch.float32, "empty batch")


# ---------------------------------------------------------------------------
# BatchNormAct2d.
# ---------------------------------------------------------------------------


class TorchBNAct(nn.Module):
    """What BatchNormAct2d must equal: torch.nn.BatchNorm2d, + residual, activation."""

    def __init__(self, C, activation, **kwargs):
        super().__init__()
        self.bn = nn.BatchNorm2d(C, **kwargs)
        self.activation = activation

    def forward(self, x, residual=None):
        y = self.bn(x)
        if residual is not None:
            y = y + residual
        return torch_act(y, self.activation)


@pytest.mark.slow  # the whole matrix: `pytest -m "not slow"` leaves it out
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("device", DEVICES)
def test_batch_norm_act_2d(device, activation, with_residual, layout, affine, momentum):
    C, shape = 5, (3, 5, 4, 3)
    kwargs = dict(eps=1e-4, momentum=momentum, affine=affine)
    ref = TorchBNAct(C, activation, device=device, **kwargs)
    ours = tnn.BatchNormAct2d(
        C, activation=activation, negative_slope=NEGATIVE_SLOPE, device=device, **kwargs
    )
    randomize_(ref.bn, 1)
    randomize_(ours, 1)
    for i, training in enumerate([True, True, False, True]):
        ref.train(training)
        ours.train(training)
        x = make_input(shape, torch.float32, device, layout, seed=i)
        gy = make_input(shape, torch.float32, device, seed=20 + i, offset=False)
        res = make_input(shape, torch.float32, device, layout, seed=30 + i, offset=False) if with_residual else None
        rr = [None, None]
        if res is not None:
            rr = [res.detach().clone().requires_grad_(), res.detach().clone().requires_grad_()]
        out, gx = step(ours, x, gy, rr[0])
        exp, egx = step(ref, x, gy, rr[1])
        what = f"step {i} training={training}"
        assert_close(out, exp, torch.float32, "forward", f"{what} output")
        assert memory_format_of(out) == memory_format_of(x)
        assert_close(gx, egx, torch.float32, "grad", f"{what} grad_input")
        if res is not None:
            assert_close(rr[0].grad, rr[1].grad, torch.float32, "grad", f"{what} grad_residual")
        if affine:
            assert_close(ours.weight.grad, ref.bn.weight.grad, torch.float32, "grad", f"{what} weight.grad")
            assert_close(ours.bias.grad, ref.bn.bias.grad, torch.float32, "grad", f"{what} bias.grad")
        assert_same_state(ours, ref.bn, torch.float32, what)


def test_batch_norm_act_2d_defaults_to_relu():
    ours = randomize_(tnn.BatchNormAct2d(4), 2)
    ref = randomize_(nn.BatchNorm2d(4), 2)
    x = make_input((3, 4, 3, 3), torch.float32, seed=1)
    assert_close(ours(x), F.relu(ref(x)), torch.float32, "forward", "default activation")
    leaky = randomize_(tnn.BatchNormAct2d(4, activation="leaky_relu"), 2).eval()
    ref = randomize_(nn.BatchNorm2d(4), 2).eval()
    assert_close(leaky(x), F.leaky_relu(ref(x), 0.01), torch.float32, "forward", "default negative_slope")


def test_batch_norm_act_2d_loads_batch_norm_2d_state():
    src = randomize_(nn.BatchNorm2d(4), 4)
    ours = tnn.BatchNormAct2d(4, activation="silu")
    assert list(ours.state_dict()) == list(src.state_dict())
    ours.load_state_dict(src.state_dict())
    ours.eval()
    src.eval()
    x = make_input((2, 4, 3, 3), torch.float32, seed=2)
    assert_close(ours(x), F.silu(src(x)), torch.float32, "forward", "after load")


# ---------------------------------------------------------------------------
# torchnorm.convert
# ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, c, momentum=0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c, momentum=momentum)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c, eps=1e-3)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + x)


def resnet_like(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        BasicBlock(6),
        BasicBlock(6, momentum=None),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
        nn.BatchNorm1d(5, affine=False),
    ).to(device=device, dtype=dtype)
    for i, m in enumerate(model.modules()):
        if isinstance(m, TORCH_BN_TYPES):
            randomize_(m, 10 * i)
    return model


def assert_converted(model, original):
    orig_bns = {n: m for n, m in original.named_modules() if type(m) in TORCH_BN_TYPES}
    assert orig_bns, "test model has no BatchNorm"
    names = dict(model.named_modules())
    for n, m in orig_bns.items():
        new = names[n]
        assert type(new) not in TORCH_BN_TYPES, f"{n} still a {type(new)}"
        assert type(new).__module__.startswith("torchnorm"), f"{n} became {type(new)}"
        assert type(new).__name__ == type(m).__name__, f"{n}: {type(m).__name__} became {type(new).__name__}"
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(new, attr) == getattr(m, attr), f"{n}.{attr}: {getattr(new, attr)} != {getattr(m, attr)}"
    assert not any(type(m) in TORCH_BN_TYPES for m in model.modules())


def test_convert_round_trip_resnet_like():
    model = resnet_like()
    model[3].eval()  # mixed train / eval modes must be kept
    model[1].weight.requires_grad_(False)  # a frozen BatchNorm stays frozen
    original = copy.deepcopy(model)

    converted = torchnorm.convert(model)
    assert_converted(converted, original)
    assert_same_model_state(converted, original)

    x = make_input((4, 3, 6, 6), torch.float32, seed=1, offset=False)
    assert_round_trip(converted, original, x, eval_child="3")


@pytest.mark.parametrize("device", DEVICES)
def test_convert_keeps_dtype_and_device(device):
    model = resnet_like(device=device, dtype=torch.float64).eval()
    original = copy.deepcopy(model)
    converted = torchnorm.convert(model)
    assert_converted(converted, original)
    assert_same_model_state(converted, original)
    x = make_input((2, 3, 5, 5), torch.float64, device, seed=3)
    assert_close(converted(x), original(x), torch.float64, "forward", "float64 model")


def test_convert_keeps_meta_device():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).to("meta")
    converted = torchnorm.convert(model)
    assert type(converted[1]).__module__.startswith("torchnorm")
    for t in list(converted.parameters()) + list(converted.buffers()):
        assert t.device.type == "meta"


def test_convert_all_ranks_and_options():
    model = nn.Sequential(
        nn.Conv3d(2, 3, 1),
        nn.BatchNorm3d(3, momentum=None),
        nn.Flatten(2),
        nn.BatchNorm1d(3, track_running_stats=False),
        nn.BatchNorm1d(3, affine=False, eps=1e-2),
    )
    for i, m in enumerate(model.modules()):
        if isinstance(m, TORCH_BN_TYPES):
            randomize_(m, i)
    original = copy.deepcopy(model)
    converted = torchnorm.convert(model)
    assert_converted(converted, original)
    x = make_input((3, 2, 2, 3, 2), torch.float32, seed=5, layout="channels_last_3d")
    for _ in range(2):
        assert_close(converted(x), original(x), torch.float32, "forward", "train step")
    assert_same_model_state_close(converted, original)
    converted.eval()
    original.eval()
    assert_close(converted(x), original(x), torch.float32, "forward", "eval")


def assert_same_model_state_close(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert_close(sa[k], sb[k], torch.float32, "stats", k)


def test_convert_top_level_batch_norm():
    bn = randomize_(nn.BatchNorm2d(4, momentum=None), 1)
    original = copy.deepcopy(bn)
    converted = torchnorm.convert(bn)
    assert type(converted).__module__.startswith("torchnorm") and type(converted).__name__ == "BatchNorm2d"
    assert_same_model_state(converted, original)
    x = make_input((2, 4, 3, 3), torch.float32, seed=6)
    assert_close(converted(x), original(x), torch.float32, "forward", "top-level module")
    back = torchnorm.convert(converted, back=True)
    assert type(back) is nn.BatchNorm2d


# ---------------------------------------------------------------------------
# torch.fx and torch.compile
# ---------------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = tnn.BatchNorm2d(4)
        self.bn_act = tnn.BatchNormAct2d(4, activation="silu")
        # (momentum=None reads num_batches_tracked as a Python float: a graph
        # break under torch.compile for torch.nn.BatchNorm1d too, so not here)
        self.bn1d = tnn.BatchNorm1d(4, momentum=0.3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = self.bn_act(y, residual=y)
        return self.bn1d(z.mean((2, 3)))


def small_net():
    torch.manual_seed(0)
    net = SmallNet()
    for i, m in enumerate([net.bn, net.bn_act, net.bn1d]):
        randomize_(m, 10 * i)
    return net


def torchnorm_targets(gm):
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("torchnorm.")}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace_shows_torchnorm_ops(training):
    net = small_net().train(training)
    eager = copy.deepcopy(net)
    gm = torch.fx.symbolic_trace(net)
    targets = torchnorm_targets(gm)
    op = "batch_norm_train" if training else "batch_norm_eval"
    assert any(t.startswith(f"torchnorm.{op}") for t in targets), f"no torchnorm.{op} call in the graph:\n{gm.graph}"
    for target in targets:
        assert target.split(".")[1] in ("batch_norm_train", "batch_norm_eval"), target
    x = make_input((2, 3, 5, 5), torch.float32, seed=1)
    assert_close(gm(x), eager(x), torch.float32, "forward", "traced vs eager")
    for (n, t), (_, u) in zip(net.named_buffers(), eager.named_buffers()):
        if not n.endswith("num_batches_tracked"):
            assert_close(t, u, torch.float32, "stats", f"{n} after a traced step")


@pytest.mark.slow  # torch.compile of a model: ~15 s
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    net = small_net().train()
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, fullgraph=True)
    x = make_input((2, 3, 5, 5), torch.float32, seed=2)
    gy = make_input((2, 4), torch.float32, seed=3, offset=False)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(xa)
    exp = eager(xb)
    assert_close(out, exp, torch.float32, "forward", "compiled forward")
    out.backward(gy)
    exp.backward(gy)
    assert_close(xa.grad, xb.grad, torch.float32, "grad", "compiled grad_input")
    for (n, p), (_, q) in zip(net.named_parameters(), eager.named_parameters()):
        assert_close(p.grad, q.grad, torch.float32, "grad", f"compiled {n}.grad")
    for (n, t), (_, u) in zip(net.named_buffers(), eager.named_buffers()):
        if t.is_floating_point():
            assert_close(t, u, torch.float32, "stats", f"compiled {n}")
        else:
            assert torch.equal(t, u), f"compiled {n}: {t} != {u}"
    torch._dynamo.reset()
