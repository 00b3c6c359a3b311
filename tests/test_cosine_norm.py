"""Cosine Normalization (torchnorm::cosine_linear, torchnorm::cosine_conv2d,
CosineLinear, CosineConv2d) against the float64 compositions of torch ops in
torchnorm.reference (patch norms by a convolution of x^2 with ones): outputs
and every gradient, on padding borders, groups, strides and dilations;
gradcheck; |y| <= 1; all-zero patches, inputs and weight rows (the
documented eps: finite, output 0); bad input; the modules; torch.compile.
Tolerances from tests/tolerances.py."""
import pytest
import torch

import torchnorm
from conftest import DEVICES, assert_close, expect_error, generator, make_input
from tolerances import GRADCHECK
from torchnorm import reference

OPS = torch.ops.torchnorm
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32"),
          pytest.param(torch.bfloat16, id="bf16")]
EPS = 1e-8

# (input shape, out_features)
LINEAR_CASES = [
    pytest.param((6, 5), 4, id="6x5-4"),
    pytest.param((2, 3, 5), 4, id="2x3x5-4"),
    pytest.param((70, 33), 9, id="70x33-9"),  # three row blocks of the sums, vector tails
    pytest.param((3, 2050), 5, id="3x2050-5"),  # input rows longer than a staged segment
    pytest.param((3, 7), 2050, id="3x7-2050"),  # output rows longer than a staged segment
]

# id: (input shape, out_channels, kernel_size, stride, padding, dilation, groups)
CONV_CASES = {
    "3x3-pad1": ((2, 3, 6, 7), 4, 3, 1, 1, 1, 1),
    "stride2": ((2, 3, 7, 7), 4, 3, 2, 0, 1, 1),
    "dilation2-pad2": ((2, 3, 8, 9), 4, 3, 1, 2, 2, 1),
    "groups2": ((2, 4, 6, 6), 6, 3, 1, 1, 1, 2),
    "depthwise-stride2": ((2, 4, 5, 6), 4, 3, 2, 1, 1, 4),
    "rect-kernel": ((2, 3, 9, 20), 5, (3, 1), (2, 1), (1, 0), 1, 1),
    # padding 3 around a 3x3 kernel: the border patches are all padding (all-zero patches)
    "padding-only-patches": ((1, 2, 4, 4), 3, 3, 1, 3, 1, 1),
    "1x1-kernel": ((2, 5, 4, 4), 3, 1, 1, 0, 1, 1),
    "1x1-input": ((3, 4, 1, 1), 2, 1, 1, 0, 1, 2),  # one position per sample, grouped
    "large-plane": ((1, 2, 50, 50), 3, 3, 1, 1, 1, 1),  # a plane longer than a staged segment
}


def conv_params(case):
    shape, out, kernel, stride, padding, dilation, groups = CONV_CASES[case]
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return shape, out, pair(kernel), list(pair(stride)), list(pair(padding)), list(pair(dilation)), groups


def parameters(out, per_unit, dtype, bias, seed):
    """A weight (out, *per_unit) and, when asked, a bias (out,), random and nonzero."""
    w = make_input((out, *per_unit), dtype, seed=seed, scale=0.5, offset=False)
    b = make_input((out,), dtype, seed=seed + 1, scale=0.5, offset=False) if bias else None
    return w, b


def leaves(*tensors, device="cpu"):
    return [None if t is None else t.detach().to(device).clone().requires_grad_() for t in tensors]


def gradients(out, inputs, dy):
    present = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(out, present, dy))
    return [None if t is None else next(grads) for t in inputs]


