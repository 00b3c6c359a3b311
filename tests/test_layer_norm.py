"""LayerNorm and RMSNorm ops and torchnorm.functional.layer_norm / rms_norm,
including the fused residual add (out, sum = norm(x + residual), x + residual):
forward and every gradient (input, weight, bias, residual, and the gradient
arriving through the sum) against torch.nn.functional (same dtype) and the
float64 torchnorm.reference, over dtypes, odd and long rows, one- and
two-dimensional normalized shapes, non-contiguous inputs and the affine
variants; the ops directly (saved statistics, layer_norm_backward's output
mask); empty batches; a float16 row with mean 1e4; gradcheck and
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
    DEVICES,
    DTYPES_ALL,
    accumulate_dtype,
    assert_close,
    assert_grads_close,
    grads_of,
    leaf,
    make_affine,
    make_input,
    params_with_dtypes,
    poison,
    randn,
    row_norm_inputs,
    to64,
)
from tolerances import GRADCHECK, LARGE_MEAN_VARIANCE

OPS = torch.ops.torchnorm
EPS = 1e-5

# (input shape, normalized_shape, layout): odd row lengths, rows of length 1,
# lengths that are not multiples of 8 / 16, rows just over and many times the
# kernel's 2048-element segment (D = 70000 in test_long_row), two normalized dims, non-contiguous rows
# (transposed: the row's elements are strided; sliced: every other element),
# a single row without batch dims.
CASES = [
    pytest.param((4, 7), (7,), "contiguous", id="D7"),
    pytest.param((2, 3, 123), (123,), "contiguous", id="D123"),
    pytest.param((5, 1), (1,), "contiguous", id="D1"),
    pytest.param((3, 4, 1, 1), (1, 1), "contiguous", id="D1x1"),
    pytest.param((6, 17), (17,), "transposed", id="D17-transposed"),
    pytest.param((3, 5, 40), (40,), "sliced", id="D40-sliced"),
    pytest.param((2, 5, 6, 7), (6, 7), "contiguous", id="D6x7"),
    pytest.param((3, 4, 9), (4, 9), "transposed", id="D4x9-transposed"),
    pytest.param((2, 2049), (2049,), "contiguous", id="D2049"),
    pytest.param((3, 3, 700), (3, 700), "contiguous", id="D3x700"),
    pytest.param((9,), (9,), "contiguous", id="single-row"),
]

REF_CASES = [
    pytest.param((4, 7), (7,), "contiguous", id="D7"),
    pytest.param((5, 1), (1,), "contiguous", id="D1"),
    pytest.param((6, 17), (17,), "transposed", id="D17-transposed"),
    pytest.param((2, 5, 6, 7), (6, 7), "contiguous", id="D6x7"),
    pytest.param((3, 2, 1000), (1000,), "sliced", id="D1000-sliced"),
]

# (op, affine): RMSNorm has no bias.
OP_AFFINE = [
    pytest.param("layer_norm", "wb", id="ln-weight-bias"),
    pytest.param("layer_norm", "w", id="ln-weight"),
    pytest.param("layer_norm", "none", id="ln-noaffine"),
    pytest.param("rms_norm", "w", id="rms-weight"),
    pytest.param("rms_norm", "none", id="rms-noaffine"),
]

# residual: none; fused, with the sum unused afterwards (no gradient arrives
# through it); fused, with a gradient through the sum too (a transformer's
# residual stream).
RESIDUAL = ["nores", "res", "res-gsum"]

GRAD_NAMES = ["grad_input", "grad_weight", "grad_bias", "grad_residual"]


def default_eps(op):
    return EPS if op == "layer_norm" else None


# ---------------------------------------------------------------------------
# Runners: the same call through torchnorm, torch and the float64 reference.
# ---------------------------------------------------------------------------


def run(impl, op, x, ns, w, b, res, gy, gsum, eps):
    """(out, sum or None, [grad_input, grad_weight, grad_bias, grad_residual])."""
    if impl == "reference":
        if eps is None:  # rms_norm's default, of the input's (not float64's) computation dtype
            eps = torch.finfo(accumulate_dtype(x.dtype)).eps
        x, w, b, res = (leaf(to64(t)) for t in (x, w, b, res))
        gy, gsum = to64(gy), to64(gsum)
    else:
        x, w, b, res = (leaf(t) for t in (x, w, b, res))
    s = None
    if impl == "torch":
        s = x + res if res is not None else None
        inp = x if s is None else s
        out = F.layer_norm(inp, ns, w, b, eps) if op == "layer_norm" else F.rms_norm(inp, ns, w, eps)
    else:
        mod = tnf if impl == "torchnorm" else tnref
        if op == "layer_norm":
            r = mod.layer_norm(x, ns, w, b, eps=eps, residual=res)
        else:
            assert b is None
            r = mod.rms_norm(x, ns, w, eps=eps, residual=res)
        if res is None:
            assert isinstance(r, torch.Tensor), f"{impl} {op} without residual returned {type(r)}"
            out = r
        else:
            assert isinstance(r, tuple) and len(r) == 2, f"{impl} {op} with a residual must return (out, sum)"
            out, s = r
    grads = grads_of([out, s], [x, w, b, res], [gy, gsum if s is not None else None])
    return out, s, grads


# ---------------------------------------------------------------------------
# Against torch.nn.functional (float32 / float64).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("residual", RESIDUAL)
@pytest.mark.parametrize("op,affine", OP_AFFINE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,ns,layout", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_functional_matches_torch(device, shape, ns, layout, dtype, op, affine, residual):
    x, w, b, res, gy, gsum = row_norm_inputs(shape, ns, layout, dtype, dtype, device, op, affine, residual)
    x_before = x.clone()
    res_before = None if res is None else res.clone()
    eps = default_eps(op)

    poison(device)
    out, s, grads = run("torchnorm", op, x, ns, w, b, res, gy, gsum, eps)
    exp, exp_s, exp_grads = run("torch", op, x, ns, w, b, res, gy, gsum, eps)

    assert out.dtype == dtype and out.device == x.device
    assert_close(out, exp, dtype, "forward", "output")
    if res is not None:
        assert s.dtype == dtype
        assert_close(s, exp_s, dtype, "forward", "sum")
    assert_grads_close(GRAD_NAMES, grads, exp_grads, dtype)
    assert torch.equal(x, x_before), "the input was written"
    if res is not None:
        assert torch.equal(res, res_before), "the residual was written"


# ---------------------------------------------------------------------------
# Every dtype (half with half or float32 parameters) against the float64 reference.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("residual", ["nores", "res-gsum"])
@pytest.mark.parametrize("op,affine", OP_AFFINE)
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("shape,ns,layout", REF_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_functional_matches_reference(device, shape, ns, layout, dtypes, op, affine, residual):
    dtype, pdtype = dtypes
    x, w, b, res, gy, gsum = row_norm_inputs(shape, ns, layout, dtype, pdtype, device, op, affine, residual, seed=1)
    eps = default_eps(op)

    poison(device)
    out, s, grads = run("torchnorm", op, x, ns, w, b, res, gy, gsum, eps)
    exp, exp_s, exp_grads = run("reference", op, x, ns, w, b, res, gy, gsum, eps)

    assert out.dtype == dtype, f"output dtype {out.dtype} for a {dtype} input"
    assert_close(out, exp, dtype, "forward", "output")
    if res is not None:
        assert s.dtype == dtype
        assert_close(s, exp_s, dtype, "forward", "sum")
    assert_grads_close(GRAD_NAMES, grads, exp_grads, dtype, inputs=(x, w, b, res))


LONG_ROW = [
    ("layer_norm", "wb", "res-gsum", DTYPES_ALL[0]),
    ("layer_norm", "wb", "res-gsum", DTYPES_ALL[4]),
    ("layer_norm", "wb", "res-gsum", DTYPES_ALL[3]),
    ("layer_norm", "none", "nores", DTYPES_ALL[0]),
    ("rms_norm", "w", "res-gsum", DTYPES_ALL[0]),
    ("rms_norm", "w", "res-gsum", DTYPES_ALL[5]),
    ("rms_norm", "none", "nores", DTYPES_ALL[2]),
]


@pytest.mark.parametrize("op,affine,residual,dtypes", params_with_dtypes(LONG_ROW))
@pytest.mark.parametrize("device", DEVICES)
def test_long_row(device, op, affine, residual, dtypes):
    """D = 70000: many times the kernel's 2048-element segment (and not a multiple of it)."""
    dtype, pdtype = dtypes
    shape, ns = (2, 70000), (70000,)
    x, w, b, res, gy, gsum = row_norm_inputs(shape, ns, "contiguous", dtype, pdtype, device, op, affine, residual, seed=2)
    eps = default_eps(op)
    poison(device, x.numel() * 4)
    out, s, grads = run("torchnorm", op, x, ns, w, b, res, gy, gsum, eps)
    expected = [("reference", run("reference", op, x, ns, w, b, res, gy, gsum, eps))]
    if dtype == torch.float32:
        expected.append(("torch", run("torch", op, x, ns, w, b, res, gy, gsum, eps)))
    for who, (exp, exp_s, exp_grads) in expected:
        assert_close(out, exp, dtype, "forward", f"output vs {who}")
        if res is not None:
            assert_close(s, exp_s, dtype, "forward", f"sum vs {who}")
        for name, g, e in zip(GRAD_NAMES, grads, exp_grads):
            if e is not None:
                assert_close(g, e, dtype, "grad", f"{name} vs {who}")


