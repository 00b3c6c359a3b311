"""InstanceNorm: the torchnorm.instance_norm op and torchnorm.functional.instance_norm
(signature and running-statistics update of torch.nn.functional.instance_norm):
forward and gradients (input, weight, bias) against torch.nn.functional.instance_norm
(same dtype) and the float64 torchnorm.reference, over ranks 3..5, layouts,
odd and long instances, dtypes, affine variants, with and without running
statistics and with use_input_stats=False; running statistics over several
steps; the op's saved statistics; empty batches; float16 instances with mean
1e4; gradcheck and torch.compile.
(opcheck: tests/test_opcheck.py.)
"""
import pytest
import torch
import torch.nn.functional as F

import torchnorm  # noqa: F401  (registers the ops)
import torchnorm.functional as tnf
import torchnorm.reference as tnref
from conftest import (
    DEVICES,
    DTYPES_ALL,
    MODES,
    accumulate_dtype,
    apply_layout,
    assert_close,
    assert_grads_close,
    clone_opt,
    grads_of,
    instance_norm_inputs,
    leaf,
    make_input,
    make_params,
    poison,
    randn,
    to64,
)
from tolerances import GRADCHECK, LARGE_MEAN_VARIANCE

OPS = torch.ops.torchnorm
EPS = 1e-5
MOMENTUM = 0.1

CASES = [
    pytest.param((4, 3, 7), "contiguous", id="3d"),
    pytest.param((2, 5, 123), "contiguous", id="3d-L123"),
    pytest.param((5, 1, 6), "contiguous", id="3d-C1"),
    pytest.param((1, 4, 9), "contiguous", id="3d-batch1"),
    pytest.param((3, 2, 2), "contiguous", id="3d-L2"),
    pytest.param((4, 3, 7), "transposed", id="3d-transposed"),
    pytest.param((3, 4, 7, 5), "contiguous", id="4d"),
    pytest.param((3, 4, 7, 5), "channels_last", id="4d-cl"),
    pytest.param((3, 17, 5, 7), "transposed", id="4d-transposed"),
    pytest.param((2, 3, 5, 8), "sliced", id="4d-sliced"),
    pytest.param((2, 3, 3, 5, 4), "contiguous", id="5d"),
    pytest.param((2, 3, 3, 5, 4), "channels_last_3d", id="5d-cl3d"),
    pytest.param((2, 3, 61, 67), "contiguous", id="4d-long"),
    pytest.param((2, 3, 61, 67), "channels_last", id="4d-cl-long"),
]

REF_CASES = [
    pytest.param((4, 3, 7), "contiguous", id="3d"),
    pytest.param((5, 1, 6), "transposed", id="3d-C1-transposed"),
    pytest.param((3, 4, 7, 5), "channels_last", id="4d-cl"),
    pytest.param((2, 3, 5, 8), "sliced", id="4d-sliced"),
    pytest.param((2, 3, 3, 5, 4), "channels_last_3d", id="5d-cl3d"),
    pytest.param((2, 3, 61, 67), "channels_last", id="4d-cl-long"),
]

# (mode, affine): every affine variant when training with running statistics;
# weight and bias with the others, and eval without affine.
MODE_AFFINE = [
    pytest.param((True, True), "wb", id="train-track-weight-bias"),
    pytest.param((True, True), "w", id="train-track-weight"),
    pytest.param((True, True), "none", id="train-track-noaffine"),
    pytest.param((True, False), "wb", id="train-notrack-weight-bias"),
    pytest.param((False, True), "wb", id="eval-weight-bias"),
    pytest.param((False, True), "none", id="eval-noaffine"),
]

GRAD_NAMES = ["grad_input", "grad_weight", "grad_bias"]


def run(impl, x, rm, rv, w, b, use_input_stats, gy, momentum=MOMENTUM, eps=EPS):
    """(out, [grad_input, grad_weight, grad_bias]); rm / rv updated in place
    (float64 CPU tensors for the reference)."""
    if impl == "reference":
        x, w, b = (leaf(to64(t)) for t in (x, w, b))
        gy = to64(gy)
        out = tnref.instance_norm(x, rm, rv, w, b, use_input_stats, momentum, eps)
    else:
        x, w, b = (leaf(t) for t in (x, w, b))
        fn = tnf.instance_norm if impl == "torchnorm" else F.instance_norm
        out = fn(x, rm, rv, w, b, use_input_stats, momentum, eps)
    return out, grads_of([out], [x, w, b], [gy])


