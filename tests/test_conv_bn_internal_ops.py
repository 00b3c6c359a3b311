"""conv_bn_frozen's internal per-channel ops (csrc/registration.cpp):
torchnorm::_frozen_bn_affine, _frozen_bn_parameter_grads,
_conv_weight_channel_dot and _conv_weight_channel_scale.

* Each against a float64 composition of torch ops: every dtype of the
  per-channel vectors (mixed ones too), absent and non-contiguous vectors,
  conv, grouped transposed conv and Linear weights in the layouts the loops
  walk and in those they leave to ATen ops (channels-last transposed weights,
  g and w laid out differently, float16).
* Bad arguments are refused alike by the kernels and the fake kernels.
* (Their opcheck samples are conv_bn_internal_samples in tests/op_samples.py,
  built from this file's helpers and run by tests/test_opcheck.py.)
* conv_bn_frozen reaches the ops through the dispatcher (the profiler sees them).
"""
import functools

import pytest
import torch

import torchnorm  # noqa: F401  (registers the ops)
from conftest import DEVICES, generator, randn

OPS = torch.ops.torchnorm
EPS = 1e-5
f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def _vector(channels, seed, dtype, device="cpu", offset=0.0, positive=False, strided=False):
    """A per-channel vector; `strided`: every other entry of a longer buffer."""
    if positive:
        t = torch.rand(channels, generator=generator(seed), dtype=f64) + 0.5
    else:
        t = torch.randn(channels, generator=generator(seed), dtype=f64) * 0.5 + offset
    t = t.to(dtype).to(device)
    if strided:
        big = torch.full((2 * channels,), float("nan"), dtype=dtype, device=device)
        big[::2] = t
        t = big[::2]
        assert not t.is_contiguous() or channels <= 1
    return t


def _promoted(*tensors):
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors if t is not None))


def _d(t, absent=0.0):
    """A vector in float64 on the CPU, `absent` for None."""
    return absent if t is None else t.detach().cpu().double()


def _assert_rounded(got, want64, dtype):
    """got is the float64 result rounded to dtype, up to one rounding of
    dtype: the kernels evaluate the same float64 formula, but the compilers
    (GCC for the CPU loops, nvcc) may fuse its multiply-adds, which moves a
    float64 result by an ulp and so, rarely, its rounding to dtype."""
    assert got.dtype == dtype and got.shape == want64.shape
    want = want64.to(dtype)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.cpu(), want, rtol=eps, atol=eps * want64.abs().max().item())


# ---------------------------------------------------------- _frozen_bn_affine --

def _affine64(conv_bias, bn_weight, bn_bias, mean, var, eps):
    inv_std = 1 / torch.sqrt(_d(var) + eps)
    scale = _d(bn_weight, 1.0) * inv_std
    shift = (_d(conv_bias) - _d(mean)) * scale + _d(bn_bias)
    return scale, shift, inv_std


