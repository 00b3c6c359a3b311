"""torchnorm.nn LayerNorm, RMSNorm, GroupNorm and InstanceNorm1d/2d/3d against
torch.nn: outputs, input and (accumulated) parameter gradients over several
steps, running statistics and num_batches_tracked of InstanceNorm with
track_running_stats, eval mode, unbatched inputs, the fused residual of
LayerNorm / RMSNorm, the fused activation of GroupNorm, state_dict loaded both
ways, attributes and repr, half inputs, empty batches, torchnorm.convert both
ways and torch.fx symbolic tracing.
"""
import copy

import pytest
import torch
import torch.nn as nn

import torchnorm
import torchnorm.nn as tnn
import torchnorm.reference as tnref
from conftest import (
    assert_same_model_state,
    ACTIVATIONS,
    DEVICES,
    NEGATIVE_SLOPE,
    accumulate_dtype,
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

NAMES = ["LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]
TORCH_TYPES = tuple(getattr(nn, n) for n in NAMES)


def randomize_(module, seed):
    """Nonzero random parameters and running statistics (the same for the same seed)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(module.named_parameters()):
            if name.endswith("weight"):
                p.copy_(randn(p.shape, seed + i, torch.float64, scale=0.5, offset=1.0))
            else:
                p.copy_(randn(p.shape, seed + i, torch.float64, scale=0.5, offset=0.25))
        for name, t in module.named_buffers():
            if name.endswith("running_mean"):
                t.copy_(randn(t.shape, seed + 20, torch.float64, scale=0.5))
            elif name.endswith("running_var"):
                t.copy_(randn(t.shape, seed + 21, torch.float64, scale=0.2).abs() + 0.5)
            elif name.endswith("num_batches_tracked"):
                t.fill_(3)
    return module


def make_pair(name, args, kwargs, device="cpu", dtype=torch.float32, seed=0):
    """(torch.nn module, torchnorm.nn module) with identical state."""
    return make_module_pair(getattr(nn, name), getattr(tnn, name), args, kwargs, randomize_, device, dtype, seed)


def step(module, x, gy, residual=None, gsum=None):
    """One forward + backward; returns (out, sum or None, grad_input, grad_residual or None)."""
    x = x.detach().requires_grad_()
    res = None if residual is None else residual.detach().requires_grad_()
    if res is None:
        out, s = module(x), None
    else:
        out, s = module(x, residual=res)
    outs, gouts = [out], [gy]
    if s is not None and gsum is not None:
        outs.append(s)
        gouts.append(gsum)
    torch.autograd.backward(outs, gouts)
    return out, s, x.grad, None if res is None else res.grad


class TorchWithResidual(nn.Module):
    """What LayerNorm / RMSNorm with residual must equal: (norm(x + residual), x + residual)."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, residual=None):
        if residual is None:
            return self.norm(x)
        s = x + residual
        return self.norm(s), s


class TorchGroupNormAct(nn.Module):
    """What GroupNorm(activation=...) must equal: act(torch.nn.GroupNorm(x))."""

    def __init__(self, gn, activation, negative_slope):
        super().__init__()
        self.gn, self.activation, self.negative_slope = gn, activation, negative_slope

    def forward(self, x):
        return torch_act(self.gn(x), self.activation, self.negative_slope)


# (name, constructor args, kwargs, input shape, layout)
MODULE_CASES = [
    pytest.param("LayerNorm", (7,), {}, (4, 7), "contiguous", id="ln-D7"),
    pytest.param("LayerNorm", ((5, 6),), dict(eps=1e-3), (2, 3, 5, 6), "contiguous", id="ln-D5x6"),
    pytest.param("LayerNorm", (123,), dict(bias=False), (3, 2, 123), "sliced", id="ln-nobias-sliced"),
    pytest.param("LayerNorm", (9,), dict(elementwise_affine=False), (2, 9), "transposed", id="ln-noaffine-transposed"),
    pytest.param("LayerNorm", (2100,), {}, (3, 2100), "contiguous", id="ln-D2100"),
    pytest.param("LayerNorm", (11,), {}, (11,), "contiguous", id="ln-unbatched"),
    pytest.param("RMSNorm", (7,), {}, (4, 7), "contiguous", id="rms-D7"),
    pytest.param("RMSNorm", ((5, 6),), dict(eps=1e-3), (2, 3, 5, 6), "contiguous", id="rms-D5x6"),
    pytest.param("RMSNorm", (9,), dict(elementwise_affine=False), (2, 9), "transposed", id="rms-noaffine-transposed"),
    pytest.param("RMSNorm", (11,), dict(eps=1e-6), (11,), "contiguous", id="rms-unbatched"),
    pytest.param("GroupNorm", (3, 6), {}, (4, 6, 5), "contiguous", id="gn-3d"),
    pytest.param("GroupNorm", (2, 4), dict(eps=1e-3), (3, 4, 5, 6), "channels_last", id="gn-4d-cl"),
    pytest.param("GroupNorm", (1, 6), dict(affine=False), (2, 6, 3, 4), "contiguous", id="gn-G1-noaffine"),
    pytest.param("GroupNorm", (6, 6), {}, (2, 6, 2, 3, 4), "channels_last_3d", id="gn-5d-cl3d-G=C"),
    pytest.param("GroupNorm", (2, 8), {}, (5, 8), "contiguous", id="gn-2d"),
    pytest.param("InstanceNorm1d", (5,), dict(affine=True, track_running_stats=True), (4, 5, 7), "contiguous", id="in1d-affine-track"),
    pytest.param("InstanceNorm1d", (5,), dict(affine=True, track_running_stats=True), (5, 7), "contiguous", id="in1d-unbatched"),
    pytest.param("InstanceNorm1d", (5,), {}, (4, 5, 7), "transposed", id="in1d-default"),
    pytest.param("InstanceNorm2d", (4,), dict(affine=True, track_running_stats=True, momentum=0.3), (3, 4, 5, 6), "channels_last", id="in2d-cl-affine-track"),
    pytest.param("InstanceNorm2d", (4,), dict(track_running_stats=True, momentum=None), (3, 4, 5, 6), "contiguous", id="in2d-track-mNone"),
    pytest.param("InstanceNorm2d", (4,), dict(affine=True), (4, 5, 6), "contiguous", id="in2d-unbatched"),
    pytest.param("InstanceNorm3d", (3,), dict(affine=True, track_running_stats=True), (2, 3, 3, 4, 5), "channels_last_3d", id="in3d-cl3d-affine-track"),
    pytest.param("InstanceNorm3d", (3,), dict(track_running_stats=True, eps=1e-3), (3, 3, 4, 5), "contiguous", id="in3d-unbatched-track"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,args,kwargs,shape,layout", MODULE_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_torch(device, name, args, kwargs, shape, layout, dtype):
    ref, ours = make_pair(name, args, kwargs, device, dtype)
    assert_same_state(ours, ref, dtype, "initial")
    # several training steps, then eval, then training again
    plan = ["train"] * 3 + ["eval"] * 2 + ["train"]
    for i, mode in enumerate(plan):
        ref.train(mode == "train")
        ours.train(mode == "train")
        assert ours.training == (mode == "train")
        x = make_input(shape, dtype, device, layout, seed=10 + i, scale=1.0 + 0.5 * i)
        gy = make_input(shape, dtype, device, "contiguous", seed=40 + i, offset=False)
        out, _, gx, _ = step(ours, x, gy)
        exp, _, egx, _ = step(ref, x, gy)
        what = f"step {i} ({mode})"
        assert out.dtype == dtype and tuple(out.shape) == shape
        assert_close(out, exp, dtype, "forward", f"{what} output")
        if name == "GroupNorm" and layout in ("contiguous", "channels_last", "channels_last_3d"):
            assert memory_format_of(out) == memory_format_of(x), f"{what}: output strides {out.stride()} for input {x.stride()}"
        assert_close(gx, egx, dtype, "grad", f"{what} grad_input")
        for (pn, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
            assert_close(p.grad, q.grad, dtype, "grad", f"{what} {pn}.grad (accumulated)")
        assert_same_state(ours, ref, dtype, what)


@pytest.mark.parametrize("with_gsum", [False, True], ids=["sum-unused", "gsum"])
@pytest.mark.parametrize(
    "name,args,kwargs,shape",
    [
        ("LayerNorm", (7,), {}, (4, 7)),
        ("LayerNorm", ((3, 70),), dict(bias=False), (2, 3, 70)),
        ("RMSNorm", (7,), {}, (4, 7)),
        ("RMSNorm", ((3, 70),), dict(eps=1e-5), (2, 3, 70)),
    ],
    ids=["ln", "ln-2dims-nobias", "rms", "rms-2dims"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_module_residual(device, name, args, kwargs, shape, with_gsum):
    ref_norm, ours = make_pair(name, args, kwargs, device, seed=3)
    ref = TorchWithResidual(ref_norm)
    for i in range(2):
        x = make_input(shape, torch.float32, device, seed=i)
        res = make_input(shape, torch.float32, device, seed=10 + i, offset=False)
        gy = make_input(shape, torch.float32, device, seed=20 + i, offset=False)
        gsum = make_input(shape, torch.float32, device, seed=30 + i, offset=False) if with_gsum else None
        out, s, gx, gres = step(ours, x, gy, res, gsum)
        exp, es, egx, egres = step(ref, x, gy, res, gsum)
        assert_close(out, exp, torch.float32, "forward", f"step {i} output")
        assert_close(s, es, torch.float32, "forward", f"step {i} sum")
        assert_close(gx, egx, torch.float32, "grad", f"step {i} grad_input")
        assert_close(gres, egres, torch.float32, "grad", f"step {i} grad_residual")
        for (pn, p), (_, q) in zip(ours.named_parameters(), ref_norm.named_parameters()):
            assert_close(p.grad, q.grad, torch.float32, "grad", f"step {i} {pn}.grad")
    # without a residual the module returns a tensor
    assert isinstance(ours(make_input(shape, torch.float32, device)), torch.Tensor)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_group_norm_activation(device, layout, activation):
    gn = randomize_(nn.GroupNorm(3, 6, eps=1e-4, device=device), 4)
    ours = tnn.GroupNorm(3, 6, eps=1e-4, device=device, activation=activation, negative_slope=NEGATIVE_SLOPE)
    randomize_(ours, 4)
    ref = TorchGroupNormAct(gn, activation, NEGATIVE_SLOPE)
    assert list(ours.state_dict()) == list(gn.state_dict())
    for i in range(2):
        x = make_input((3, 6, 4, 5), torch.float32, device, layout, seed=i)
        gy = make_input((3, 6, 4, 5), torch.float32, device, seed=20 + i, offset=False)
        out, _, gx, _ = step(ours, x, gy)
        exp, _, egx, _ = step(ref, x, gy)
        assert_close(out, exp, torch.float32, "forward", f"step {i} output")
        assert memory_format_of(out) == memory_format_of(x)
        assert_close(gx, egx, torch.float32, "grad", f"step {i} grad_input")
        assert_close(ours.weight.grad, gn.weight.grad, torch.float32, "grad", f"step {i} weight.grad")
        assert_close(ours.bias.grad, gn.bias.grad, torch.float32, "grad", f"step {i} bias.grad")


def test_group_norm_default_activation_is_none_and_slope_torchs():
    x = make_input((3, 4, 5), torch.float32, seed=1)
    gn = randomize_(nn.GroupNorm(2, 4), 1)
    assert_close(randomize_(tnn.GroupNorm(2, 4), 1)(x), gn(x), torch.float32, "forward", "default activation")
    leaky = randomize_(tnn.GroupNorm(2, 4, activation="leaky_relu"), 1)
    assert_close(leaky(x), torch.nn.functional.leaky_relu(gn(x), 0.01), torch.float32, "forward", "default negative_slope")


# ---------------------------------------------------------------------------
# Attributes, repr, state_dict both ways.
# ---------------------------------------------------------------------------

CONSTRUCTIONS = [
    ("LayerNorm", (7,), {}),
    ("LayerNorm", ((3, 4),), dict(eps=1e-3, bias=False)),
    ("LayerNorm", (5,), dict(elementwise_affine=False)),
    ("RMSNorm", (7,), {}),
    ("RMSNorm", ((3, 4),), dict(eps=1e-6)),
    ("RMSNorm", (5,), dict(elementwise_affine=False)),
    ("GroupNorm", (2, 6), {}),
    ("GroupNorm", (3, 6), dict(eps=1e-3, affine=False)),
    ("InstanceNorm1d", (4,), {}),
    ("InstanceNorm1d", (4,), dict(affine=True, track_running_stats=True)),
    ("InstanceNorm2d", (4,), dict(momentum=None, track_running_stats=True)),
    ("InstanceNorm2d", (4,), dict(affine=True, eps=1e-3)),
    ("InstanceNorm3d", (4,), dict(affine=True, track_running_stats=True, momentum=0.3)),
]
CONSTRUCTION_IDS = [f"{n}-{i}" for i, (n, _, _) in enumerate(CONSTRUCTIONS)]

ATTRIBUTES = ["normalized_shape", "eps", "elementwise_affine", "num_groups", "num_channels", "affine",
              "num_features", "momentum", "track_running_stats"]


@pytest.mark.parametrize("name,args,kwargs", CONSTRUCTIONS, ids=CONSTRUCTION_IDS)
def test_module_attributes_match_torch(name, args, kwargs):
    ref = getattr(nn, name)(*args, **kwargs)
    ours = getattr(tnn, name)(*args, **kwargs)
    assert isinstance(ours, getattr(nn, name)), f"torchnorm.nn.{name} must subclass torch.nn.{name}"
    for attr in ATTRIBUTES:
        if hasattr(ref, attr):
            assert getattr(ours, attr) == getattr(ref, attr), (attr, kwargs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert repr(ours) == repr(ref)
    assert ours.training
    # defaults as torch.nn: weight 1, bias 0, running mean 0, var 1
    assert_same_state(ours, ref, torch.float32, f"defaults {kwargs}")


@pytest.mark.parametrize("name", ["GroupNorm", "InstanceNorm2d"])
def test_bias_keyword_like_torch(name):
    """torch.nn.GroupNorm / InstanceNorm*d take a keyword-only bias=False."""
    args = (2, 4) if name == "GroupNorm" else (4,)
    extra = {} if name == "GroupNorm" else dict(affine=True)
    ref = randomize_(getattr(nn, name)(*args, bias=False, **extra), 2)
    ours = getattr(tnn, name)(*args, bias=False, **extra)
    assert ours.bias is None
    ours.load_state_dict(ref.state_dict())
    x = make_input((3, 4, 5, 4), torch.float32, seed=3)
    assert_close(ours(x), ref(x), torch.float32, "forward", "bias=False")


@pytest.mark.parametrize("name,args,kwargs", CONSTRUCTIONS, ids=CONSTRUCTION_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_load_state_dict_both_ways(device, name, args, kwargs):
    src_torch = randomize_(getattr(nn, name)(*args, device=device, **kwargs), seed=5)
    src_ours = randomize_(getattr(tnn, name)(*args, device=device, **kwargs), seed=6)
    ours = getattr(tnn, name)(*args, device=device, **kwargs)
    theirs = getattr(nn, name)(*args, device=device, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(src_torch.state_dict(), strict=True)  # torch.nn -> torchnorm
    theirs.load_state_dict(src_ours.state_dict(), strict=True)  # torchnorm -> torch.nn
    assert_same_state(ours, src_torch, torch.float32, "torch -> torchnorm")
    assert_same_state(theirs, src_ours, torch.float32, "torchnorm -> torch")
    if name.startswith("InstanceNorm"):
        shape = {"1d": (3, 4, 6), "2d": (3, 4, 5, 3), "3d": (2, 4, 3, 2, 3)}[name[-2:]]
    elif name == "GroupNorm":
        shape = (3, 6, 5)
    else:
        ns = ours.normalized_shape
        shape = (3,) + tuple(ns)
    x = make_input(shape, torch.float32, device, seed=8)
    for mode in (False, True):
        for a, b in ((ours, src_torch), (theirs, src_ours)):
            a.train(mode)
            b.train(mode)
            assert_close(a(x), b(x), torch.float32, "forward", f"after load, training={mode}")
        assert_same_state(ours, src_torch, torch.float32, "after a step")


# ---------------------------------------------------------------------------
# Half inputs (float32 or half parameters), empty batches.
# ---------------------------------------------------------------------------


def reference_forward(module, x, dtype):
    """The float64 reference of a module's forward on x, a float64 copy of an
    input of `dtype` (updates copies of the running stats)."""
    p = {n: to64(t).requires_grad_() for n, t in module.named_parameters()}
    name = type(module).__name__
    stats = {}
    if name == "LayerNorm":
        out = tnref.layer_norm(x, module.normalized_shape, p.get("weight"), p.get("bias"), module.eps)
    elif name == "RMSNorm":
        eps = torch.finfo(accumulate_dtype(dtype)).eps if module.eps is None else module.eps
        out = tnref.rms_norm(x, module.normalized_shape, p.get("weight"), eps)
    elif name == "GroupNorm":
        out = tnref.group_norm(x, module.num_groups, p.get("weight"), p.get("bias"), module.eps)
    else:
        rm, rv = to64(module.running_mean), to64(module.running_var)
        stats = dict(running_mean=rm, running_var=rv)
        out = tnref.instance_norm(x, rm, rv, p.get("weight"), p.get("bias"), module.training or rm is None,
                                  module.momentum, module.eps)
    return out, p, stats


@pytest.mark.parametrize("params", ["f32", "same"], ids=["f32-params", "half-params"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize(
    "name,args,kwargs,shape,layout",
    [
        ("LayerNorm", (37,), {}, (4, 37), "contiguous"),
        ("RMSNorm", (37,), {}, (4, 37), "contiguous"),
        ("GroupNorm", (2, 6), {}, (3, 6, 4, 5), "channels_last"),
        ("InstanceNorm2d", (6,), dict(affine=True, track_running_stats=True), (3, 6, 4, 5), "channels_last"),
    ],
    ids=["ln", "rms", "gn", "in2d"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_module_half_input(device, name, args, kwargs, shape, layout, dtype, params):
    ours = randomize_(getattr(tnn, name)(*args, device=device, **kwargs), 3)
    if params == "same":
        ours = ours.to(dtype)
    pdtype = dtype if params == "same" else torch.float32
    x = make_input(shape, dtype, device, layout, seed=9).requires_grad_()
    x64 = to64(x).requires_grad_()
    exp, p64, stats64 = reference_forward(ours, x64, dtype)
    out = ours(x)
    assert out.dtype == dtype
    assert_close(out, exp, dtype, "forward", "output")
    for n, t in stats64.items():
        assert getattr(ours, n).dtype == pdtype
        assert_close(getattr(ours, n), t, pdtype, "stats", n)
    gy = make_input(shape, dtype, device, seed=10, offset=False)
    out.backward(gy)
    exp.backward(to64(gy))
    assert x.grad.dtype == dtype
    assert_close(x.grad, x64.grad, dtype, "grad", "grad_input")
    for n, p in ours.named_parameters():
        assert p.grad.dtype == pdtype, f"{n}.grad dtype {p.grad.dtype}"
        assert_close(p.grad, p64[n].grad, dtype, "grad", f"{n}.grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_module_default_eps_like_torch(device, dtype):
    """RMSNorm(eps=None) in a half model: torch.nn.RMSNorm's eps is float32's
    machine epsilon there; rows of small values so that it matters."""
    ref, ours = make_pair("RMSNorm", (50,), {}, device, dtype, seed=2)
    x = make_input((3, 50), dtype, device, seed=5, scale=0.02, offset=False)
    assert_close(ours(x), ref(x), dtype, "forward", "RMSNorm(eps=None)")


@pytest.mark.parametrize(
    "name,args,kwargs,shape",
    [
        ("LayerNorm", (7,), {}, (0, 7)),
        ("RMSNorm", ((3, 5),), {}, (0, 3, 5)),
        ("GroupNorm", (2, 4), {}, (0, 4, 3, 3)),
        ("InstanceNorm1d", (3,), dict(affine=True, track_running_stats=True), (0, 3, 5)),
        ("InstanceNorm2d", (3,), dict(affine=True, track_running_stats=True), (0, 3, 4, 4)),
        ("InstanceNorm3d", (3,), dict(track_running_stats=True), (0, 3, 2, 2, 2)),
    ],
    ids=["ln", "rms", "gn", "in1d", "in2d", "in3d"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_module(device, name, args, kwargs, shape):
    ours = randomize_(getattr(tnn, name)(*args, device=device, **kwargs), 1)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = make_input(shape, torch.float32, device).requires_grad_()
    out = ours(x)
    assert tuple(out.shape) == shape
    out.sum().backward()
    assert tuple(x.grad.shape) == shape
    for n, p in ours.named_parameters():
        assert torch.all(p.grad == 0), f"{n}.grad of an empty batch: {p.grad}"
    for k, v in ours.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, before[k]), f"an empty batch changed {k}"


# ---------------------------------------------------------------------------
# torchnorm.convert
# ---------------------------------------------------------------------------


class Mixed(nn.Module):
    """Every per-sample norm of torch.nn (and a BatchNorm) in one model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.gn_plain = nn.GroupNorm(4, 4, affine=False, eps=1e-3)
        self.in2 = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.bn = nn.BatchNorm2d(4)
        self.in3 = nn.InstanceNorm3d(4, affine=True, momentum=0.3, track_running_stats=True)
        self.in1 = nn.InstanceNorm1d(4)
        self.ln = nn.LayerNorm(20, bias=False)
        self.rms = nn.RMSNorm(4, eps=1e-5)
        self.ln2 = nn.LayerNorm((20, 4), elementwise_affine=False)

    def forward(self, x):
        y = self.gn_plain(self.gn(self.conv(x)))
        y = self.bn(self.in2(y))
        y = self.in3(y.unsqueeze(2)).squeeze(2)
        f = self.in1(y.flatten(2))  # (N, 4, 20)
        f = self.ln(f)
        f = self.rms(f.transpose(1, 2))  # (N, 20, 4)
        return self.ln2(f)


def mixed_model(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = Mixed().to(device=device, dtype=dtype)
    for i, m in enumerate(model.modules()):
        if m is not model and not isinstance(m, nn.Conv2d):
            randomize_(m, 10 * i)
    return model


def test_convert_round_trip():
    model = mixed_model()
    model.in2.eval()  # mixed train / eval modes must be kept
    model.gn.weight.requires_grad_(False)  # a frozen norm stays frozen
    original = copy.deepcopy(model)

    converted = torchnorm.convert(model)
    orig_modules = dict(original.named_modules())
    for n, m in converted.named_modules():
        o = orig_modules[n]
        if type(o) in TORCH_TYPES or isinstance(o, nn.BatchNorm2d):
            assert type(m).__module__.startswith("torchnorm"), f"{n} not converted: {type(m)}"
            assert type(m).__name__ == type(o).__name__, f"{n}: {type(o).__name__} became {type(m).__name__}"
            assert isinstance(m, type(o))
        else:
            assert type(m) is type(o), f"{n} changed type to {type(m)}"
    assert not any(type(m) in TORCH_TYPES for m in converted.modules())
    assert_same_model_state(converted, original)
    # parameters are shared, not copied
    assert converted.ln.weight is model.ln.weight

    x = make_input((3, 3, 4, 5), torch.float32, seed=1, offset=False)
    assert_round_trip(converted, original, x, eval_child="in2")


@pytest.mark.parametrize("name,args,kwargs", CONSTRUCTIONS[::2], ids=CONSTRUCTION_IDS[::2])
def test_convert_top_level_module(name, args, kwargs):
    m = randomize_(getattr(nn, name)(*args, **kwargs), 1)
    converted = torchnorm.convert(m)
    assert type(converted) is getattr(tnn, name)
    back = torchnorm.convert(converted, back=True)
    assert type(back) is getattr(nn, name)


def test_convert_keeps_float64():
    model = mixed_model(dtype=torch.float64).eval()
    original = copy.deepcopy(model)
    converted = torchnorm.convert(model)
    assert_same_model_state(converted, original)
    x = make_input((2, 3, 4, 5), torch.float64, seed=3)
    assert_close(converted(x), original(x), torch.float64, "forward", "float64 model")


# ---------------------------------------------------------------------------
# torch.fx
# ---------------------------------------------------------------------------


class TracedNet(nn.Module):
    """conv -> one kind of torchnorm module (two InstanceNorms for "instance_norm")."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        if kind == "layer_norm":
            self.norm = tnn.LayerNorm(20)
        elif kind == "rms_norm":
            self.norm = tnn.RMSNorm(20)  # eps=None
        elif kind == "rms_norm-eps":
            self.norm = tnn.RMSNorm(20, eps=1e-6)
        elif kind == "group_norm":
            self.norm = tnn.GroupNorm(2, 4, activation="silu")
        else:
            self.norm = tnn.InstanceNorm2d(4, affine=True, track_running_stats=True)
            self.norm1d = tnn.InstanceNorm1d(4)

    def forward(self, x):
        y = self.conv(x)
        if self.kind == "group_norm":
            return self.norm(y)
        if self.kind == "instance_norm":
            return self.norm1d(self.norm(y).flatten(2))
        f = y.flatten(2)  # (N, 4, 20)
        z, s = self.norm(f, residual=f)  # the fused residual
        return self.norm(z) + s


FX_OPS = {
    "layer_norm": {"layer_norm"},
    "rms_norm": {"rms_norm"},
    "rms_norm-eps": {"rms_norm"},
    "group_norm": {"group_norm"},
    "instance_norm": {"instance_norm", "batch_norm_eval"},
}


def torchnorm_targets(gm):
    return {str(n.target).split(".")[1] for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("torchnorm.")}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(FX_OPS))
def test_fx_symbolic_trace_shows_torchnorm_ops(kind, training):
    """torch.nn's norms are leaves for torch.fx; torchnorm's are traced through,
    so their forward must not branch on (or query) the proxy input."""
    torch.manual_seed(0)
    net = TracedNet(kind)
    for i, m in enumerate(net.children()):
        if not isinstance(m, nn.Conv2d):
            randomize_(m, 10 * i)
    net.train(training)
    eager = copy.deepcopy(net)
    gm = torch.fx.symbolic_trace(net)
    targets = torchnorm_targets(gm)
    assert targets & FX_OPS[kind], f"no torchnorm op of {kind} in the graph:\n{gm.graph}"
    x = make_input((2, 3, 4, 5), torch.float32, seed=1)
    assert_close(gm(x), eager(x), torch.float32, "forward", "traced vs eager")
    for (n, t), (_, u) in zip(net.named_buffers(), eager.named_buffers()):
        if n.endswith("num_batches_tracked"):
            assert torch.equal(t, u), n
        else:
            assert_close(t, u, torch.float32, "stats", f"{n} after a traced step")