# ---------------------------------------------------------------------------
# Against torch.nn.functional (float32 / float64).
# ---------------------------------------------------------------------------


@pytest.mark.slow  # the whole matrix: `pytest -m "not slow"` leaves it out
@pytest.mark.parametrize("mode,affine", MODE_AFFINE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_functional_matches_torch(device, shape, layout, dtype, mode, affine):
    use_input_stats, track = mode
    x, w, b, rm, rv, gy = instance_norm_inputs(shape, layout, dtype, dtype, device, affine, track)
    x_before = x.clone()
    rm_t, rv_t = clone_opt(rm), clone_opt(rv)
    poison(device)
    out, grads = run("torchnorm", x, rm, rv, w, b, use_input_stats, gy)
    exp, exp_grads = run("torch", x, rm_t, rv_t, w, b, use_input_stats, gy)
    assert out.dtype == dtype and out.device == x.device and tuple(out.shape) == shape
    assert_close(out, exp, dtype, "forward", "output")
    assert_grads_close(GRAD_NAMES, grads, exp_grads, dtype)
    if track:
        assert_close(rm, rm_t, dtype, "stats", "running_mean")
        assert_close(rv, rv_t, dtype, "stats", "running_var")
    assert torch.equal(x, x_before), "the input was written"


# ---------------------------------------------------------------------------
# Every dtype against the float64 reference.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("affine", ["wb", "none"], ids=["weight-bias", "noaffine"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("shape,layout", REF_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_functional_matches_reference(device, shape, layout, dtypes, mode, affine):
    dtype, pdtype = dtypes
    use_input_stats, track = mode
    x, w, b, rm, rv, gy = instance_norm_inputs(shape, layout, dtype, pdtype, device, affine, track, seed=1)
    rm64, rv64 = to64(rm), to64(rv)
    poison(device)
    out, grads = run("torchnorm", x, rm, rv, w, b, use_input_stats, gy)
    exp, exp_grads = run("reference", x, rm64, rv64, w, b, use_input_stats, gy)
    assert out.dtype == dtype, f"output dtype {out.dtype} for a {dtype} input"
    assert_close(out, exp, dtype, "forward", "output")
    assert_grads_close(GRAD_NAMES, grads, exp_grads, dtype, inputs=(x, w, b))
    if track:
        assert rm.dtype == pdtype and rv.dtype == pdtype
        assert_close(rm, rm64, pdtype, "stats", "running_mean")
        assert_close(rv, rv64, pdtype, "stats", "running_var")


@pytest.mark.parametrize("dtypes", [DTYPES_ALL[0], DTYPES_ALL[4]])
@pytest.mark.parametrize("mode", [MODES[0], MODES[2]])
@pytest.mark.parametrize("shape,layout", [((1, 2, 70000), "contiguous"), ((1, 2, 200, 350), "channels_last")], ids=["3d-L70000", "4d-cl-70000"])
@pytest.mark.parametrize("device", DEVICES)
def test_long_instance(device, shape, layout, mode, dtypes):
    """Instances of 70000 elements: many times the kernel's 2048-element segment."""
    dtype, pdtype = dtypes
    use_input_stats, track = mode
    x, w, b, rm, rv, gy = instance_norm_inputs(shape, layout, dtype, pdtype, device, "wb", track, seed=2)
    rm64, rv64 = to64(rm), to64(rv)
    rm_t, rv_t = clone_opt(rm), clone_opt(rv)
    poison(device, x.numel() * 4)
    out, grads = run("torchnorm", x, rm, rv, w, b, use_input_stats, gy)
    expected = [("reference", run("reference", x, rm64, rv64, w, b, use_input_stats, gy), rm64, rv64)]
    if dtype == torch.float32:
        expected.append(("torch", run("torch", x, rm_t, rv_t, w, b, use_input_stats, gy), rm_t, rv_t))
    for who, (exp, exp_grads), erm, erv in expected:
        assert_close(out, exp, dtype, "forward", f"output vs {who}")
        for name, g, e in zip(GRAD_NAMES, grads, exp_grads):
            assert_close(g, e, dtype, "grad", f"{name} vs {who}")
        assert_close(rm, erm, pdtype, "stats", f"running_mean vs {who}")
        assert_close(rv, erv, pdtype, "stats", f"running_var vs {who}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_many_instances(device, layout):
    """Enough instances for every parallel path; weight / bias gradients and the
    running statistics reduced across all of them."""
    shape = (24, 32, 9, 7)
    x, w, b, rm, rv, gy = instance_norm_inputs(shape, layout, torch.float32, torch.float32, device, "wb", True, seed=4)
    rm_t, rv_t = rm.clone(), rv.clone()
    poison(device, x.numel() * 4)
    out, grads = run("torchnorm", x, rm, rv, w, b, True, gy)
    exp, exp_grads = run("torch", x, rm_t, rv_t, w, b, True, gy)
    ref, ref_grads = run("reference", x, None, None, w, b, True, gy)
    for who, e_out, e_grads in (("torch", exp, exp_grads), ("reference", ref, ref_grads)):
        assert_close(out, e_out, torch.float32, "forward", f"output vs {who}")
        for name, g, e in zip(GRAD_NAMES, grads, e_grads):
            assert_close(g, e, torch.float32, "grad", f"{name} vs {who}")
    assert_close(rm, rm_t, torch.float32, "stats", "running_mean")
    assert_close(rv, rv_t, torch.float32, "stats", "running_var")


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
        out = tnf.instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=momentum, eps=EPS)
        exp = F.instance_norm(x, rm_t, rv_t, w, b, True, momentum, EPS)
        assert_close(out, exp, torch.float32, "forward", f"output step {step}")
        assert_close(rm, rm_t, torch.float32, "stats", f"running_mean step {step}")
        assert_close(rv, rv_t, torch.float32, "stats", f"running_var step {step}")
    # then use_input_stats=False uses exactly these statistics and leaves them alone
    x = make_input(shape, torch.float32, device, layout, seed=99)
    rm_before, rv_before = rm.clone(), rv.clone()
    out = tnf.instance_norm(x, rm, rv, w, b, use_input_stats=False, eps=EPS)
    assert_close(out, F.instance_norm(x, rm_t, rv_t, w, b, False, momentum, EPS), torch.float32, "forward", "eval")
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before), "use_input_stats=False changed the running statistics"