# (id, dtypes of (conv_bias, bn_weight, bn_bias, mean, var); None: absent)
AFFINE_CASES = [
    ("f32", (f32, f32, f32, f32, f32)),
    ("f64", (f64, f64, f64, f64, f64)),
    ("f16", (f16, f16, f16, f16, f16)),
    ("bf16", (bf16, bf16, bf16, bf16, bf16)),
    ("f32-no-conv-bias", (None, f32, f32, f32, f32)),
    ("f64-no-bn-affine", (f64, None, None, f64, f64)),
    ("f32-stats-only", (None, None, None, f32, f32)),
    ("f16-conv-bias-f32-bn", (f16, f32, f32, f32, f32)),
    ("bf16-bn-weight-f16-bias", (None, bf16, f16, f16, f16)),
    ("f32-f64-stats", (f32, f32, f32, f64, f64)),
]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("case", AFFINE_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("device", DEVICES)
def test_frozen_bn_affine_matches_float64(device, case, strided):
    _, dtypes = case
    channels = 37
    seeds_offsets = [(1, 0.2, False), (2, 1.0, False), (3, 0.25, False), (4, 0.1, False), (5, 0.0, True)]
    conv_bias, bn_weight, bn_bias, mean, var = (
        None if dtype is None else _vector(channels, seed, dtype, device, offset, positive, strided)
        for dtype, (seed, offset, positive) in zip(dtypes, seeds_offsets))
    scale, shift, inv_std = OPS._frozen_bn_affine(conv_bias, bn_weight, bn_bias, mean, var, EPS)
    dtype = _promoted(conv_bias, bn_weight, bn_bias, mean, var)
    for got, want in zip((scale, shift, inv_std), _affine64(conv_bias, bn_weight, bn_bias, mean, var, EPS)):
        assert got.device == mean.device and got.is_contiguous()
        _assert_rounded(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_bn_affine_no_channels(device):
    empty = torch.empty(0, device=device)
    outputs = OPS._frozen_bn_affine(empty, empty, empty, empty, empty, EPS)
    assert [tuple(t.shape) for t in outputs] == [(0,)] * 3


# ------------------------------------------------- _frozen_bn_parameter_grads --

def _parameter_grads64(grad_shift, grad_scale, scale, inv_std, conv_bias, mean):
    grad_conv_bias = _d(grad_shift) * _d(scale)
    grad_bn_weight = (_d(grad_scale) + _d(grad_shift) * (_d(conv_bias) - _d(mean))) * _d(inv_std)
    return grad_conv_bias, grad_bn_weight


# (id, dtype of the vectors, dtype of conv_bias (None: absent), strided)
GRADS_CASES = [
    ("f32", f32, f32, False),
    ("f64-no-conv-bias", f64, None, False),
    ("f16", f16, f16, False),
    ("bf16-strided", bf16, bf16, True),
    ("f32-f16-conv-bias", f32, f16, False),
    ("f64-strided", f64, f64, True),
]


@pytest.mark.parametrize("mask", [(True, True), (True, False), (False, True)], ids=["both", "conv-bias", "bn-weight"])
@pytest.mark.parametrize("case", GRADS_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("device", DEVICES)
def test_frozen_bn_parameter_grads_matches_float64(device, case, mask):
    _, dtype, bias_dtype, strided = case
    channels = 29
    grad_shift, grad_scale, scale, mean = (_vector(channels, seed, dtype, device, 0.1, strided=strided)
                                           for seed in (11, 12, 13, 14))
    inv_std = _vector(channels, 15, dtype, device, positive=True, strided=strided)
    conv_bias = None if bias_dtype is None else _vector(channels, 16, bias_dtype, device, 0.3, strided=strided)
    grad_conv_bias, grad_bn_weight = OPS._frozen_bn_parameter_grads(
        grad_shift, grad_scale if mask[1] else None, scale, inv_std, conv_bias, mean, list(mask))
    out_dtype = _promoted(grad_shift, grad_scale if mask[1] else None, scale, inv_std, conv_bias, mean)
    want_conv_bias, want_bn_weight = _parameter_grads64(grad_shift, grad_scale, scale, inv_std, conv_bias, mean)
    for wanted, got, want in ((mask[0], grad_conv_bias, want_conv_bias), (mask[1], grad_bn_weight, want_bn_weight)):
        if wanted:
            _assert_rounded(got, want, out_dtype)
        else:
            assert got.shape == (0,) and got.device == mean.device


# ---------------------------------- _conv_weight_channel_dot / _channel_scale --

# (id, weight shape, groups, transposed, layout of w, layout of g, dtype).
# "cl": channels-last. The loops walk conv weights in any dense layout and
# contiguous transposed ones, with g laid out as w, in float and double; the
# other cases take ATen ops.
WEIGHT_CASES = [
    ("conv2d", (6, 4, 3, 3), 1, False, "contiguous", "contiguous", f32),
    ("conv2d-groups-f64", (6, 2, 3, 3), 3, False, "contiguous", "contiguous", f64),
    ("conv2d-cl", (8, 3, 3, 2), 1, False, "cl", "cl", f32),
    ("conv1d-long-block", (3, 5, 7), 1, False, "contiguous", "contiguous", f64),
    ("conv3d", (4, 2, 2, 3, 2), 2, False, "contiguous", "contiguous", f32),
    ("linear", (7, 5), 1, False, "contiguous", "contiguous", f64),
    ("convT2d-groups", (6, 3, 3, 3), 3, True, "contiguous", "contiguous", f32),
    ("convT1d-f64", (4, 5, 3), 2, True, "contiguous", "contiguous", f64),
    ("convT2d-cl", (4, 6, 3, 2), 2, True, "cl", "cl", f32),
    ("conv2d-mixed-layouts", (6, 4, 3, 3), 1, False, "contiguous", "cl", f32),
    ("convT2d-mixed-layouts", (6, 3, 3, 3), 3, True, "cl", "contiguous", f64),
    ("conv2d-f16", (6, 4, 3, 3), 2, False, "contiguous", "contiguous", f16),
    ("convT3d-bf16", (4, 3, 2, 2, 2), 2, True, "contiguous", "contiguous", bf16),
]

# Accumulated in float (float, float16, bfloat16: the float16 and bfloat16
# sums are rounded to their dtype at the end) or double, in another order
# than the float64 reference.
DOT_RTOL = {f64: 1e-12, f32: 1e-5, f16: 2e-3, bf16: 1.6e-2}


def _layout(t, layout):
    if layout == "contiguous":
        return t.contiguous()
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[t.dim()]
    return t.contiguous(memory_format=fmt)


def _weight(case, seed, device):
    _, shape, groups, transposed, w_layout, g_layout, dtype = case
    w = _layout(randn(shape, seed, dtype, device), w_layout if len(shape) >= 4 else "contiguous")
    g = _layout(randn(shape, seed + 1, dtype, device), g_layout if len(shape) >= 4 else "contiguous")
    return w, g, groups, transposed


def _channel_slices(shape, groups, transposed):
    """Per output channel, the index of its entries in a weight: written out
    from nn.ConvTranspose's layout, not from the ops' own view."""
    if not transposed:
        return [(c,) for c in range(shape[0])]
    rows, outs = shape[0] // groups, shape[1]
    return [(slice(gi * rows, (gi + 1) * rows), o) for gi in range(groups) for o in range(outs)]


@pytest.mark.parametrize("with_scale", [False, True], ids=["dot", "dot-and-scale"])
@pytest.mark.parametrize("case", WEIGHT_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("device", DEVICES)
def test_conv_weight_channel_dot_matches_float64(device, case, with_scale):
    w, g, groups, transposed = _weight(case, 21, device)
    dtype = w.dtype
    slices = _channel_slices(w.shape, groups, transposed)
    scale = _vector(len(slices), 23, dtype, device, offset=1.0) if with_scale else None
    g_before, w_before = g.clone(), w.clone()
    dot = OPS._conv_weight_channel_dot(g, w, scale, groups, transposed)
    g64, w64 = g_before.cpu().double(), w.cpu().double()
    want = torch.stack([(g64[s] * w64[s]).sum() for s in slices])
    assert dot.dtype == dtype and dot.device == w.device
    torch.testing.assert_close(dot.cpu().double(), want, rtol=DOT_RTOL[dtype], atol=DOT_RTOL[dtype] * want.abs().max())
    assert torch.equal(w, w_before)
    if not with_scale:
        assert torch.equal(g, g_before)
        return
    # g *= scale in g's dtype: each product of two values of a float type
    # is rounded once, so it equals the float64 product rounded.
    want_g = g64.clone()
    for c, s in enumerate(slices):
        want_g[s] = g64[s] * scale[c].double().cpu()
    assert g.stride() == g_before.stride()
    if dtype in (f32, f64):
        assert torch.equal(g.cpu(), want_g.to(dtype))
    else:  # ATen's mixed-precision multiply may round twice
        torch.testing.assert_close(g.cpu(), want_g.to(dtype), rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("device", DEVICES)
def test_conv_weight_channel_scale_matches_float64(device, case):
    w, _, groups, transposed = _weight(case, 31, device)
    slices = _channel_slices(w.shape, groups, transposed)
    scale = _vector(len(slices), 33, w.dtype, device, offset=1.0)
    got = OPS._conv_weight_channel_scale(w, scale, groups, transposed)
    want = w.cpu().double().clone()
    for c, s in enumerate(slices):
        want[s] = want[s] * scale[c].double().cpu()
    assert got.dtype == w.dtype and got.stride() == w.stride()
    assert torch.equal(got.cpu(), want.to(w.dtype))
    # A float64 scale promotes a float32 weight (what fold_parameters relies on).
    if w.dtype == f32:
        got64 = OPS._conv_weight_channel_scale(w.double(), scale.double(), groups, transposed)
        assert got64.dtype == f64 and torch.equal(got64.cpu(), want)


# -------------------------------------------------------------- bad arguments --

def _bad_call(which):
    """(op, args, message) of a call every kernel must refuse."""
    c = 4
    mean, var, vec = torch.randn(c), torch.rand(c) + 0.5, torch.randn(c)
    w, g = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3)
    return {
        "affine-stats-rank": (OPS._frozen_bn_affine, (None, None, None, mean.view(2, 2), var, EPS),
                              "running_mean to have one entry per channel"),
        "affine-bn-weight-length": (OPS._frozen_bn_affine, (None, torch.randn(c + 1), None, mean, var, EPS),
                                    "bn_weight to have one entry per channel"),
        "affine-integer-bias": (OPS._frozen_bn_affine, (None, None, torch.ones(c, dtype=torch.int64), mean, var, EPS),
                                "floating-point bn_bias"),
        "grads-no-grad-scale": (OPS._frozen_bn_parameter_grads, (vec, None, vec, vec, None, mean, [True, True]),
                                "grad_scale is needed"),
        "grads-conv-bias-length": (OPS._frozen_bn_parameter_grads,
                                   (vec, vec, vec, vec, torch.randn(c - 1), mean, [True, True]),
                                   "conv_bias to have one entry per channel"),
        "dot-shape": (OPS._conv_weight_channel_dot, (torch.randn(6, 4, 3, 2), w, None, 1, False),
                      "grad_weight of the weight's shape"),
        "dot-scale-length": (OPS._conv_weight_channel_dot, (g, w, torch.randn(5), 1, False),
                             "scale to have one entry per output channel"),
        "dot-groups": (OPS._conv_weight_channel_dot, (g, w, None, 4, True), "groups"),
        "scale-weight-rank": (OPS._conv_weight_channel_scale, (torch.randn(6), torch.randn(6), 1, False),
                              "2 or more dimensions"),
        "scale-transposed-length": (OPS._conv_weight_channel_scale, (w, torch.randn(6), 2, True),
                                    "scale to have one entry per output channel"),
    }[which]


BAD_CALLS = ["affine-stats-rank", "affine-bn-weight-length", "affine-integer-bias", "grads-no-grad-scale",
             "grads-conv-bias-length", "dot-shape", "dot-scale-length", "dot-groups", "scale-weight-rank",
             "scale-transposed-length"]


@pytest.mark.parametrize("which", BAD_CALLS)
def test_internal_ops_reject_bad_arguments(which):
    op, args, message = _bad_call(which)
    with pytest.raises(RuntimeError, match=message):
        op(*args)


@pytest.mark.parametrize("which", BAD_CALLS)
def test_internal_ops_fake_reject_bad_arguments(which):
    from torch._subclasses.fake_tensor import FakeTensorMode
    op, args, message = _bad_call(which)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError, match=message):
            op(*args)


def test_internal_ops_reject_vectors_on_another_device():
    """A meta tensor sends the call to the fake kernel, which refuses it as
    the kernels refuse a CPU vector next to CUDA ones."""
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    with pytest.raises(RuntimeError, match="expected running_var on meta"):
        OPS._frozen_bn_affine(None, None, None, mean.to("meta"), var, EPS)


# ------------------------------------------------------------- the composite --

@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_conv_bn_frozen_calls_the_internal_ops(transposed):
    """conv_bn_frozen and its backward reach the per-channel kernels through
    the dispatcher (a CPU-only build included): the profiler records each
    internal op by name."""
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3) if transposed else torch.randn(3, 4, 3, 3)
    w.requires_grad_()
    b, bn_w, bn_b, mean = (torch.randn(3, requires_grad=i < 3) for i in range(4))
    var = torch.rand(3) + 0.5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = OPS.conv_bn_frozen(x, w, b, bn_w, bn_b, mean, var, EPS, [1, 1], [1, 1], [1, 1], 1, transposed, [])
        out.sum().backward()
    names = {e.name for e in prof.events()}
    assert {"torchnorm::_frozen_bn_affine", "torchnorm::_frozen_bn_parameter_grads",
            "torchnorm::_conv_weight_channel_dot"} <= names, sorted(n for n in names if "torchnorm" in n)