@pytest.mark.parametrize(
    "op,shape,ns",
    [("layer_norm", (1500, 37), (37,)), ("rms_norm", (8000, 8), (8,)), ("layer_norm", (6000, 1, 9), (1, 9))],
    ids=["ln-1500x37", "rms-8000x8", "ln-6000x1x9"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_many_rows(device, op, shape, ns):
    """Enough rows for every parallel path, and the weight / bias gradients
    reduced across all of them."""
    affine = "wb" if op == "layer_norm" else "w"
    x, w, b, res, gy, gsum = row_norm_inputs(shape, ns, "contiguous", torch.float32, torch.float32, device, op, affine, "res-gsum", seed=19)
    poison(device, x.numel() * 4)
    out, s, grads = run("torchnorm", op, x, ns, w, b, res, gy, gsum, EPS)
    for who in ("torch", "reference"):
        exp, exp_s, exp_grads = run(who, op, x, ns, w, b, res, gy, gsum, EPS)
        assert_close(out, exp, torch.float32, "forward", f"output vs {who}")
        assert_close(s, exp_s, torch.float32, "forward", f"sum vs {who}")
        for name, g, e in zip(GRAD_NAMES, grads, exp_grads):
            if e is not None:
                assert_close(g, e, torch.float32, "grad", f"{name} vs {who}")


@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_default_eps_is_torchs(device, dtypes):
    """eps=None is what torch.nn.functional.rms_norm does: the machine epsilon of
    the computation dtype (float32's for float16 / bfloat16 / float32 inputs,
    float64's for float64), also with float32 weights; rows of small values so
    that eps matters (float16's own eps, 2**-10, would change them by ~50%)."""
    dtype, pdtype = dtypes
    x = make_input((3, 50), dtype, device, seed=5, scale=0.02, offset=False)
    w, _ = make_affine((50,), pdtype, device, seed=6, affine="w")
    out = tnf.rms_norm(x, (50,), w)
    eps = torch.finfo(accumulate_dtype(dtype)).eps
    assert_close(out, tnref.rms_norm(to64(x), (50,), to64(w), eps=eps), dtype, "forward", "eps=None vs reference")
    assert_close(out, tnref.rms_norm(x, (50,), w), dtype, "forward", "eps=None vs reference's default")
    if dtype == pdtype:
        assert_close(out, F.rms_norm(x, (50,), w), dtype, "forward", "eps=None vs torch")
    # and an explicit eps is used as given
    out = tnf.rms_norm(x, (50,), w, eps=0.5)
    assert_close(out, tnref.rms_norm(to64(x), (50,), to64(w), eps=0.5), dtype, "forward", "eps=0.5")


def test_reference_follows_torch():
    """The float64 references themselves, against torch in float64."""
    x = make_input((3, 4, 5), torch.float64, seed=20)
    res = make_input((3, 4, 5), torch.float64, seed=21, offset=False)
    w, b = make_affine((4, 5), torch.float64, seed=22)
    out, s = tnref.layer_norm(x, (4, 5), w, b, eps=1e-3, residual=res)
    assert_close(out, F.layer_norm(x + res, (4, 5), w, b, 1e-3), torch.float64, "forward", "reference layer_norm")
    assert_close(s, x + res, torch.float64, "forward", "reference sum")
    assert_close(tnref.layer_norm(x, [5]), F.layer_norm(x, [5]), torch.float64, "forward", "reference layer_norm, defaults")
    out, s = tnref.rms_norm(x, (5,), w[0], eps=1e-3, residual=res)
    assert_close(out, F.rms_norm(x + res, (5,), w[0], 1e-3), torch.float64, "forward", "reference rms_norm")
    assert_close(tnref.rms_norm(x, (4, 5)), F.rms_norm(x, (4, 5)), torch.float64, "forward", "reference rms_norm, defaults")


def test_reference_rms_norm_default_eps_follows_torch():
    """The reference itself: eps=None as torch computes it, for every dtype."""
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = make_input((3, 40), dtype, seed=8, scale=0.02, offset=False)
        exp = F.rms_norm(x, (40,))
        assert_close(tnref.rms_norm(x, (40,)), exp, dtype, "forward", f"reference eps=None, {dtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_functional_default_eps(device):
    x = make_input((4, 30), torch.float32, device, seed=7, scale=0.01)
    assert_close(tnf.layer_norm(x, (30,)), F.layer_norm(x, (30,)), torch.float32, "forward", "layer_norm default eps")
    assert_close(tnf.rms_norm(x, [30]), F.rms_norm(x, [30]), torch.float32, "forward", "rms_norm default eps")


@pytest.mark.parametrize("x_layout,res_layout", [("contiguous", "transposed"), ("transposed", "contiguous"), ("sliced", "transposed")])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("device", DEVICES)
def test_residual_in_another_layout(device, op, x_layout, res_layout):
    shape, ns = (3, 6, 10), (6, 10)
    affine = "wb" if op == "layer_norm" else "w"
    x, w, b, _, gy, gsum = row_norm_inputs(shape, ns, x_layout, torch.float32, torch.float32, device, op, affine, "res-gsum", seed=17)
    res = make_input(shape, torch.float32, device, res_layout, seed=18, scale=1.0, offset=False)
    out, s, grads = run("torchnorm", op, x, ns, w, b, res, gy, gsum, EPS)
    exp, exp_s, exp_grads = run("torch", op, x, ns, w, b, res, gy, gsum, EPS)
    assert_close(out, exp, torch.float32, "forward", "output")
    assert_close(s, exp_s, torch.float32, "forward", "sum")
    for name, g, e in zip(GRAD_NAMES, grads, exp_grads):
        if e is not None:
            assert_close(g, e, torch.float32, "grad", name)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_with_expanded_grad_output(device, op):
    """out.sum().backward() hands the backward a stride-0 grad_output (and grad_sum)."""
    shape, ns = (3, 4, 37), (37,)
    x, w, b, res, _, _ = row_norm_inputs(shape, ns, "contiguous", torch.float32, torch.float32, device, op, "wb", "res")
    tx, tw, tb, tres = (leaf(t) for t in (x, w, b, res))
    ex, ew, eb, eres = (leaf(t.clone()) if t is not None else None for t in (x, w, b, res))
    if op == "layer_norm":
        out, s = tnf.layer_norm(tx, ns, tw, tb, residual=tres)
        e_s = ex + eres
        exp = F.layer_norm(e_s, ns, ew, eb)
    else:
        out, s = tnf.rms_norm(tx, ns, tw, residual=tres)
        e_s = ex + eres
        exp = F.rms_norm(e_s, ns, ew)
    (out.sum() + 0.5 * s.sum()).backward()
    (exp.sum() + 0.5 * e_s.sum()).backward()
    for name, g, e in [("input", tx, ex), ("weight", tw, ew), ("bias", tb, eb), ("residual", tres, eres)]:
        if e is not None:
            assert_close(g.grad, e.grad, torch.float32, "grad", name)


# ---------------------------------------------------------------------------
# The ops themselves: saved statistics, the sum, layer_norm_backward.
# ---------------------------------------------------------------------------


def stats_shape(shape, ns):
    return tuple(shape[: len(shape) - len(ns)]) + (1,) * len(ns)


def check_sum(s, x, res, dtype):
    """The op's sum output: a (0,) tensor without a residual, else x + residual.
    Returns what was normalized, in float64: x, or the sum in the input's dtype."""
    if res is None:
        assert tuple(s.shape) == (0,), f"sum without a residual has shape {tuple(s.shape)}, expected (0,)"
        return to64(x)
    assert s.dtype == dtype and tuple(s.shape) == tuple(x.shape)
    assert_close(s, to64(x) + to64(res), dtype, "forward", "sum")
    return to64(x + res)


OP_CASES = [
    pytest.param((7, 13), (13,), "contiguous", id="D13"),
    pytest.param((2, 3, 5, 6), (5, 6), "transposed", id="D5x6-transposed"),
    pytest.param((3, 4100), (4100,), "contiguous", id="D4100"),
]


@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("shape,ns,layout", OP_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_op_layer_norm(device, shape, ns, layout, dtypes, with_residual):
    dtype, pdtype = dtypes
    x, w, b, res, _, _ = row_norm_inputs(shape, ns, layout, dtype, pdtype, device, "layer_norm", "wb", "res" if with_residual else "nores", seed=11)
    poison(device)
    out, s, mean, rstd = OPS.layer_norm(x, ns, w, b, 1e-3, res)
    acc = accumulate_dtype(dtype)
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert mean.dtype == acc and rstd.dtype == acc, (mean.dtype, rstd.dtype)
    assert tuple(mean.shape) == stats_shape(shape, ns), f"mean shape {tuple(mean.shape)}"
    assert tuple(rstd.shape) == stats_shape(shape, ns), f"rstd shape {tuple(rstd.shape)}"
    s64 = check_sum(s, x, res, dtype)
    dims = tuple(range(len(shape) - len(ns), len(shape)))
    assert_close(mean, s64.mean(dims, keepdim=True), acc, "stats", "saved mean")
    assert_close(rstd, (s64.var(dims, unbiased=False, keepdim=True) + 1e-3).rsqrt(), acc, "stats", "saved rstd")
    exp = tnref.layer_norm(s64, ns, to64(w), to64(b), eps=1e-3)
    assert_close(out, exp, dtype, "forward", "output")


@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("shape,ns,layout", OP_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_op_rms_norm(device, shape, ns, layout, dtypes, with_residual):
    dtype, pdtype = dtypes
    x, w, _, res, _, _ = row_norm_inputs(shape, ns, layout, dtype, pdtype, device, "rms_norm", "w", "res" if with_residual else "nores", seed=12)
    poison(device)
    out, s, rstd = OPS.rms_norm(x, ns, w, 1e-3, res)
    acc = accumulate_dtype(dtype)
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert rstd.dtype == acc, rstd.dtype
    # the shape layer_norm_backward takes (as layer_norm's)
    assert tuple(rstd.shape) == stats_shape(shape, ns), f"rstd shape {tuple(rstd.shape)}"
    s64 = check_sum(s, x, res, dtype)
    dims = tuple(range(len(shape) - len(ns), len(shape)))
    assert_close(rstd, ((s64 * s64).mean(dims, keepdim=True) + 1e-3).rsqrt(), acc, "stats", "saved rstd")
    assert_close(out, tnref.rms_norm(s64, ns, to64(w), eps=1e-3), dtype, "forward", "output")


@pytest.mark.parametrize("with_grad_sum", [False, True], ids=["no-gsum", "gsum"])
@pytest.mark.parametrize("mask", list(itertools.product([True, False], repeat=3)), ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("device", DEVICES)
def test_op_backward_output_mask(device, op, mask, with_grad_sum):
    """layer_norm_backward on the sum s (what was normalized): masked-out outputs
    are (0,) tensors; grad_input includes grad_sum; mean=None is RMSNorm."""
    shape, ns = (4, 3, 21), (3, 21)
    dtype = torch.float32
    affine = "wb" if op == "layer_norm" else "w"
    x, w, b, res, gy, gsum = row_norm_inputs(shape, ns, "contiguous", dtype, dtype, device, op, affine, "res-gsum", seed=13)
    if op == "layer_norm":
        _, s, mean, rstd = OPS.layer_norm(x, ns, w, b, EPS, res)
    else:
        _, s, rstd = OPS.rms_norm(x, ns, w, EPS, res)
        mean = None
    if op == "rms_norm" and mask[2]:
        mask = (mask[0], mask[1], False)  # no bias to differentiate
    poison(device)
    got = OPS.layer_norm_backward(gy, gsum if with_grad_sum else None, s, ns, mean, rstd, w, list(mask))
    assert len(got) == 3
    _, _, exp = run("reference", op, x, ns, w, b, res, gy, gsum if with_grad_sum else None, EPS)
    # the gradient of s is grad_residual (= grad_input of x)
    for name, m, g, e in zip(["grad_input (of the sum)", "grad_weight", "grad_bias"], mask, got, [exp[3], exp[1], exp[2]]):
        if m:
            assert_close(g, e, dtype, "grad", name)
        else:
            assert tuple(g.shape) == (0,), f"masked-out {name} has shape {tuple(g.shape)}, expected (0,)"


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("device", DEVICES)
def test_op_backward_dtypes(device, dtypes, op):
    dtype, pdtype = dtypes
    shape, ns = (5, 3, 77), (77,)
    affine = "wb" if op == "layer_norm" else "w"
    x, w, b, _, gy, gsum = row_norm_inputs(shape, ns, "contiguous", dtype, pdtype, device, op, affine, "res-gsum", seed=14)
    if op == "layer_norm":
        _, _, mean, rstd = OPS.layer_norm(x, ns, w, b, EPS, None)
        mask = [True] * 3
    else:
        _, _, rstd = OPS.rms_norm(x, ns, w, EPS, None)
        mean, mask = None, [True, True, False]
    got = OPS.layer_norm_backward(gy, gsum, x, ns, mean, rstd, w, mask)
    _, _, exp = run("reference", op, x, ns, w, b, None, gy, None, EPS)
    exp[0] = exp[0] + to64(gsum)
    for name, g, e, src in zip(GRAD_NAMES, got, exp, (x, w, b)):
        if e is None:
            continue
        assert g.dtype == src.dtype, f"{name} dtype {g.dtype}, expected {src.dtype}"
        assert_close(g, e, dtype, "grad", name)


# ---------------------------------------------------------------------------
# Empty batch, numerics.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("residual", ["nores", "res-gsum"])
@pytest.mark.parametrize("op,affine", [OP_AFFINE[0], OP_AFFINE[3]])
@pytest.mark.parametrize("shape,ns", [((0, 7), (7,)), ((0, 3, 5), (3, 5)), ((2, 0, 6), (6,))], ids=["0x7", "0x3x5", "2x0x6"])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device, shape, ns, op, affine, residual):
    dtype = torch.float32
    x, w, b, res, gy, gsum = row_norm_inputs(shape, ns, "contiguous", dtype, dtype, device, op, affine, residual)
    out, s, (gx, gw, gb, gres) = run("torchnorm", op, x, ns, w, b, res, gy, gsum, default_eps(op))
    assert tuple(out.shape) == shape and out.dtype == dtype
    assert tuple(gx.shape) == shape
    if res is not None:
        assert tuple(s.shape) == shape and tuple(gres.shape) == shape
    for name, g in (("grad_weight", gw), ("grad_bias", gb)):
        assert g is None or (tuple(g.shape) == tuple(ns) and torch.all(g == 0)), f"{name} of an empty batch: {g}"
    if op == "layer_norm":
        o, _, mean, rstd = OPS.layer_norm(x, ns, w, b, EPS, res)
        assert tuple(mean.shape) == stats_shape(shape, ns)
    else:
        o, _, rstd = OPS.rms_norm(x, ns, w, EPS, res)
    assert tuple(o.shape) == shape and tuple(rstd.shape) == stats_shape(shape, ns)


@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize(
    "dtype,D,mean,std",
    [(torch.float16, 1000, 1e4, 1.0), (torch.float16, 4099, 1e4, 1.0), (torch.float16, 777, -1e3, 1.0), (torch.float32, 5000, 1e4, 1.0)],
    ids=["f16-D1000", "f16-D4099", "f16-D777-neg", "f32-D5000"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_large_mean_variance(device, dtype, D, mean, std, with_residual):
    """A row with mean 1e4 and std ~1: the variance must come from the centred
    values (Welford / two-pass), never E[x^2] - E[x]^2."""
    shape = (3, D)
    x = randn(shape, 31, dtype, device, scale=std, offset=mean)
    res = randn(shape, 32, dtype, device, scale=0.5) if with_residual else None
    out, s, saved_mean, rstd = OPS.layer_norm(x, (D,), None, None, EPS, res)
    s64 = to64(x) if res is None else to64(s)
    var64 = s64.var(-1, unbiased=False, keepdim=True)
    var = 1.0 / rstd.double() ** 2 - EPS
    assert torch.isfinite(rstd).all() and (rstd > 0).all(), f"rstd {rstd}"
    torch.testing.assert_close(var.cpu(), var64, **LARGE_MEAN_VARIANCE)
    assert_close(saved_mean, s64.mean(-1, keepdim=True), torch.float32, "stats", "saved mean")
    if dtype == torch.float16:
        assert_close(out, tnref.layer_norm(s64, (D,), eps=EPS), dtype, "forward", "output")


# ---------------------------------------------------------------------------
# gradcheck (float64), torch.compile (opcheck: tests/test_opcheck.py).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("residual", ["nores", "res"])
@pytest.mark.parametrize("op,affine", OP_AFFINE)
@pytest.mark.parametrize("shape,ns", [((3, 5), (5,)), ((2, 3, 4), (3, 4)), ((4, 1), (1,))], ids=["D5", "D3x4", "D1"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_functional(device, shape, ns, op, affine, residual):
    x, w, b, res, _, _ = row_norm_inputs(shape, ns, "contiguous", torch.float64, torch.float64, device, op, affine, residual, seed=3)
    names = ["x", "w", "b", "res"]
    present = [(n, t) for n, t in zip(names, (x, w, b, res)) if t is not None]

    def fn(*args):
        kw = dict(zip([n for n, _ in present], args))
        if op == "layer_norm":
            return tnf.layer_norm(kw["x"], ns, kw.get("w"), kw.get("b"), eps=1e-3, residual=kw.get("res"))
        return tnf.rms_norm(kw["x"], ns, kw.get("w"), eps=1e-3, residual=kw.get("res"))

    args = [t.detach().requires_grad_() for _, t in present]
    assert torch.autograd.gradcheck(fn, args, **GRADCHECK)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_gradcheck_ops(op):
    """The registered autograd of the ops themselves (out and sum), on a transposed input."""
    shape, ns = (3, 4, 5), (4, 5)
    x, w, b, res, _, _ = row_norm_inputs(shape, ns, "transposed", torch.float64, torch.float64, "cpu", op, "wb", "res", seed=4)
    if op == "layer_norm":
        def fn(x, w, b, res):
            return OPS.layer_norm(x, ns, w, b, 1e-3, res)[:2]
        args = (x, w, b, res)
    else:
        def fn(x, w, res):
            return OPS.rms_norm(x, ns, w, 1e-3, res)[:2]
        args = (x, w, res)
    assert torch.autograd.gradcheck(fn, [t.detach().requires_grad_() for t in args], **GRADCHECK)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_torch_compile_fullgraph(op):
    torch._dynamo.reset()
    shape, ns = (3, 5, 24), (24,)
    x, w, b, res, gy, gsum = row_norm_inputs(shape, ns, "contiguous", torch.float32, torch.float32, "cpu", op, "wb", "res-gsum", seed=15)

    def fn(x, w, b, res):
        if op == "layer_norm":
            out, s = tnf.layer_norm(x, ns, w, b, eps=EPS, residual=res)
        else:
            out, s = tnf.rms_norm(x, ns, w, eps=EPS, residual=res)
        return out * 2.0, s

    compiled = torch.compile(fn, fullgraph=True)
    eager_args = [leaf(t.clone()) if t is not None else None for t in (x, w, b, res)]
    comp_args = [leaf(t.clone()) if t is not None else None for t in (x, w, b, res)]
    out, s = compiled(*comp_args)
    exp, exp_s = fn(*eager_args)
    assert_close(out, exp, torch.float32, "forward", "compiled output")
    assert_close(s, exp_s, torch.float32, "forward", "compiled sum")
    torch.autograd.backward([out, s], [gy, gsum])
    torch.autograd.backward([exp, exp_s], [gy, gsum])
    for name, a, e in zip(GRAD_NAMES, comp_args, eager_args):
        if e is not None:
            assert_close(a.grad, e.grad, torch.float32, "grad", f"compiled {name}")
    torch._dynamo.reset()


def test_ops_are_registered_by_import():
    for name in ("layer_norm", "rms_norm", "layer_norm_backward"):
        assert hasattr(torch.ops.torchnorm, name), name