@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize("device", DEVICES)
def test_running_stats_several_steps_vs_reference(device, dtypes):
    dtype, pdtype = dtypes
    shape = (4, 3, 5, 5)
    _, _, rm, rv = make_params(3, pdtype, device, seed=9)
    rm64, rv64 = to64(rm), to64(rv)
    for step in range(3):
        x = make_input(shape, dtype, device, "channels_last", seed=60 + step)
        tnf.instance_norm(x, rm, rv, momentum=0.2, eps=EPS)
        tnref.instance_norm(to64(x), rm64, rv64, momentum=0.2, eps=EPS)
        assert rm.dtype == pdtype and rv.dtype == pdtype
        assert_close(rm, rm64, pdtype, "stats", f"running_mean step {step}")
        assert_close(rv, rv64, pdtype, "stats", f"running_var step {step}")


def test_reference_follows_torch():
    """The reference itself: per-instance statistics, the running statistics'
    update (batch average of the unbiased per-instance variance), eval mode."""
    x = make_input((4, 3, 5, 2), torch.float64, seed=3)
    w, b, rm, rv = make_params(3, torch.float64, seed=4)
    rm_t, rv_t = rm.clone(), rv.clone()
    out = tnref.instance_norm(x, rm, rv, w, b, True, 0.3, 1e-3)
    assert_close(out, F.instance_norm(x, rm_t, rv_t, w, b, True, 0.3, 1e-3), torch.float64, "forward", "reference output")
    assert_close(rm, rm_t, torch.float64, "stats", "reference running_mean")
    assert_close(rv, rv_t, torch.float64, "stats", "reference running_var")
    out = tnref.instance_norm(x, rm, rv, None, None, False, eps=0.5)
    assert_close(out, F.instance_norm(x, rm_t, rv_t, None, None, False, eps=0.5), torch.float64, "forward", "reference eval")


@pytest.mark.parametrize("device", DEVICES)
def test_functional_defaults(device):
    x = make_input((3, 4, 6), torch.float32, device, seed=2)
    assert_close(tnf.instance_norm(x), F.instance_norm(x), torch.float32, "forward", "defaults")
    _, _, rm, rv = make_params(4, torch.float32, device, seed=3)
    rm_t, rv_t = rm.clone(), rv.clone()
    assert_close(tnf.instance_norm(x, rm, rv), F.instance_norm(x, rm_t, rv_t), torch.float32, "forward", "with stats")
    assert_close(rm, rm_t, torch.float32, "stats", "running_mean (default momentum)")
    assert_close(rv, rv_t, torch.float32, "stats", "running_var (default momentum)")


