"""Weight Normalization: the fused ops (torchnorm::weight_norm and its
backward) against the float64 reference, torchnorm.weight_norm against
torch.nn.utils.parametrizations.weight_norm (state_dicts both ways,
gradients, remove/cached), the data-dependent initialization, zero slices,
half weights, errors, torch.compile, and torchnorm.convert leaving it alone.
"""
import copy
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import torchnorm
from conftest import DEVICES, ERRORS, OTHER_DEVICE, assert_close, randn
from tolerances import GRADCHECK

OPS = torch.ops.torchnorm
EPS = torchnorm.functional.WEIGHT_NORM_EPS

# (shape, dim): every path of the CPU kernels. dim 0 of a 2-d weight: one
# contiguous run per slice, reduced and written by one task; (2, 70000):
# runs longer than a task's whole slice, reduced in pieces; None: one slice
# (whole, or in pieces past 65536 elements); dim 1 of (3, 5, 20): runs with
# several outer rows; the last dim and dim 1 of a 3x3 convolution: short
# runs, walked as rows (several row chunks for (200, 300)); 1-d dim 0: a
# slice per element; empty tensors.
CASES = [
    ((8, 5), 0), ((8, 5), 1), ((8, 5), None), ((8, 5), -2),
    ((6, 4, 3, 3), 0), ((6, 4, 3, 3), 1), ((6, 4, 3, 3), 2), ((6, 4, 3, 3), -1), ((6, 4, 3, 3), None),
    ((3, 5, 20), 1), ((200, 300), 1), ((2, 70000), 0), ((70000,), None), ((7,), 0),
    ((0, 3), 1), ((4, 0), 0), ((0, 3), None),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _id(case):
    shape, dim = case
    return "x".join(map(str, shape)) + f"-dim{dim}"


def g_shape(shape, dim):
    """g's shape as torch.norm_except_dim returns it."""
    if dim is None:
        return ()
    return tuple(n if k == dim % len(shape) else 1 for k, n in enumerate(shape))


def make_case(shape, dim, dtype, device, seed=0):
    v = randn(shape, seed, dtype, device)
    g = randn(g_shape(shape, dim), seed + 1, dtype, device, scale=0.5, offset=1.0)
    grad_w = randn(shape, seed + 2, dtype, device)
    return v, g, grad_w


def reference_norms(v, dim):
    v = v.double()
    if dim is None:
        return torch.linalg.vector_norm(v)
    if v.dim() == 1:
        return v.abs()
    return torch.linalg.vector_norm(v, dim=[k for k in range(v.dim()) if k != dim % v.dim()], keepdim=True)


# ---------------------------------------------------------------------------
# The ops against the float64 reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_op_matches_reference(case, dtype, device):
    shape, dim = case
    v, g, grad_w = make_case(shape, dim, dtype, device)
    v, g = v.requires_grad_(), g.requires_grad_()
    w, norms = OPS.weight_norm(v, g, dim, EPS)
    assert w.dtype == dtype and w.shape == v.shape and w.is_contiguous()
    # float16/bfloat16 weights keep float32 norms
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert norms.shape == g.shape
    gv, gg = torch.autograd.grad(w, (v, g), grad_w)

    v64, g64 = v.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    w64 = torchnorm.reference.weight_norm(v64, g64, dim, EPS)
    gv64, gg64 = torch.autograd.grad(w64, (v64, g64), grad_w.double())
    assert_close(w, w64, dtype, "forward", "w")
    assert_close(norms, reference_norms(v.detach(), dim), dtype if dtype == torch.float64 else torch.float32,
                 "stats", "norms")
    assert gv.dtype == dtype and gg.dtype == dtype and gg.shape == g.shape
    assert_close(gv, gv64, dtype, "grad", "grad_v")
    assert_close(gg, gg64, dtype, "grad", "grad_g")


@pytest.mark.parametrize("dim", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(None, marks=pytest.mark.slow)])
def test_large_outputs(dim):
    # Outputs of 16 MiB and more are written with streaming stores (on AVX2
    # builds): rows of 4097 floats start unaligned, and dim 0, dim 1 (short
    # runs) and None (one slice in pieces) each take another path.
    v, g, grad_w = make_case((1025, 4097), dim, torch.float32, "cpu", seed=11)
    assert v.numel() * 4 >= 16 << 20
    v, g = v.requires_grad_(), g.requires_grad_()
    w = torchnorm.functional.weight_norm(v, g, dim)
    gv, gg = torch.autograd.grad(w, (v, g), grad_w)
    v64, g64 = v.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    w64 = torchnorm.reference.weight_norm(v64, g64, dim)
    gv64, gg64 = torch.autograd.grad(w64, (v64, g64), grad_w.double())
    assert_close(w, w64, torch.float32, "forward", "w")
    assert_close(gv, gv64, torch.float32, "grad", "grad_v")
    assert_close(gg, gg64, torch.float32, "grad", "grad_g")