def check_against_reference(ours, ref, inputs, dtype, device, dy_seed):
    """ours(*leaves on device) and ref(*float64 leaves) on the same (rounded)
    values: output, then the gradient of every input."""
    xs, xs64 = leaves(*inputs, device=device), leaves(*[None if t is None else t.double() for t in inputs])
    y, y64 = ours(*xs), ref(*xs64)
    assert y.dtype == dtype and y.device.type == torch.device(device).type
    assert_close(y, y64, dtype, "forward", "output")
    dy = make_input(tuple(y.shape), dtype, seed=dy_seed, scale=1.0, offset=False)
    for name, g, g64, x in zip(("input", "weight", "bias"), gradients(y, xs, dy.to(device)),
                               gradients(y64, xs64, dy.double()), xs):
        if x is not None:
            assert g.dtype == dtype, f"grad {name} is {g.dtype}"
            assert_close(g, g64, dtype, "grad", f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape,out", LINEAR_CASES)
def test_linear_matches_reference(shape, out, bias, dtype, device):
    x = make_input(shape, dtype, seed=1)
    w, b = parameters(out, shape[-1:], dtype, bias, seed=2)
    check_against_reference(lambda *a: torchnorm.functional.cosine_linear(*a, eps=EPS),
                            lambda *a: reference.cosine_linear(*a, eps=EPS), (x, w, b), dtype, device, dy_seed=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_matches_reference(case, bias, dtype, device):
    shape, out, kernel, stride, padding, dilation, groups = conv_params(case)
    x = make_input(shape, dtype, seed=4)
    w, b = parameters(out, (shape[1] // groups, *kernel), dtype, bias, seed=5)
    args = (stride, padding, dilation, groups, EPS)
    check_against_reference(lambda *a: torchnorm.functional.cosine_conv2d(*a, *args),
                            lambda *a: reference.cosine_conv2d(*a, *args), (x, w, b), dtype, device, dy_seed=6)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_conv2d_any_input_strides(layout):
    """A channels-last or transposed input computes what its contiguous copy does."""
    x = make_input((2, 3, 6, 5), torch.float32, seed=7)
    w, b = parameters(4, (3, 3, 3), torch.float32, True, seed=8)
    strided = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else \
        x.transpose(-1, -2).contiguous().transpose(-1, -2)
    check_against_reference(lambda *a: torchnorm.functional.cosine_conv2d(*a, 1, 1, 1, 1, EPS),
                            lambda *a: reference.cosine_conv2d(*a, 1, 1, 1, 1, EPS), (strided, w, b),
                            torch.float32, "cpu", dy_seed=9)


def test_gradcheck():
    """Finite differences in float64: every input of both ops, with a bias,
    groups, stride, padding and dilation."""
    x, w, b = leaves(make_input((3, 4), torch.float64, seed=10), *parameters(5, (4,), torch.float64, True, seed=11))
    assert torch.autograd.gradcheck(lambda *a: torchnorm.functional.cosine_linear(*a, eps=EPS), (x, w, b),
                                    **GRADCHECK)
    for stride, padding, dilation, groups, bias in ((2, 1, 1, 2, True), (1, 2, 2, 1, False)):
        x = leaves(make_input((1, 4, 4, 5), torch.float64, seed=12))[0]
        w, b = leaves(*parameters(2, (4 // groups, 3, 3), torch.float64, bias, seed=13))
        fn = lambda x, w, b=None: torchnorm.functional.cosine_conv2d(  # noqa: E731
            x, w, b, stride, padding, dilation, groups, EPS)
        assert torch.autograd.gradcheck(fn, (x, w, b) if bias else (x, w), **GRADCHECK)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_outputs_within_one(bias):
    """|y| <= 1 on inputs of any scale; an input equal to a multiple of a
    unit's weights gives that unit a cosine of 1 (to rounding)."""
    x = make_input((64, 3, 9, 9), torch.float32, seed=14, scale=50.0)
    w, b = parameters(8, (3, 3, 3), torch.float32, bias, seed=15)
    y = torchnorm.functional.cosine_conv2d(x, w, b, 1, 1, 1, 1, EPS)
    assert y.abs().max() <= 1
    lin = torchnorm.functional.cosine_linear(x.flatten(1), *parameters(8, (243,), torch.float32, bias, seed=16))
    assert lin.abs().max() <= 1
    # patch = 3 * the weights of unit o (and 3 * bias for the constant input's weight): cosine 1
    if bias:
        return
    one = torchnorm.functional.cosine_conv2d(3 * w[2:3], w, None, 1, 0, 1, 1, EPS)
    assert_close(one[0, 2], torch.ones(1, 1), torch.float32, "forward", "aligned patch")
    assert one.abs().max() <= 1 + 4 * torch.finfo(torch.float32).eps


ZERO_CASES = {  # op: (functional, reference, input shape, weight's per-unit shape, op arguments)
    "conv2d": (torchnorm.functional.cosine_conv2d, reference.cosine_conv2d, (2, 3, 5, 5), (3, 3, 3),
               (1, 1, 1, 1, EPS)),
    "linear": (torchnorm.functional.cosine_linear, reference.cosine_linear, (2, 7), (7,), (EPS,)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("op", list(ZERO_CASES))
def test_all_zero_input_and_weight_row(op, bias, dtype):
    """An all-zero input: |x| = sqrt(eps) (sqrt(1 + eps) with a bias), so the
    output is exactly 0 (b / (|w| sqrt(1 + eps)) with a bias) and finite, and
    its gradients are finite and the reference's. An all-zero weight row's
    output is 0 likewise."""
    fn, ref, shape, per_unit, args = ZERO_CASES[op]
    x = torch.zeros(shape, dtype=dtype)
    w, b = parameters(4, per_unit, dtype, bias, seed=17)
    w[1] = 0
    y = fn(x, w, b, *args)
    if bias:
        unit = b.double() / (w.double().pow(2).flatten(1).sum(1) + b.double() ** 2 + EPS).sqrt() / (1 + EPS) ** 0.5
        expected = unit.view((1, -1) + (1,) * (y.dim() - 2)).expand_as(y)
        assert_close(y, expected, dtype, "forward", "zero input with a bias")
    else:
        assert torch.equal(y, torch.zeros_like(y)), "an all-zero input's output must be exactly 0"
    check_against_reference(lambda *a: fn(*a, *args), lambda *a: ref(*a, *args), (x, w, b), dtype, "cpu",
                            dy_seed=18)
    y = fn(make_input(shape, dtype, seed=19), w, None, *args)
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1])), "an all-zero weight row's output must be 0"
    assert torch.isfinite(y).all()


def test_zero_patch_gradient_is_the_documented_one():
    """At an all-zero patch (no bias) the input gradient is the dot product's
    alone, dy * w / (|w| sqrt(eps)): the norm's term vanishes with x."""
    x = torch.zeros(1, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[[[3.0]], [[4.0]]]], dtype=torch.float64)  # |w| = 5
    y = torchnorm.functional.cosine_conv2d(x, w, None, 1, 0, 1, 1, EPS)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    expected = w[0] / (5 * EPS ** 0.5)
    torch.testing.assert_close(gx[0], expected.view(2, 1, 1), rtol=1e-6, atol=0)


def test_norms_returned_by_the_ops():
    """The ops' second and third outputs are 1 / |x| per patch and group and
    1 / |w| per output channel, in float32 for float32 input."""
    shape, out, kernel, stride, padding, dilation, groups = conv_params("groups2")
    x = make_input(shape, torch.float32, seed=20)
    w, b = parameters(out, (shape[1] // groups, *kernel), torch.float32, True, seed=21)
    y, rx, rw = OPS.cosine_conv2d(x, w, b, stride, padding, dilation, groups, EPS)
    ones = torch.ones(groups, shape[1] // groups, *kernel, dtype=torch.float64)
    patch_sq = torch.nn.functional.conv2d(x.double() ** 2, ones, None, stride, padding, dilation, groups)
    assert rx.shape == (shape[0], groups, *y.shape[2:]) and rx.dtype == torch.float32
    assert_close(rx, (patch_sq + 1 + EPS).rsqrt(), torch.float32, "stats", "input_rnorm")
    assert_close(rw, (w.double().pow(2).flatten(1).sum(1) + b.double() ** 2 + EPS).rsqrt(), torch.float32, "stats",
                 "weight_rnorm")


def test_empty_batch():
    for fn, x, w in ((torchnorm.functional.cosine_linear, torch.zeros(0, 5), torch.randn(3, 5)),
                     (torchnorm.functional.cosine_conv2d, torch.zeros(0, 2, 4, 4), torch.randn(3, 2, 3, 3))):
        x, w = leaves(x, w)
        y = fn(x, w)
        assert y.shape[0] == 0 and y.shape[1] == 3
        gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
        assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(gw))


# ------------------------------------------------------------- bad input --

def _conv(x=None, w=None, b=None, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, eps=EPS):
    x = torch.randn(2, 4, 5, 5) if x is None else x
    w = torch.randn(6, 4 // groups, 3, 3) if w is None else w
    return lambda: OPS.cosine_conv2d(x, w, b, list(stride), list(padding), list(dilation), groups, eps)


def _linear(x=None, w=None, b=None, eps=EPS):
    x = torch.randn(3, 4) if x is None else x
    w = torch.randn(5, 4) if w is None else w
    return lambda: OPS.cosine_linear(x, w, b, eps)


BAD_CALLS = {
    "conv-3d-input": (_conv(x=torch.randn(4, 5, 5)), r"expected an \(N, C, H, W\) input"),
    "conv-weight-channels": (_conv(w=torch.randn(6, 3, 3, 3)), "expected a weight of shape"),
    "conv-groups": (_conv(w=torch.randn(6, 2, 3, 3), groups=3), "divisible by groups"),
    "conv-groups-0": (_conv(w=torch.randn(6, 4, 3, 3), groups=0), "groups >= 1"),
    "conv-weight-dtype": (_conv(w=torch.randn(6, 4, 3, 3, dtype=torch.float64)), "weight of dtype"),
    "conv-bias-shape": (_conv(b=torch.randn(5)), "expected a bias of shape"),
    "conv-bias-dtype": (_conv(b=torch.randn(6, dtype=torch.float64)), "bias of dtype"),
    "conv-int-input": (_conv(x=torch.ones(2, 4, 5, 5, dtype=torch.int32)), "expected a float32, float64"),
    "conv-eps-0": (_conv(eps=0.0), r"eps > 0"),
    "conv-kernel-too-big": (_conv(x=torch.randn(2, 4, 2, 2), padding=(0, 0)), "smaller than the dilated kernel"),
    "conv-stride-0": (_conv(stride=(0, 1)), "stride >= 1"),
    "conv-negative-padding": (_conv(padding=(-1, 1)), "padding >= 0"),
    "conv-stride-3-values": (_conv(stride=(1, 1, 1)), "stride"),
    "conv-weight-device": (_conv(w=torch.randn(6, 4, 3, 3, device="meta")), "weight on"),
    "linear-in-features": (_linear(x=torch.randn(3, 6)), "last dimension is the weight's in_features"),
    "linear-1d-weight": (_linear(w=torch.randn(4)), "2-d"),
    "linear-eps-negative": (_linear(eps=-1.0), r"eps > 0"),
    "linear-bias-shape": (_linear(b=torch.randn(4)), "expected a bias of shape"),
    "linear-half-input-float-weight": (_linear(x=torch.randn(3, 4, dtype=torch.float16)), "weight of dtype"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_a_clear_error(case):
    fn, match = BAD_CALLS[case]
    expect_error(fn, match)


def test_backward_ops_check_what_the_forward_returned():
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    y, rx, rw = OPS.cosine_conv2d(x, w, None, *conv, EPS)
    mask = [True, True, False]
    expect_error(lambda: OPS.cosine_conv2d_backward(y[:1], x, w, None, y, rx, rw, *conv, mask),
                 "expected grad_output of the output's shape")
    expect_error(lambda: OPS.cosine_conv2d_backward(y, x, w, None, y, rx.double(), rw, *conv, mask),
                 "expected input_rnorm as the forward returned it")
    expect_error(lambda: OPS.cosine_conv2d_backward(y, x, w, None, y, rx, rw[:3], *conv, mask),
                 "expected weight_rnorm as the forward returned it")
    xl, wl = torch.randn(3, 4), torch.randn(5, 4)
    yl, rxl, rwl = OPS.cosine_linear(xl, wl, None, EPS)
    expect_error(lambda: OPS.cosine_linear_backward(yl, xl, wl, None, yl.double(), rxl, rwl, mask),
                 "expected output of the output's shape")


def test_modules_refuse_bad_arguments():
    expect_error(lambda: torchnorm.nn.CosineConv2d(4, 6, 3, padding="same"), "zero padding")
    expect_error(lambda: torchnorm.nn.CosineConv2d(4, 6, 3, groups=4), "divisible by groups")
    expect_error(lambda: torchnorm.nn.CosineConv2d(4, 6, 3, eps=0), "eps must be > 0")
    expect_error(lambda: torchnorm.nn.CosineConv2d(4, 6, 3)(torch.randn(2, 3, 5, 5)), r"expects an input \(N, 4")
    expect_error(lambda: torchnorm.nn.CosineLinear(4, 6)(torch.randn(2, 5)), r"expects an input \(\*, 4\)")


# --------------------------------------------------------------- modules --

@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_modules_have_torch_parameters(bias):
    """weight and bias named, shaped and initialized as torch.nn.Linear's and
    Conv2d's: state_dicts load both ways; the outputs are the reference's."""
    torch.manual_seed(0)
    lin, ours = torch.nn.Linear(6, 4, bias=bias), torchnorm.nn.CosineLinear(6, 4, bias=bias)
    ours.load_state_dict(lin.state_dict())
    lin.load_state_dict(ours.state_dict())
    x = make_input((5, 6), torch.float32, seed=22)
    assert_close(ours(x), reference.cosine_linear(x, lin.weight, lin.bias), torch.float32, "forward", "CosineLinear")
    conv = torch.nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2, bias=bias)
    ours = torchnorm.nn.CosineConv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2, bias=bias)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in conv.named_parameters()]
    ours.load_state_dict(conv.state_dict())
    x = make_input((2, 4, 7, 8), torch.float32, seed=23)
    expected = reference.cosine_conv2d(x, conv.weight, conv.bias, (2, 1), 1, (1, 2), 2)
    assert_close(ours(x), expected, torch.float32, "forward", "CosineConv2d")
    assert_close(ours(x[0]), expected[0], torch.float32, "forward", "CosineConv2d, unbatched input")
    # torch's initialization: the same bound on the weights
    fresh = torchnorm.nn.CosineConv2d(64, 8, 3)
    assert fresh.weight.abs().max() <= 1 / (64 * 9) ** 0.5
    assert "eps=1e-08" in repr(fresh) and "groups=1" in repr(fresh)


def test_not_mistaken_for_torch_layers():
    """BatchNorm folding and fusion match torch.nn.Conv2d / Linear by type:
    the cosine layers must not be."""
    assert not isinstance(torchnorm.nn.CosineConv2d(2, 2, 1), torch.nn.Conv2d)
    assert not isinstance(torchnorm.nn.CosineLinear(2, 2), torch.nn.Linear)


def small_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torchnorm.nn.CosineConv2d(3, 4, 3, padding=1, bias=True), torch.nn.ReLU(),
                               torchnorm.nn.CosineConv2d(4, 4, 3, stride=2, groups=2), torch.nn.Flatten(),
                               torchnorm.nn.CosineLinear(16, 5, bias=True))


@pytest.mark.slow  # torch.compile of a model: ~10 s
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    eager = small_model()
    compiled = torch.compile(small_model(), fullgraph=True)
    x = make_input((2, 3, 5, 5), torch.float32, seed=24)
    dy = torch.randn(2, 5, generator=generator(25))
    xa, xb = leaves(x, x)
    out, exp = compiled(xa), eager(xb)
    assert_close(out, exp, torch.float32, "forward", "compiled forward")
    out.backward(dy)
    exp.backward(dy)
    assert_close(xa.grad, xb.grad, torch.float32, "grad", "compiled grad_input")
    for (name, p), (_, q) in zip(compiled.named_parameters(), eager.named_parameters()):
        assert_close(p.grad, q.grad, torch.float32, "grad", f"compiled {name}.grad")
    torch._dynamo.reset()