# ---------------------------------------------------------------------------
# The op: saved statistics and the running-statistics update.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("dtypes", DTYPES_ALL)
@pytest.mark.parametrize(
    "shape,layout",
    [((5, 3, 7), "contiguous"), ((3, 5, 4, 3), "channels_last"), ((2, 3, 2, 3, 5), "channels_last_3d"), ((2, 4, 3, 9), "transposed")],
    ids=["3d", "4d-cl", "5d-cl3d", "4d-transposed"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_op_instance_norm(device, shape, layout, dtypes, track):
    dtype, pdtype = dtypes
    x, w, b, rm, rv, _ = instance_norm_inputs(shape, layout, dtype, pdtype, device, "wb", track, seed=11)
    rm64, rv64 = to64(rm), to64(rv)
    poison(device)
    out, mean, rstd = OPS.instance_norm(x, w, b, rm, rv, 0.25, 1e-3)
    acc = accumulate_dtype(dtype)
    N, C = shape[:2]
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert mean.dtype == acc and rstd.dtype == acc, (mean.dtype, rstd.dtype)
    assert tuple(mean.shape) == (N, C) and tuple(rstd.shape) == (N, C), (tuple(mean.shape), tuple(rstd.shape))
    x64 = to64(x)
    dims = tuple(range(2, len(shape)))
    assert_close(mean, x64.mean(dims), acc, "stats", "saved mean")
    assert_close(rstd, (x64.var(dims, unbiased=False) + 1e-3).rsqrt(), acc, "stats", "saved rstd")
    exp = tnref.instance_norm(x64, rm64, rv64, to64(w), to64(b), True, 0.25, 1e-3)
    assert_close(out, exp, dtype, "forward", "output")
    if track:
        assert rm.dtype == pdtype and rv.dtype == pdtype
        assert_close(rm, rm64, pdtype, "stats", "running_mean")
        assert_close(rv, rv64, pdtype, "stats", "running_var")


# ---------------------------------------------------------------------------
# Empty batch, numerics.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape,layout",
    [((0, 3, 5), "contiguous"), ((0, 3, 4, 4), "contiguous"), ((0, 3, 4, 4), "channels_last"), ((0, 2, 2, 3, 3), "channels_last_3d")],
    ids=["3d", "4d", "4d-cl", "5d-cl3d"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device, shape, layout, mode):
    """An empty batch gives an empty output and leaves the running statistics
    alone (torch.nn.functional.instance_norm turns them into NaN: the mean of no
    instances)."""
    use_input_stats, track = mode
    x, w, b, rm, rv, gy = instance_norm_inputs(shape, layout, torch.float32, torch.float32, device, "wb", track)
    rm_before, rv_before = clone_opt(rm), clone_opt(rv)
    out, (gx, gw, gb) = run("torchnorm", x, rm, rv, w, b, use_input_stats, gy)
    assert tuple(out.shape) == shape and out.dtype == x.dtype
    assert tuple(gx.shape) == shape
    for name, g in (("grad_weight", gw), ("grad_bias", gb)):
        assert tuple(g.shape) == (shape[1],) and torch.all(g == 0), f"{name} of an empty batch: {g}"
    if track:
        assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before), "an empty batch changed the running statistics"
    if use_input_stats:
        o, mean, rstd = OPS.instance_norm(x, w, b, rm, rv, 0.1, EPS)
        assert tuple(o.shape) == shape and tuple(mean.shape) == (0, shape[1]) and tuple(rstd.shape) == (0, shape[1])
        if track:
            assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "dtype,mean,std",
    [(torch.float16, 1e4, 1.0), (torch.float16, 1e4, 8.0), (torch.float16, -1e3, 1.0), (torch.float32, 1e4, 1.0)],
)
@pytest.mark.parametrize("device", DEVICES)
def test_large_mean_variance(device, dtype, mean, std, layout):
    """float16 instances with mean 1e4 and std 1: the variance must come from
    the centred values (Welford / two-pass), never E[x^2] - E[x]^2."""
    shape = (4, 3, 32, 32)
    x = apply_layout(randn(shape, 31, dtype, "cpu", scale=std, offset=mean), layout).to(device)
    x64 = to64(x)
    dims = (2, 3)
    var64 = x64.var(dims, unbiased=False)
    _, _, rm, rv = make_params(3, torch.float32, device)
    rm64, rv64 = to64(rm), to64(rv)
    out, saved_mean, rstd = OPS.instance_norm(x, None, None, rm, rv, 0.1, EPS)
    var = 1.0 / rstd.double() ** 2 - EPS
    assert torch.isfinite(rstd).all() and (rstd > 0).all(), f"rstd {rstd}"
    torch.testing.assert_close(var.cpu(), var64, **LARGE_MEAN_VARIANCE)
    assert_close(saved_mean, x64.mean(dims), torch.float32, "stats", "saved mean")
    ref = tnref.instance_norm(x64, rm64, rv64, momentum=0.1, eps=EPS)
    if dtype == torch.float16:
        assert_close(out, ref, dtype, "forward", "output")
    assert_close(rm, rm64, torch.float32, "stats", "running_mean")
    assert_close(rv, rv64, torch.float32, "stats", "running_var")
    assert (rv > 0).all()