@pytest.mark.parametrize("dim", [0, 1, None])
def test_backward_output_mask(dim):
    v, g, grad_w = make_case((6, 5, 4), dim, torch.float32, "cpu")
    _, norms = OPS.weight_norm(v, g, dim, EPS)
    gv, gg = OPS.weight_norm_backward(grad_w, v, g, norms, dim, EPS, [True, True])
    only_g = OPS.weight_norm_backward(grad_w, v, g, norms, dim, EPS, [False, True])
    only_v = OPS.weight_norm_backward(grad_w, v, g, norms, dim, EPS, [True, False])
    assert only_g[0].shape == (0,) and torch.equal(only_g[1], gg)
    assert only_v[1].shape == (0,) and torch.equal(only_v[0], gv)


@pytest.mark.parametrize("dim", [0, 1, 2, None])
def test_gradcheck(dim):
    v, g, _ = make_case((4, 3, 5), dim, torch.float64, "cpu", seed=3)
    fn = lambda v, g: torchnorm.functional.weight_norm(v, g, dim)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (v.requires_grad_(), g.requires_grad_()), **GRADCHECK)


def test_functional_g_as_vector_and_negative_dim():
    # g may be (slices,); a negative dim counts from the end (the op's, not
    # torch._weight_norm's, convention).
    v, _, _ = make_case((5, 6, 7), 1, torch.float64, "cpu")
    g = randn((6,), 4, torch.float64)
    expected = torchnorm.reference.weight_norm(v, g, 1)
    assert_close(torchnorm.functional.weight_norm(v, g, -2), expected, torch.float64, "forward", "dim -2")
    assert_close(torchnorm.functional.weight_norm(v, g, 1), expected, torch.float64, "forward", "dim 1")


def test_non_contiguous_v():
    v, g, grad_w = make_case((6, 4, 3, 3), 0, torch.float32, "cpu")
    v_cl = v.to(memory_format=torch.channels_last).requires_grad_()
    w = torchnorm.functional.weight_norm(v_cl, g, 0)
    (gv,) = torch.autograd.grad(w, v_cl, grad_w)
    v64 = v.double().requires_grad_()
    w64 = torchnorm.reference.weight_norm(v64, g, 0)
    (gv64,) = torch.autograd.grad(w64, v64, grad_w.double())
    assert_close(w, w64, torch.float32, "forward", "w")
    assert_close(gv, gv64, torch.float32, "grad", "grad_v")


