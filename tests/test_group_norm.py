"""GroupNorm ops and torchnorm.functional.group_norm with the fused activation:
forward and gradients (input, weight, bias) against act(torch.nn.functional.group_norm)
(same dtype) and the float64 torchnorm.reference, over ranks 2..5, contiguous,
channels-last and non-contiguous inputs (the output keeps the memory format),
num_groups 1 / C / in between, odd sizes, long groups, dtypes and affine
variants; the ops directly (saved statistics, group_norm_backward's output
mask); empty batches; float16 groups with mean 1e4; gradcheck and
torch.compile. (opcheck: tests/test_opcheck.py.)
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
    NEGATIVE_SLOPE,
    accumulate_dtype,
    act_name,
    apply_layout,
    assert_close,
    assert_grads_close,
    grads_of,
    group_norm_inputs,
    leaf,
    make_affine,
    make_input,
    params_with_dtypes,
    memory_format_of,
    poison,
    randn,
    to64,
    torch_act,
)
from tolerances import GRADCHECK, LARGE_MEAN_VARIANCE

OPS = torch.ops.torchnorm
EPS = 1e-5

# (shape, num_groups, layout): ranks 2..5; num_groups 1, C and in between;
# channels-last with C (and C / G) not a multiple of any vector width;
# transposed / sliced views; long groups (several 2048-element segments; a
# 72000-element group in test_long_group). Groups of a single element are in
# test_single_element_groups (torch itself is not exact there), and groups are
# never of 2 elements here: their normalized values are +-1 whatever the input,
# so grad_input is a pure cancellation that no float32 kernel (torch's
# included) gets within the tolerance.
CASES = [
    pytest.param((5, 12), 3, "contiguous", id="2d-G3"),
    pytest.param((4, 6), 1, "transposed", id="2d-G1-transposed"),
    pytest.param((3, 6, 7), 1, "contiguous", id="3d-G1"),
    pytest.param((2, 6, 123), 2, "contiguous", id="3d-L123"),
    pytest.param((3, 6, 7), 3, "transposed", id="3d-transposed"),
    pytest.param((2, 10, 13), 5, "sliced", id="3d-sliced"),
    pytest.param((3, 5, 9), 5, "contiguous", id="3d-G=C"),
    pytest.param((3, 4, 7, 5), 2, "contiguous", id="4d"),
    pytest.param((3, 4, 7, 5), 4, "channels_last", id="4d-cl-G=C"),
    pytest.param((2, 12, 5, 3), 3, "channels_last", id="4d-cl-G3"),
    pytest.param((2, 15, 4, 3), 5, "channels_last", id="4d-cl-C15"),
    pytest.param((2, 6, 5, 7), 1, "channels_last", id="4d-cl-G1"),
    pytest.param((3, 8, 5, 7), 4, "transposed", id="4d-transposed"),
    pytest.param((2, 6, 3, 5, 4), 3, "contiguous", id="5d"),
    pytest.param((2, 6, 3, 5, 4), 2, "channels_last_3d", id="5d-cl3d"),
    pytest.param((2, 4, 61, 67), 2, "contiguous", id="4d-long-group"),
    pytest.param((2, 4, 61, 67), 2, "channels_last", id="4d-cl-long-group"),
]

# (activation, affine): every activation with weight and bias, and the affine
# variants with and without an activation.
ACT_AFFINE = [
    pytest.param(None, "wb", id="none-weight-bias"),
    pytest.param(None, "w", id="none-weight"),
    pytest.param(None, "none", id="none-noaffine"),
    pytest.param("relu", "wb", id="relu-weight-bias"),
    pytest.param("leaky_relu", "wb", id="leaky_relu-weight-bias"),
    pytest.param("leaky_relu", "w", id="leaky_relu-weight"),
    pytest.param("silu", "wb", id="silu-weight-bias"),
    pytest.param("silu", "none", id="silu-noaffine"),
]

REF_CASES = [
    pytest.param((5, 12), 3, "contiguous", id="2d-G3"),
    pytest.param((3, 6, 7), 3, "transposed", id="3d-transposed"),
    pytest.param((3, 4, 7, 5), 1, "contiguous", id="4d-G1"),
    pytest.param((2, 15, 4, 3), 5, "channels_last", id="4d-cl-C15"),
    pytest.param((2, 6, 3, 5, 4), 6, "channels_last_3d", id="5d-cl3d-G=C"),
    pytest.param((2, 4, 61, 67), 2, "channels_last", id="4d-cl-long-group"),
]

DENSE = ("contiguous", "channels_last", "channels_last_3d")
GRAD_NAMES = ["grad_input", "grad_weight", "grad_bias"]


def run(impl, x, G, w, b, activation, gy, eps=EPS, negative_slope=NEGATIVE_SLOPE):
    """(out, [grad_input, grad_weight, grad_bias]) through torchnorm, torch or the reference."""
    if impl == "reference":
        x, w, b = (leaf(to64(t)) for t in (x, w, b))
        gy = to64(gy)
        out = tnref.group_norm(x, G, w, b, eps, activation, negative_slope)
    else:
        x, w, b = (leaf(t) for t in (x, w, b))
        if impl == "torchnorm":
            out = tnf.group_norm(x, G, w, b, eps, activation=activation, negative_slope=negative_slope)
        else:
            out = torch_act(F.group_norm(x, G, w, b, eps), activation, negative_slope)
    return out, grads_of([out], [x, w, b], [gy])


# ---------------------------------------------------------------------------
# Against torch.nn.functional (float32 / float64).
# ---------------------------------------------------------------------------


@pytest.mark.slow  # the whole matrix: `pytest -m "not slow"` leaves it out
@pytest.mark.parametrize("activation,affine", ACT_AFFINE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,G,layout", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_functional_matches_torch(device, shape, G, layout, dtype, activation, affine):
    x, w, b, gy = group_norm_inputs(shape, layout, dtype, dtype, device, affine)
    x_before = x.clone()
    poison(device)
    out, grads = run("torchnorm", x, G, w, b, activation, gy)
    exp, exp_grads = run("torch", x, G, w, b, activation, gy)
    assert out.dtype == dtype and out.device == x.device and tuple(out.shape) == shape
    assert_close(out, exp, dtype, "forward", "output")
    if layout in DENSE:
        assert memory_format_of(out) == memory_format_of(x), f"output strides {out.stride()} for input {x.stride()}"
    assert_grads_close(GRAD_NAMES, grads, exp_grads, dtype)
    assert torch.equal(x, x_before), "the input was written"


# ---------------------------------------------------------------------------
# Every dtype (half with half or float32 parameters) against the float64 reference.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("affine", ["wb", "none"], ids=["weight-bias", "noaffine"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("shape,G,layout", REF_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_functional_matches_reference(device, shape, G, layout, dtypes, activation, affine):
    dtype, pdtype = dtypes
    x, w, b, gy = group_norm_inputs(shape, layout, dtype, pdtype, device, affine, seed=1)
    poison(device)
    out, grads = run("torchnorm", x, G, w, b, activation, gy)
    exp, exp_grads = run("reference", x, G, w, b, activation, gy)
    assert out.dtype == dtype, f"output dtype {out.dtype} for a {dtype} input"
    assert_close(out, exp, dtype, "forward", "output")
    if layout in DENSE:
        assert memory_format_of(out) == memory_format_of(x)
    assert_grads_close(GRAD_NAMES, grads, exp_grads, dtype, inputs=(x, w, b))


LONG_GROUP = [
    ("contiguous", "silu", "wb", DTYPES_ALL[0]),
    ("contiguous", "silu", "wb", DTYPES_ALL[3]),
    ("contiguous", "leaky_relu", "none", DTYPES_ALL[0]),
    ("channels_last", "silu", "wb", DTYPES_ALL[0]),
    ("channels_last", "silu", "wb", DTYPES_ALL[5]),
    ("channels_last", "leaky_relu", "none", DTYPES_ALL[4]),
]


@pytest.mark.parametrize("layout,activation,affine,dtypes", params_with_dtypes(LONG_GROUP))
@pytest.mark.parametrize("device", DEVICES)
def test_long_group(device, layout, activation, affine, dtypes):
    """A group of 72000 elements: many times the kernel's 2048-element segment."""
    dtype, pdtype = dtypes
    shape, G = (1, 2, 200, 180), 1
    x, w, b, gy = group_norm_inputs(shape, layout, dtype, pdtype, device, affine, seed=2)
    poison(device, x.numel() * 4)
    out, grads = run("torchnorm", x, G, w, b, activation, gy)
    expected = [("reference", run("reference", x, G, w, b, activation, gy))]
    if dtype in (torch.float32, torch.float64):
        # (torch on the same values in NCHW: its channels-last CPU kernel is off by
        # ~4e-5 from float64 on groups this long, beyond the float32 tolerance)
        expected.append(("torch", run("torch", x.contiguous(), G, w, b, activation, gy)))
    assert memory_format_of(out) == memory_format_of(x)
    for who, (exp, exp_grads) in expected:
        assert_close(out, exp, dtype, "forward", f"output vs {who}")
        for name, g, e in zip(GRAD_NAMES, grads, exp_grads):
            if e is not None:
                assert_close(g, e, dtype, "grad", f"{name} vs {who}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_many_groups(device, layout):
    """Enough samples and groups for every parallel path, and the weight / bias
    gradients reduced across all of them."""
    shape, G = (24, 32, 9, 7), 8
    x, w, b, gy = group_norm_inputs(shape, layout, torch.float32, torch.float32, device, "wb", seed=4)
    poison(device, x.numel() * 4)
    out, grads = run("torchnorm", x, G, w, b, "silu", gy)
    assert memory_format_of(out) == memory_format_of(x)
    for who in ("torch", "reference"):
        exp, exp_grads = run(who, x, G, w, b, "silu", gy)
        assert_close(out, exp, torch.float32, "forward", f"output vs {who}")
        for name, g, e in zip(GRAD_NAMES, grads, exp_grads):
            assert_close(g, e, torch.float32, "grad", f"{name} vs {who}")


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("dtypes", [DTYPES_ALL[0], DTYPES_ALL[1], DTYPES_ALL[2], DTYPES_ALL[5]])
@pytest.mark.parametrize("shape,G", [((5, 6), 6), ((1, 3, 1, 1), 3), ((4, 6, 1), 6)], ids=["2d-G=C", "4d-1x1-G=C", "3d-L1-G=C"])
@pytest.mark.parametrize("device", DEVICES)
def test_single_element_groups(device, shape, G, dtypes, activation):
    """Groups of one element: x - mean is exactly 0, so the output is act(bias)
    and the gradients of input and weight vanish (up to rstd = 1/sqrt(eps)
    times rounding). Against the reference only: torch's own float32 kernel is
    not exact here (and F.group_norm refuses a batch of one such group).
    eps=1e-2 keeps rstd at 10: with eps=1e-5 (rstd 316) the rounding of the
    vanishing grad_input is amplified to ~1e-4 by any float32 formula (torch's
    too)."""
    dtype, pdtype = dtypes
    x, w, b, gy = group_norm_inputs(shape, "contiguous", dtype, pdtype, device, "wb", seed=3)
    out, grads = run("torchnorm", x, G, w, b, activation, gy, eps=1e-2)
    exp, exp_grads = run("reference", x, G, w, b, activation, gy, eps=1e-2)
    assert_close(out, exp, dtype, "forward", "output")
    for name, g, e in zip(GRAD_NAMES, grads, exp_grads):
        assert_close(g, e, dtype, "grad", name)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
def test_reference_follows_torch(activation):
    """The float64 reference itself, against torch in float64."""
    x = make_input((3, 6, 4, 5), torch.float64, layout="channels_last", seed=20)
    w, b = make_affine((6,), torch.float64, seed=21)
    exp = torch_act(F.group_norm(x, 3, w, b, 1e-3), activation)
    assert_close(tnref.group_norm(x, 3, w, b, 1e-3, activation, NEGATIVE_SLOPE), exp, torch.float64, "forward", "reference")
    assert_close(tnref.group_norm(x, 2), F.group_norm(x, 2), torch.float64, "forward", "reference, defaults")


@pytest.mark.parametrize("device", DEVICES)
def test_default_negative_slope_is_torchs(device):
    x = make_input((4, 6, 5), torch.float32, device)
    out = tnf.group_norm(x, 2, activation="leaky_relu")
    assert_close(out, F.leaky_relu(F.group_norm(x, 2)), torch.float32, "forward", "slope 0.01")
    assert_close(tnf.group_norm(x, 3), F.group_norm(x, 3), torch.float32, "forward", "defaults")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_with_expanded_grad_output(device, layout):
    """out.sum().backward() hands the backward a stride-0 grad_output."""
    x, w, b, _ = group_norm_inputs((3, 6, 5, 3), layout, torch.float32, torch.float32, device, "wb")
    tx, tw, tb = (leaf(t) for t in (x, w, b))
    ex, ew, eb = (leaf(t.clone()) for t in (x, w, b))
    tnf.group_norm(tx, 3, tw, tb, activation="silu").sum().backward()
    F.silu(F.group_norm(ex, 3, ew, eb)).sum().backward()
    for name, g, e in [("input", tx, ex), ("weight", tw, ew), ("bias", tb, eb)]:
        assert_close(g.grad, e.grad, torch.float32, "grad", name)


# ---------------------------------------------------------------------------
# The ops themselves: saved statistics and the output mask.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize(
    "shape,G,layout",
    [((7, 6), 2, "contiguous"), ((3, 6, 4, 3), 3, "channels_last"), ((2, 4, 2, 3, 5), 4, "channels_last_3d"), ((2, 4, 3, 9), 1, "transposed")],
    ids=["2d", "4d-cl", "5d-cl3d", "4d-transposed-G1"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_op_group_norm(device, shape, G, layout, dtypes, activation):
    dtype, pdtype = dtypes
    x, w, b, _ = group_norm_inputs(shape, layout, dtype, pdtype, device, "wb", seed=11)
    poison(device)
    out, mean, rstd = OPS.group_norm(x, G, w, b, 1e-3, act_name(activation), NEGATIVE_SLOPE)
    acc = accumulate_dtype(dtype)
    N = shape[0]
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert mean.dtype == acc and rstd.dtype == acc, (mean.dtype, rstd.dtype)
    assert tuple(mean.shape) == (N, G) and tuple(rstd.shape) == (N, G), (tuple(mean.shape), tuple(rstd.shape))
    if layout in DENSE:
        assert memory_format_of(out) == memory_format_of(x)
    g64 = to64(x).reshape(N, G, -1)
    assert_close(mean, g64.mean(2), acc, "stats", "saved mean")
    assert_close(rstd, (g64.var(2, unbiased=False) + 1e-3).rsqrt(), acc, "stats", "saved rstd")
    exp = tnref.group_norm(to64(x), G, to64(w), to64(b), 1e-3, activation, NEGATIVE_SLOPE)
    assert_close(out, exp, dtype, "forward", "output")


@pytest.mark.parametrize("mask", list(itertools.product([True, False], repeat=3)), ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_op_backward_output_mask(device, layout, activation, mask):
    shape, G = (3, 6, 4, 5), 3
    dtype = torch.float32
    x, w, b, gy = group_norm_inputs(shape, layout, dtype, dtype, device, "wb", seed=13)
    _, mean, rstd = OPS.group_norm(x, G, w, b, EPS, activation, 0.0)
    poison(device)
    got = OPS.group_norm_backward(gy, x, G, mean, rstd, w, b, activation, 0.0, list(mask))
    assert len(got) == 3
    _, exp = run("reference", x, G, w, b, activation, gy, negative_slope=0.0)
    for name, m, g, e in zip(GRAD_NAMES, mask, got, exp):
        if m:
            assert_close(g, e, dtype, "grad", name)
        else:
            assert tuple(g.shape) == (0,), f"masked-out {name} has shape {tuple(g.shape)}, expected (0,)"


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("device", DEVICES)
def test_op_backward_dtypes(device, dtypes, activation):
    dtype, pdtype = dtypes
    shape, G = (3, 6, 3, 5), 2
    x, w, b, gy = group_norm_inputs(shape, "channels_last", dtype, pdtype, device, "wb", seed=14)
    act = act_name(activation)
    _, mean, rstd = OPS.group_norm(x, G, w, b, EPS, act, NEGATIVE_SLOPE)
    got = OPS.group_norm_backward(gy, x, G, mean, rstd, w, b, act, NEGATIVE_SLOPE, [True] * 3)
    _, exp = run("reference", x, G, w, b, activation, gy)
    for name, g, e, src in zip(GRAD_NAMES, got, exp, (x, w, b)):
        assert g.dtype == src.dtype, f"{name} dtype {g.dtype}, expected {src.dtype}"
        assert_close(g, e, dtype, "grad", name)


@pytest.mark.parametrize("activation", ["none", "leaky_relu"])
@pytest.mark.parametrize("device", DEVICES)
def test_op_backward_without_affine(device, activation):
    shape, G = (4, 6, 7), 3
    x, _, _, gy = group_norm_inputs(shape, "contiguous", torch.float32, torch.float32, device, "none", seed=15)
    _, mean, rstd = OPS.group_norm(x, G, None, None, EPS, activation, NEGATIVE_SLOPE)
    gx, gw, gb = OPS.group_norm_backward(gy, x, G, mean, rstd, None, None, activation, NEGATIVE_SLOPE, [True, False, False])
    _, exp = run("reference", x, G, None, None, activation, gy)
    assert_close(gx, exp[0], torch.float32, "grad", "grad_input")
    assert tuple(gw.shape) == (0,) and tuple(gb.shape) == (0,)


# ---------------------------------------------------------------------------
# Empty batch, numerics.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,layout",
    [((0, 6), "contiguous"), ((0, 6, 5), "contiguous"), ((0, 6, 4, 4), "contiguous"), ((0, 6, 4, 4), "channels_last"), ((0, 6, 2, 3, 3), "channels_last_3d")],
    ids=["2d", "3d", "4d", "4d-cl", "5d-cl3d"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device, shape, layout):
    x, w, b, gy = group_norm_inputs(shape, layout, torch.float32, torch.float32, device, "wb")
    out, (gx, gw, gb) = run("torchnorm", x, 3, w, b, "relu", gy)
    assert tuple(out.shape) == shape and out.dtype == x.dtype
    assert tuple(gx.shape) == shape
    for name, g in (("grad_weight", gw), ("grad_bias", gb)):
        assert tuple(g.shape) == (shape[1],) and torch.all(g == 0), f"{name} of an empty input: {g}"
    o, mean, rstd = OPS.group_norm(x, 3, w, b, EPS, "relu", 0.0)
    assert tuple(o.shape) == shape and tuple(mean.shape) == (shape[0], 3) and tuple(rstd.shape) == (shape[0], 3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "dtype,mean,std",
    [(torch.float16, 1e4, 1.0), (torch.float16, 1e4, 8.0), (torch.float16, -1e3, 1.0), (torch.float32, 1e4, 1.0)],
)
@pytest.mark.parametrize("device", DEVICES)
def test_large_mean_variance(device, dtype, mean, std, layout):
    """float16 groups with mean 1e4 and std 1: the variance must come from the
    centred values (Welford / two-pass), never E[x^2] - E[x]^2."""
    shape, G = (3, 6, 24, 24), 2
    x = apply_layout(randn(shape, 31, dtype, "cpu", scale=std, offset=mean), layout).to(device)
    g64 = to64(x).reshape(3, G, -1)
    var64 = g64.var(2, unbiased=False)
    out, saved_mean, rstd = OPS.group_norm(x, G, None, None, EPS, "none", 0.0)
    var = 1.0 / rstd.double() ** 2 - EPS
    assert torch.isfinite(rstd).all() and (rstd > 0).all(), f"rstd {rstd}"
    torch.testing.assert_close(var.cpu(), var64, **LARGE_MEAN_VARIANCE)
    assert_close(saved_mean, g64.mean(2), torch.float32, "stats", "saved mean")
    if dtype == torch.float16:
        assert_close(out, tnref.group_norm(to64(x), G, eps=EPS), dtype, "forward", "output")


# ---------------------------------------------------------------------------
# gradcheck (float64), torch.compile (opcheck: tests/test_opcheck.py).
# ---------------------------------------------------------------------------


def _gradcheck_inputs(shape, G, activation, affine, layout):
    """Small float64 inputs; for relu / leaky_relu a seed whose pre-activation
    stays away from the kink at 0 (finite differences would straddle it)."""
    for seed in range(200):
        x = make_input(shape, torch.float64, "cpu", layout, seed=seed, scale=1.0)
        w, b = make_affine((shape[1],), torch.float64, "cpu", seed + 1, affine)
        if activation not in ("relu", "leaky_relu"):
            break
        if tnref.group_norm(x, G, w, b, 1e-3).abs().min() > 1e-3:
            break
    return x, w, b


@pytest.mark.parametrize("affine", ["wb", "none"], ids=["weight-bias", "noaffine"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
@pytest.mark.parametrize(
    "shape,G,layout",
    [((3, 4), 2, "contiguous"), ((2, 4, 3), 2, "contiguous"), ((2, 4, 2, 3), 4, "channels_last"), ((2, 2, 2, 3), 1, "contiguous")],
    ids=["2d", "3d", "4d-cl-G=C", "4d-G1"],
)
def test_gradcheck_functional(shape, G, layout, activation, affine):
    x, w, b = _gradcheck_inputs(shape, G, activation, affine, layout)
    present = [(n, t) for n, t in zip(["x", "w", "b"], (x, w, b)) if t is not None]

    def fn(*args):
        kw = dict(zip([n for n, _ in present], args))
        return tnf.group_norm(kw["x"], G, kw.get("w"), kw.get("b"), 1e-3, activation=activation, negative_slope=NEGATIVE_SLOPE)

    args = [t.detach().requires_grad_() for _, t in present]
    assert torch.autograd.gradcheck(fn, args, **GRADCHECK)


def test_gradcheck_op():
    """The registered autograd of the op itself (output 0), silu, channels-last."""
    x, w, b = _gradcheck_inputs((2, 6, 2, 3), 3, "silu", "wb", "channels_last")

    def fn(x, w, b):
        return OPS.group_norm(x, 3, w, b, 1e-3, "silu", 0.0)[0]

    assert torch.autograd.gradcheck(fn, [t.detach().requires_grad_() for t in (x, w, b)], **GRADCHECK)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b, gy = group_norm_inputs((2, 6, 4, 5), "channels_last", torch.float32, torch.float32, "cpu", "wb", seed=16)

    def fn(x, w, b):
        return tnf.group_norm(x, 3, w, b, EPS, activation="silu") * 2.0

    compiled = torch.compile(fn, fullgraph=True)
    comp_args = [leaf(t.clone()) for t in (x, w, b)]
    eager_args = [leaf(t.clone()) for t in (x, w, b)]
    out, exp = compiled(*comp_args), fn(*eager_args)
    assert_close(out, exp, torch.float32, "forward", "compiled output")
    assert memory_format_of(out) == torch.channels_last
    out.backward(gy)
    exp.backward(gy)
    for name, a, e in zip(GRAD_NAMES, comp_args, eager_args):
        assert_close(a.grad, e.grad, torch.float32, "grad", f"compiled {name}")
    torch._dynamo.reset()


def test_ops_are_registered_by_import():
    for name in ("group_norm", "group_norm_backward"):
        assert hasattr(torch.ops.torchnorm, name), name