# ---------------------------------------------------------------------------
# gradcheck (float64), torch.compile (opcheck: tests/test_opcheck.py).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("affine", ["wb", "none"], ids=["weight-bias", "noaffine"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,layout", [((2, 3, 4), "contiguous"), ((2, 2, 2, 3), "channels_last")], ids=["3d", "4d-cl"])
def test_gradcheck_functional(shape, layout, mode, affine):
    use_input_stats, track = mode
    x, w, b, rm, rv, _ = instance_norm_inputs(shape, layout, torch.float64, torch.float64, "cpu", affine, track, seed=5)
    present = [(n, t) for n, t in zip(["x", "w", "b"], (x, w, b)) if t is not None]

    def fn(*args):
        kw = dict(zip([n for n, _ in present], args))
        # fresh copies of the running statistics: gradcheck calls fn many times
        return tnf.instance_norm(kw["x"], clone_opt(rm), clone_opt(rv), kw.get("w"), kw.get("b"), use_input_stats, 0.1, 1e-3)

    args = [t.detach().requires_grad_() for _, t in present]
    assert torch.autograd.gradcheck(fn, args, **GRADCHECK)


def test_gradcheck_op():
    """The registered autograd of the op itself (output 0), channels-last."""
    x, w, b, rm, rv, _ = instance_norm_inputs((2, 3, 2, 3), "channels_last", torch.float64, torch.float64, "cpu", "wb", True, seed=6)

    def fn(x, w, b):
        return OPS.instance_norm(x, w, b, rm.clone(), rv.clone(), 0.1, 1e-3)[0]

    assert torch.autograd.gradcheck(fn, [t.detach().requires_grad_() for t in (x, w, b)], **GRADCHECK)


def test_op_schema_declares_running_stats_mutable():
    schema = str(OPS.instance_norm.default._schema)
    assert "Tensor(a!)" in schema and "Tensor(b!)" in schema, f"running stats must be declared mutable: {schema}"


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b, rm, rv, gy = instance_norm_inputs((2, 3, 4, 5), "contiguous", torch.float32, torch.float32, "cpu", "wb", True, seed=16)
    rm_e, rv_e = rm.clone(), rv.clone()

    def fn(x, w, b, rm, rv):
        return tnf.instance_norm(x, rm, rv, w, b, True, 0.3, EPS) * 2.0

    compiled = torch.compile(fn, fullgraph=True)
    comp_args = [leaf(t.clone()) for t in (x, w, b)]
    eager_args = [leaf(t.clone()) for t in (x, w, b)]
    out = compiled(*comp_args, rm, rv)
    exp = fn(*eager_args, rm_e, rv_e)
    assert_close(out, exp, torch.float32, "forward", "compiled output")
    assert_close(rm, rm_e, torch.float32, "stats", "compiled running_mean")
    assert_close(rv, rv_e, torch.float32, "stats", "compiled running_var")
    out.backward(gy)
    exp.backward(gy)
    for name, a, e in zip(GRAD_NAMES, comp_args, eager_args):
        assert_close(a.grad, e.grad, torch.float32, "grad", f"compiled {name}")
    torch._dynamo.reset()