def test_same_bits_on_any_thread_count():
    # The kernels' partitions depend on the shapes only.
    threads = torch.get_num_threads()
    results = []
    for n in (1, max(2, threads)):
        torch.set_num_threads(n)
        try:
            for shape, dim in (((2, 70000), 0), ((200, 300), 1), ((70000,), None), ((64, 2304), 0)):
                v, g, grad_w = make_case(shape, dim, torch.float32, "cpu", seed=5)
                w, norms = OPS.weight_norm(v, g, dim, EPS)
                results.append((w, norms, *OPS.weight_norm_backward(grad_w, v, g, norms, dim, EPS, [True, True])))
        finally:
            torch.set_num_threads(threads)
    half = len(results) // 2
    for one, many in zip(results[:half], results[half:]):
        for a, b in zip(one, many):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# Zero slices and half weights
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [0, None])
def test_zero_slice_gives_zeros_and_finite_gradients(dim, device):
    v, g, grad_w = make_case((4, 6), dim, torch.float64, device)
    zero = slice(1, 2) if dim == 0 else slice(None)  # one row, or the whole tensor
    v[zero] = 0
    v, g = v.requires_grad_(), g.requires_grad_()
    w = torchnorm.functional.weight_norm(v, g, dim)
    gv, gg = torch.autograd.grad(w, (v, g), grad_w)
    for t in (w, gv, gg):
        assert torch.isfinite(t).all()
    assert (w[zero] == 0).all()
    # below eps the op is w = g * v / eps: grad_v = (g / eps) grad_w there,
    # grad_g = sum(grad_w * v) / eps = 0
    gz = g[zero].detach() if dim == 0 else g.detach()
    torch.testing.assert_close(gv[zero], gz / EPS * grad_w[zero], rtol=1e-12, atol=0)
    assert ((gg if dim is None else gg[zero]) == 0).all()
    # and it is the float64 reference's gradient (the clamp's)
    v64, g64 = v.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
    ref = torch.autograd.grad(torchnorm.reference.weight_norm(v64, g64, dim, EPS), (v64, g64), grad_w)
    torch.testing.assert_close(gv, ref[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(gg, ref[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights_accumulate_norms_in_float32(dtype):
    # sum(v^2) of a row is ~2.6e7, far past float16's largest value (65504):
    # a float16 accumulation would overflow to inf and give w = 0.
    v = torch.full((3, 400), 255.0, dtype=dtype)
    v[:, ::2] = -255.0
    g = torch.ones(3, 1, dtype=dtype)
    w, norms = OPS.weight_norm(v, g, 0, EPS)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, torch.full((3, 1), 255.0 * 20.0), rtol=1e-6, atol=0)
    assert_close(w, torchnorm.reference.weight_norm(v, g, 0), dtype, "forward", "w")
    # and through the parametrization, with half parameters
    m = torchnorm.weight_norm(nn.Linear(400, 3, bias=False).to(dtype))
    with torch.no_grad():
        m.parametrizations.weight.original1.copy_(v)
        m.parametrizations.weight.original0.fill_(1)
    assert m.parametrizations.weight.original0.dtype == dtype
    assert_close(m.weight, w, dtype, "forward", "parametrized weight")


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def _bad_calls():
    v, g, grad_w = make_case((4, 3), 0, torch.float32, "cpu")
    _, norms = OPS.weight_norm(v, g, 0, EPS)
    wn, bwd = OPS.weight_norm, OPS.weight_norm_backward
    return [
        ("dim out of range", lambda: wn(v, g, 2, EPS), r"expected dim in \[-2, 2\)"),
        ("dim on a 0-d v", lambda: wn(torch.tensor(2.0), torch.tensor(1.0), 0, EPS), "pass dim=None"),
        ("g of the wrong size", lambda: wn(v, torch.ones(3, 1), 0, EPS), "one value per slice"),
        ("g of the wrong shape", lambda: wn(v, torch.ones(1, 4), 0, EPS), r"with size 1 outside dim; got shape"),
        ("g of another dtype", lambda: wn(v, g.double(), 0, EPS), "expected g of dtype Float"),
        ("g on another device", lambda: wn(v, g.to(OTHER_DEVICE), 0, EPS), "expected g on cpu"),
        ("integer v", lambda: wn(v.long(), g.long(), 0, EPS), "expected v of dtype float32"),
        ("eps = 0", lambda: wn(v, g, 0, 0.0), "expected eps > 0"),
        ("grad_w of another shape", lambda: bwd(grad_w[:2], v, g, norms, 0, EPS, [True, True]),
         "expected grad_w of the input's shape"),
        ("norms of another dtype", lambda: bwd(grad_w, v, g, norms.double(), 0, EPS, [True, True]),
         "expected norms of dtype Float"),
        ("norms of another size", lambda: bwd(grad_w, v, g, norms[:2], 0, EPS, [True, True]),
         "expected norms to hold one value per slice"),
    ]


@pytest.mark.parametrize("name", [name for name, _, _ in _bad_calls()])
def test_bad_input_clear_error(name):
    _, fn, match = {n: (n, f, m) for n, f, m in _bad_calls()}[name]
    with pytest.raises(ERRORS, match=match):
        fn()


def test_parametrization_bad_dim():
    with pytest.raises(ValueError, match=r"dim must be None or in \[-2, 2\)"):
        torchnorm.weight_norm(nn.Linear(3, 4), dim=2)
    with pytest.raises(ValueError, match="has no tensor 'kernel'"):
        torchnorm.weight_norm(nn.Linear(3, 4), name="kernel")


# ---------------------------------------------------------------------------
# The parametrization against torch's
# ---------------------------------------------------------------------------

LAYERS = {
    "Linear": (lambda: nn.Linear(5, 7), (3, 5)),
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), (2, 3, 5, 5)),
}
DIMS = [0, 1, -1, None]


def _pair(layer, dim, seed=0):
    """(torch's weight-normalized layer, torchnorm's), the same weights."""
    torch.manual_seed(seed)
    base = LAYERS[layer][0]()
    theirs = torch_weight_norm(copy.deepcopy(base), dim=dim)
    ours = torchnorm.weight_norm(copy.deepcopy(base), dim=dim)
    return theirs, ours


def _perturbed(module, seed):
    """module with random g and v (so that loading a state_dict shows)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) + 0.5)
    return module


@pytest.mark.parametrize("dim", DIMS, ids=lambda d: f"dim{d}")
@pytest.mark.parametrize("layer", list(LAYERS))
def test_matches_torch_parametrization(layer, dim):
    theirs, ours = _pair(layer, dim)
    assert isinstance(ours.parametrizations.weight[0], torchnorm.nn.WeightNorm)
    sd_theirs, sd_ours = theirs.state_dict(), ours.state_dict()
    assert list(sd_theirs) == list(sd_ours)
    for key in sd_theirs:
        assert sd_theirs[key].shape == sd_ours[key].shape, key
        assert_close(sd_ours[key], sd_theirs[key], torch.float32, "forward", key)
    x = randn(LAYERS[layer][1], 7)
    y_theirs, y_ours = theirs(x), ours(x)
    assert_close(ours.weight, theirs.weight, torch.float32, "forward", "weight")
    assert_close(y_ours, y_theirs, torch.float32, "forward", "output")
    dy = randn(y_ours.shape, 8)
    grads_theirs = torch.autograd.grad(y_theirs, list(theirs.parameters()), dy)
    grads_ours = torch.autograd.grad(y_ours, list(ours.parameters()), dy)
    names = [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, grads_ours, grads_theirs):
        assert_close(a, b, torch.float32, "grad", name)


@pytest.mark.parametrize("dim", DIMS, ids=lambda d: f"dim{d}")
@pytest.mark.parametrize("layer", list(LAYERS))
def test_state_dicts_load_both_ways(layer, dim):
    theirs, ours = _pair(layer, dim)
    x = randn(LAYERS[layer][1], 9)
    # torch's -> ours
    _perturbed(theirs, 1)
    ours.load_state_dict(theirs.state_dict())
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(a, b), name
    assert_close(ours(x), theirs(x), torch.float32, "forward", "after loading torch's")
    # ours -> torch's
    _perturbed(ours, 2)
    theirs.load_state_dict(ours.state_dict())
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(a, b), name
    assert_close(theirs(x), ours(x), torch.float32, "forward", "after loading ours")


def test_conv_transpose_dims_as_torch():
    # A ConvTranspose's weight is (in, out / groups, k, k): dim 0, the
    # default, normalizes per input channel, dim 1 per output channel, as in torch.
    m = torchnorm.weight_norm(nn.ConvTranspose2d(3, 4, 3))
    assert m.parametrizations.weight.original0.shape == (3, 1, 1, 1)
    m = torchnorm.weight_norm(nn.ConvTranspose2d(3, 4, 3), dim=1)
    assert m.parametrizations.weight.original0.shape == (1, 4, 1, 1)


def test_old_weight_g_weight_v_state_dict_loads():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        old = _perturbed(torch.nn.utils.weight_norm(nn.Linear(5, 7)), 3)
    sd = old.state_dict()
    assert {"weight_g", "weight_v"} <= set(sd)
    ours = torchnorm.weight_norm(nn.Linear(5, 7))
    ours.load_state_dict(sd)
    assert torch.equal(ours.parametrizations.weight.original0, sd["weight_g"])
    assert torch.equal(ours.parametrizations.weight.original1, sd["weight_v"])
    x = randn((3, 5), 4)
    assert_close(ours(x), old(x), torch.float32, "forward", "output")


@pytest.mark.parametrize("dim", [0, None])
def test_remove_parametrizations(dim):
    m = _perturbed(torchnorm.weight_norm(nn.Conv2d(3, 4, 3), dim=dim), 5)
    w = m.weight.detach().clone()
    x = randn((2, 3, 5, 5), 6)
    y = m(x)
    parametrize.remove_parametrizations(m, "weight")
    assert not parametrize.is_parametrized(m)
    assert isinstance(m.weight, nn.Parameter) and torch.equal(m.weight, w)
    assert torch.equal(m(x), y)


def test_cached_computes_the_weight_once(monkeypatch):
    m = torchnorm.weight_norm(nn.Linear(5, 7))
    calls = []
    forward = torchnorm.nn.WeightNorm.forward
    monkeypatch.setattr(torchnorm.nn.WeightNorm, "forward", lambda self, g, v: calls.append(1) or forward(self, g, v))
    x = randn((3, 5), 1)
    with parametrize.cached():
        y1, y2 = m(x), m(x)
        assert m.weight is m.weight
    assert len(calls) == 1 and torch.equal(y1, y2)
    m(x)
    assert len(calls) == 2


def test_setting_the_weight_goes_through_right_inverse():
    m = torchnorm.weight_norm(nn.Linear(5, 7), dim=0)
    new = randn((7, 5), 2)
    with torch.no_grad():
        m.weight = new
    assert_close(m.weight, new, torch.float32, "forward", "weight")
    assert_close(m.parametrizations.weight.original0, new.norm(dim=1, keepdim=True), torch.float32, "forward", "g")


# ---------------------------------------------------------------------------
# torchnorm.convert and torch.compile
# ---------------------------------------------------------------------------


def test_convert_leaves_weight_norm_alone():
    torch.manual_seed(0)
    model = nn.Sequential(torchnorm.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), torchnorm.weight_norm(nn.Linear(4 * 4 * 4, 5), dim=None)).eval()
    parametrizations = [model[0].parametrizations.weight[0], model[4].parametrizations.weight[0]]
    params = list(model[0].parameters()) + list(model[4].parameters())
    x = randn((2, 3, 6, 6), 1)
    y = model(x)
    torchnorm.convert(model)
    assert isinstance(model[1], torchnorm.nn.BatchNorm2d)  # convert did run
    assert [model[0].parametrizations.weight[0], model[4].parametrizations.weight[0]] == parametrizations
    assert [p for p in list(model[0].parameters()) + list(model[4].parameters())] == params
    assert type(model[0]).__name__ == "ParametrizedConv2d" and type(model[4]).__name__ == "ParametrizedLinear"
    assert_close(model(x), y, torch.float32, "forward", "output after convert")


@pytest.mark.slow
def test_compile_fullgraph():
    torch.manual_seed(0)
    model = nn.Sequential(torchnorm.weight_norm(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.Flatten(),
                          torchnorm.weight_norm(nn.Linear(8 * 4 * 4, 5), dim=None))
    x = randn((2, 3, 6, 6), 1)
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    start = time.perf_counter()
    compiled = torch.compile(model, fullgraph=True)
    y_c = compiled(x)
    grads_c = torch.autograd.grad(y_c.square().sum(), list(model.parameters()))
    assert_close(y_c, y, torch.float32, "forward", "compiled output")
    for a, b in zip(grads_c, grads):
        assert_close(a, b, torch.float32, "grad", "compiled grad")
    print(f"compile + first call: {time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------------------
# Data-dependent initialization
# ---------------------------------------------------------------------------

INIT_LAYERS = {
    "Linear": (lambda bias: nn.Linear(6, 5, bias=bias), 0, (64, 6), -1),
    "Conv2d": (lambda bias: nn.Conv2d(3, 4, 3, bias=bias), 0, (8, 3, 7, 7), 1),
    "ConvTranspose2d": (lambda bias: nn.ConvTranspose2d(3, 4, 3, bias=bias), 1, (8, 3, 5, 5), 1),
}


def _pre_activation_stats(y, unit_dim):
    units = y.detach().movedim(unit_dim, -1).reshape(-1, y.shape[unit_dim]).double()
    return units.mean(0), units.std(0, correction=0)


@pytest.mark.parametrize("wrap", ["torchnorm", "torch"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layer", list(INIT_LAYERS))
def test_data_dependent_init(layer, bias, wrap):
    make, dim, shape, unit_dim = INIT_LAYERS[layer]
    torch.manual_seed(0)
    apply = torchnorm.weight_norm if wrap == "torchnorm" else torch_weight_norm
    m = apply(make(bias), dim=dim)
    x = randn(shape, 2, scale=2.0, offset=0.7)
    v = m.parametrizations.weight.original1.detach().clone()
    out = torchnorm.weight_norm_init_(m, x)
    assert torch.equal(out, m(x))
    # t = (v . x) / ||v|| per output unit, in float64: g = 1 / std(t), b = -mean(t) / std(t)
    v_unit = (v.double() / reference_norms(v, dim))
    conv = {"Linear": F.linear, "Conv2d": F.conv2d, "ConvTranspose2d": F.conv_transpose2d}[layer]
    t_mean, t_std = _pre_activation_stats(conv(x.double(), v_unit), unit_dim)
    g = m.parametrizations.weight.original0
    assert_close(g.flatten(), 1 / t_std, torch.float32, "stats", "g")
    mean, std = _pre_activation_stats(out, unit_dim)
    torch.testing.assert_close(std, torch.ones_like(std), rtol=1e-5, atol=0)
    if bias:
        assert_close(m.bias, -t_mean / t_std, torch.float32, "stats", "bias")
        torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-5)
    else:  # no parameter can shift the mean: it stays mean(t) / std(t)
        assert_close(mean, t_mean / t_std, torch.float32, "stats", "mean without bias")


def test_data_dependent_init_errors_leave_the_module_untouched():
    m = torchnorm.weight_norm(nn.Linear(6, 5))
    before = {k: t.clone() for k, t in m.state_dict().items()}
    with pytest.raises(ValueError, match="fewer than two pre-activations"):
        torchnorm.weight_norm_init_(m, randn((1, 6), 1))
    # identical samples: a constant t per unit, its std zero or of float32's rounding
    with pytest.raises(ValueError, match=r"units \[0, 1, 2, 3, 4\] are constant over the batch"):
        torchnorm.weight_norm_init_(m, randn((1, 6), 1).expand(4, 6))
    with pytest.raises(ValueError, match=r"units \[0, 1, 2, 3, 4\] are constant over the batch \(standard "
                                         r"deviation 0,"):
        torchnorm.weight_norm_init_(m, torch.zeros(4, 6))
    for k, t in m.state_dict().items():
        assert torch.equal(t, before[k]), k
    with pytest.raises(ValueError, match="is not weight-normalized"):
        torchnorm.weight_norm_init_(nn.Linear(6, 5), randn((4, 6), 1))
    with pytest.raises(ValueError, match="normalized along the whole tensor"):
        torchnorm.weight_norm_init_(torchnorm.weight_norm(nn.Linear(6, 5), dim=None), randn((4, 6), 1))
    with pytest.raises(ValueError, match=r"output units, dim 1"):
        torchnorm.weight_norm_init_(torchnorm.weight_norm(nn.ConvTranspose2d(3, 4, 3)), randn((2, 3, 4, 4), 1))
    with pytest.raises(ValueError, match="grouped ConvTranspose"):
        torchnorm.weight_norm_init_(torchnorm.weight_norm(nn.ConvTranspose2d(4, 4, 3, groups=2), dim=1),
                                    randn((2, 4, 4, 4), 1))
    with pytest.raises(TypeError, match="expected a weight-normalized Linear"):
        torchnorm.weight_norm_init_(torchnorm.weight_norm(nn.Bilinear(3, 3, 2)), randn((2, 3), 1))
