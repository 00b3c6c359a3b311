"""Shared helpers for the torchnorm tests (imported as `from conftest import ...`).

Inputs are drawn in float64 on the CPU from a seeded generator, rounded to the
dtype under test, moved to the device and laid out as asked, so every device
and layout sees the same values. Nothing is ever tested on zeros: inputs,
weights, biases, residuals and running statistics are all random and nonzero.
"""
import pytest
import torch
import torch.nn.functional as F

import torchnorm
from torchnorm.nn import ConvBN1d, ConvBN2d, ConvBN3d, ConvTransposeBN1d, ConvTransposeBN2d, ConvTransposeBN3d

from tolerances import tol

HAS_CUDA = torch.cuda.is_available()

# Parametrize `device` over these: CUDA runs whenever a GPU is present.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")],
    ),
]

ACTIVATIONS = [None, "relu", "leaky_relu", "silu"]
NEGATIVE_SLOPE = 0.2  # not the default, so a kernel ignoring it is caught

# (input dtype, parameter/statistics dtype)
DTYPES_ALL = [
    pytest.param((torch.float32, torch.float32), id="f32"),
    pytest.param((torch.float64, torch.float64), id="f64"),
    pytest.param((torch.float16, torch.float16), id="f16"),
    pytest.param((torch.bfloat16, torch.bfloat16), id="bf16"),
    pytest.param((torch.float16, torch.float32), id="f16-f32params"),
    pytest.param((torch.bfloat16, torch.float32), id="bf16-f32params"),
]


def params_with_dtypes(rows):
    """pytest.params of table rows of strings ending in one of DTYPES_ALL: its
    (dtype, parameter dtype) pair unwrapped, the id the row's strings and its id."""
    return [pytest.param(*r[:-1], r[-1].values[0], id="-".join([*r[:-1], r[-1].id])) for r in rows]


# Modes of the functional API: (training, running statistics given)
MODES = [
    pytest.param((True, True), id="train-track"),
    pytest.param((True, False), id="train-notrack"),
    pytest.param((False, True), id="eval"),
]


def act_name(activation):
    """The op-level spelling of an activation."""
    return "none" if activation is None else activation


def torch_act(y, activation, negative_slope=NEGATIVE_SLOPE):
    """torch's own activation, the truth for the fused one."""
    if activation is None or activation == "none":
        return y
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    if activation == "silu":
        return F.silu(y)
    raise ValueError(activation)


def generator(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(shape, seed, dtype=torch.float32, device="cpu", scale=1.0, offset=0.0):
    """Seeded normal values drawn on the CPU in float64, then cast and moved."""
    t = torch.randn(shape, generator=generator(seed), dtype=torch.float64) * scale + offset
    return t.to(dtype).to(device)


def channel_offsets(shape, seed):
    """A per-channel offset broadcastable against shape (so batch means differ)."""
    C = shape[1]
    off = torch.randn(C, generator=generator(seed + 7919), dtype=torch.float64) * 1.5
    return off.view((1, C) + (1,) * (len(shape) - 2))


def apply_layout(t, layout):
    """Returns a tensor equal to t laid out as asked (a view for the strided ones)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        assert t.dim() == 4
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        assert t.dim() == 5
        return t.contiguous(memory_format=torch.channels_last_3d)
    if layout == "transposed":
        # the last two dims swapped in memory
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert t.numel() <= 1 or not out.is_contiguous() or min(t.shape[-2:]) <= 1
        return out
    if layout == "sliced":
        # every other element of a buffer twice as long in the last dim
        big = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
        big.fill_(float("nan"))
        out = big[..., ::2]
        out.copy_(t)
        return out
    raise ValueError(layout)


def make_input(shape, dtype, device="cpu", layout="contiguous", seed=0, scale=2.0, offset=True):
    """A test input: seeded values with per-channel offsets, in the given layout."""
    x = torch.randn(shape, generator=generator(seed), dtype=torch.float64) * scale
    if offset and len(shape) >= 2 and shape[1] > 0:
        x = x + channel_offsets(shape, seed)
    return apply_layout(x.to(dtype).to(device), layout)


def make_params(C, dtype, device="cpu", seed=100, affine=True, track=True):
    """weight, bias, running_mean, running_var: random, nonzero, positive variance."""
    w = b = rm = rv = None
    if affine:
        w = randn((C,), seed, dtype, device, scale=0.5, offset=1.0)
        b = randn((C,), seed + 1, dtype, device, scale=0.5, offset=0.25)
    if track:
        rm = randn((C,), seed + 2, dtype, device, scale=0.5, offset=0.1)
        rv = (torch.rand(C, generator=generator(seed + 3), dtype=torch.float64) + 0.5).to(dtype).to(device)
    return w, b, rm, rv


def clone_opt(t):
    return None if t is None else t.detach().clone()


def to64(t, device="cpu"):
    """A float64 CPU leaf copy (requires_grad as the source)."""
    if t is None:
        return None
    out = t.detach().to(device=device, dtype=torch.float64).clone()
    return out.requires_grad_(t.requires_grad)


def poison(device, nbytes=None):
    """Fill allocator blocks with NaN and free them, so that an output the kernel
    forgets to write reads as NaN instead of a lucky zero. On CUDA the caching
    allocator hands these blocks out again; on the CPU malloc's free lists do."""
    sizes = [16, 256, 4096, 16384]
    if nbytes is not None:
        sizes.append(max(1, nbytes // 4))
    elif device != "cpu":
        sizes += [1 << 18] * 3
    blocks = [torch.full((n,), float("nan"), dtype=torch.float32, device=device) for n in sizes]
    del blocks


def assert_close(actual, expected, dtype, kind, msg=""):
    """Compares actual with expected (any dtype/device) in float64 on the CPU with
    the tolerance of `dtype` and `kind` from tests/tolerances.py."""
    assert actual is not None, f"{msg}: missing result"
    assert tuple(actual.shape) == tuple(expected.shape), f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual.detach().to("cpu", torch.float64),
        expected.detach().to("cpu", torch.float64),
        **tol(dtype, kind),
        equal_nan=False,
        msg=lambda m: f"{msg}\n{m}" if msg else m,
    )


def assert_grads_close(names, grads, expected, dtype, inputs=None):
    """Each gradient expected (not None) is there, has the expected one's dtype
    (with `inputs`, as against the float64 reference: its input's dtype) and
    is close to it with the "grad" tolerance of `dtype`."""
    for i, (name, g, e) in enumerate(zip(names, grads, expected)):
        if e is None:
            continue
        assert g is not None, f"{name} missing"
        want = e.dtype if inputs is None else inputs[i].dtype
        assert g.dtype == want, f"{name} dtype {g.dtype}, expected {want}"
        assert_close(g, e, dtype, "grad", name)


def memory_format_of(t):
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# ---------------------------------------------------------------------------
# Helpers of the per-sample norm tests (LayerNorm, RMSNorm, GroupNorm,
# InstanceNorm).
# ---------------------------------------------------------------------------


def make_affine(shape, dtype, device="cpu", seed=100, affine="wb"):
    """weight and bias of the given shape (random, nonzero; weight around 1),
    or None where `affine` ("wb", "w", "none") leaves them out."""
    w = randn(shape, seed, dtype, device, scale=0.5, offset=1.0) if affine in ("wb", "w") else None
    b = randn(shape, seed + 1, dtype, device, scale=0.5, offset=0.25) if affine == "wb" else None
    return w, b


def leaf(t, requires_grad=True):
    """A detached leaf of t (None stays None)."""
    return None if t is None else t.detach().requires_grad_(requires_grad)


def grads_of(outputs, inputs, grad_outputs):
    """torch.autograd.grad of the outputs (with their grad_outputs; a None
    grad_output leaves that output out) with respect to the inputs that are
    not None; None in the result where the input is None."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
    present = [t for t in inputs if t is not None]
    got = torch.autograd.grad([o for o, _ in pairs], present, [g for _, g in pairs], allow_unused=True)
    it = iter(got)
    return [None if t is None else next(it) for t in inputs]


def accumulate_dtype(dtype):
    """The dtype of saved statistics: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# One test case's inputs per op family: the input, its parameters (and
# running statistics, residual) and a gradient for the output, all seeded.
# The op's own test file and tests/op_samples.py draw from these.
# ---------------------------------------------------------------------------


def batch_norm_inputs(shape, layout, dtype, pdtype, device, affine, track, with_residual, seed=0):
    """x, weight, bias, running_mean, running_var, residual, grad_output."""
    x = make_input(shape, dtype, device, layout, seed=seed)
    w, b, rm, rv = make_params(shape[1], pdtype, device, seed=seed + 100, affine=affine, track=track)
    res = make_input(shape, dtype, device, layout, seed=seed + 200, scale=1.0, offset=False) if with_residual else None
    gy = make_input(shape, dtype, device, "contiguous", seed=seed + 300, scale=1.0, offset=False)
    return x, w, b, rm, rv, res, gy


def row_norm_inputs(shape, ns, layout, dtype, pdtype, device, op, affine, residual, seed=0):
    """x, weight, bias (None for rms_norm), residual, grad_output and grad_sum
    (the gradient of the x + residual output, with residual="res-gsum") of a
    layer_norm / rms_norm over the trailing dimensions ns."""
    x = make_input(shape, dtype, device, layout, seed=seed)
    w, b = make_affine(ns, pdtype, device, seed + 100, affine)
    if op == "rms_norm":
        b = None
    res = make_input(shape, dtype, device, layout, seed=seed + 200, scale=1.0, offset=False) if residual != "nores" else None
    gy = make_input(shape, dtype, device, seed=seed + 300, scale=1.0, offset=False)
    gsum = make_input(shape, dtype, device, seed=seed + 400, scale=1.0, offset=False) if residual == "res-gsum" else None
    return x, w, b, res, gy, gsum


def group_norm_inputs(shape, layout, dtype, pdtype, device, affine, seed=0):
    """x, weight, bias, grad_output."""
    x = make_input(shape, dtype, device, layout, seed=seed)
    w, b = make_affine((shape[1],), pdtype, device, seed + 100, affine)
    gy = make_input(shape, dtype, device, seed=seed + 300, scale=1.0, offset=False)
    return x, w, b, gy


def instance_norm_inputs(shape, layout, dtype, pdtype, device, affine, track, seed=0):
    """x, weight, bias, running_mean, running_var, grad_output."""
    x = make_input(shape, dtype, device, layout, seed=seed)
    w, b = make_affine((shape[1],), pdtype, device, seed + 100, affine)
    _, _, rm, rv = make_params(shape[1], pdtype, device, seed=seed + 100, affine=False, track=track)
    gy = make_input(shape, dtype, device, seed=seed + 300, scale=1.0, offset=False)
    return x, w, b, rm, rv, gy


# ---------------------------------------------------------------------------
# Bad input (tests/test_batch_norm_errors.py, tests/test_norm_errors.py)
# ---------------------------------------------------------------------------

ERRORS = (RuntimeError, ValueError, TypeError)
OTHER_DEVICE = "cuda" if HAS_CUDA else "meta"
# what an error about each argument calls it
ARG_NAMES = {"w": "weight", "b": "bias", "res": "residual", "rm": "running_mean", "rv": "running_var"}

# (input dtype, a parameter's mismatching dtype)
DTYPE_MISMATCHES = [
    pytest.param(torch.float32, torch.float64, id="f32-f64"),
    pytest.param(torch.float32, torch.float16, id="f32-f16"),
    pytest.param(torch.float64, torch.float32, id="f64-f32"),
    pytest.param(torch.float16, torch.bfloat16, id="f16-bf16"),
    pytest.param(torch.bfloat16, torch.float64, id="bf16-f64"),
]

# wrong shapes for a per-channel argument of a C=3 input
BAD_CHANNEL_SHAPES = [
    pytest.param((4,), id="C+1"),
    pytest.param((2,), id="C-1"),
    pytest.param((3, 1), id="2-D"),
    pytest.param((), id="0-D"),
]


def bad_shaped(shape, seed):
    """A nonzero float32 tensor of a wrong shape for an argument (0-D for ())."""
    return make_input(shape, torch.float32, seed=seed, offset=False) + 1.5 if shape else torch.tensor(1.5)


class StatsUnchanged:
    """Snapshots the (CPU / real-device) running statistics; checks them afterwards."""

    def __init__(self, *tensors):
        self.pairs = [(t, t.detach().clone()) for t in tensors if t is not None and t.device.type != "meta"]

    def check(self):
        for t, before in self.pairs:
            assert torch.equal(t, before), f"running statistics changed by a failing call: {before} -> {t}"


def expect_error(fn, match, stats=None, types=ERRORS):
    """fn() raises one of `types` matching `match`; then stats (a StatsUnchanged) is checked."""
    with pytest.raises(types, match=match):
        out = fn()
        # a lazily reported error must at least surface when the result is used
        if isinstance(out, (tuple, list)):
            out = out[0]
        out.cpu()
    if stats is not None:
        stats.check()


# ---------------------------------------------------------------------------
# Modules: a torch.nn module and its torchnorm.nn counterpart in one state.
# ---------------------------------------------------------------------------


def make_module_pair(ref_cls, our_cls, args, kwargs, randomize, device="cpu", dtype=torch.float32, seed=0):
    """(ref_cls(*args, **kwargs), our_cls(*args, **kwargs)) on device in dtype,
    each given the same random state by randomize(module, seed)."""
    ref = ref_cls(*args, device=device, dtype=dtype, **kwargs)
    ours = our_cls(*args, device=device, dtype=dtype, **kwargs)
    randomize(ref, seed)
    randomize(ours, seed)
    return ref, ours


def assert_same_state(ours, ref, dtype, msg=""):
    """The two modules' state_dicts have the same keys, dtypes and values
    (num_batches_tracked exactly, the rest within the "stats" tolerance)."""
    sd_o, sd_r = ours.state_dict(), ref.state_dict()
    assert list(sd_o.keys()) == list(sd_r.keys()), f"{msg}: state_dict keys {list(sd_o)} != {list(sd_r)}"
    for k in sd_r:
        assert sd_o[k].dtype == sd_r[k].dtype, f"{msg}: {k} dtype {sd_o[k].dtype} != {sd_r[k].dtype}"
        if k.endswith("num_batches_tracked"):
            assert torch.equal(sd_o[k].cpu(), sd_r[k].cpu()), f"{msg}: {k} {sd_o[k]} != {sd_r[k]}"
        else:
            assert_close(sd_o[k], sd_r[k], dtype, "stats", f"{msg}: {k}")


# ---------------------------------------------------------------------------
# Conv + BatchNorm blocks (tests/test_conv_bn_*.py)
# ---------------------------------------------------------------------------

CONV_BN_CLASSES = {1: ConvBN1d, 2: ConvBN2d, 3: ConvBN3d}
CONV_TRANSPOSE_BN_CLASSES = {1: ConvTransposeBN1d, 2: ConvTransposeBN2d, 3: ConvTransposeBN3d}


@pytest.fixture
def one_intra_op_thread():
    """The block tests run hundreds of tiny convolutions, each a parallel region;
    on a small, shared machine every region's OpenMP hand-off can cost
    milliseconds (a file takes minutes with 2 threads, seconds with 1). The
    kernels' multi-threaded paths are what tests/test_batch_norm_apply.py
    (kept at the default thread count) and tests/test_batch_norm.py exercise.
    Used by the Conv + BN block files: pytestmark = pytest.mark.usefixtures(...)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def randomize_conv_bn(block, seed):
    """Random, nonzero conv weight / bias, BN parameters and running statistics."""
    conv, bn = block.conv, block.bn
    dtype = conv.weight.dtype
    with torch.no_grad():
        fan_in = conv.weight[0].numel()
        conv.weight.copy_(randn(conv.weight.shape, seed, dtype, scale=fan_in ** -0.5))
        if conv.bias is not None:
            conv.bias.copy_(randn(conv.bias.shape, seed + 1, dtype, scale=0.5, offset=0.2))
        w, b, rm, rv = make_params(bn.num_features, dtype, seed=seed + 2)
        if bn.weight is not None:
            bn.weight.copy_(w)
            bn.bias.copy_(b)
        if bn.running_mean is not None:
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
    return block


def make_conv_bn_block(dim, dtype, activation, seed=0, in_channels=5, out_channels=7, kernel_size=3, padding=1,
                transposed=False, **kwargs):
    classes = CONV_TRANSPOSE_BN_CLASSES if transposed else CONV_BN_CLASSES
    block = classes[dim](in_channels, out_channels, kernel_size, padding=padding, activation=activation,
                         negative_slope=NEGATIVE_SLOPE, dtype=dtype, **kwargs)
    return randomize_conv_bn(block, seed)


def block_output_with_recipe(like, seed, activation="none"):
    """(y, recipe): y = act(BN(pre_norm)) in batch statistics, shaped, laid out
    and typed like `like`, as a fused block without residual returns it, and
    the recipe it hands the next block (torchnorm.nn.conv_bn_forward's
    input_recipe). y is a leaf (no grad yet). No activation by default: its
    zero-mean output keeps torch.nn's conv-bias gradient, whose exact value is
    zero in training mode, within the tolerance of zero (a ReLU'd input's
    rounding noise exceeds it); tests/op_samples.py covers the activations."""
    pre_norm = like.detach().clone()
    w, b, _, _ = make_params(like.shape[1], like.dtype, like.device, seed=seed)
    with torch.no_grad():
        y, mean, rstd = torch.ops.torchnorm.batch_norm_train(pre_norm, w, b, None, None, 0.1, 1e-5, activation,
                                                             NEGATIVE_SLOPE, None)
    return y, (pre_norm, mean, rstd, w, b, activation, NEGATIVE_SLOPE)


def unfused_conv_bn(conv, bn, x, residual, activation):
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return torch_act(y, activation)


class SavedTensors:
    """Records every tensor saved for backward."""

    def __init__(self):
        self.saved = []

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _pack(self, t):
        self.saved.append((tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    def activation_sized(self, shape, known):
        """Saved tensors of `shape` whose memory is none of the `known` tensors'."""
        ptrs = {t.untyped_storage().data_ptr() for t in known if t is not None}
        return [s for s, p in self.saved if s == tuple(shape) and p not in ptrs]


def assert_same_model_state(a, b):
    """Two models (a converted one and its original) hold equal state_dicts
    (same keys, dtypes, devices, values), parameters with the same
    requires_grad and modules in the same training mode."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].device == sb[k].device, k
        assert torch.equal(sa[k], sb[k]), k
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and pa.requires_grad == pb.requires_grad, (na, pa.requires_grad, pb.requires_grad)
    for (na, ma), (nb, mb) in zip(a.named_modules(), b.named_modules()):
        assert na == nb and ma.training == mb.training, (na, ma.training, mb.training)


def assert_round_trip(converted, original, x, eval_child):
    """converted (torchnorm.convert of a model) against original (a deep copy
    of the model) on x, training (with the submodule named eval_child kept in
    eval mode) and in eval: outputs, input and parameter gradients, buffers
    (num_batches_tracked exactly). Then converted back: no torchnorm module
    left, every module of the original's type, the same state and output."""
    for training in (True, False):
        converted.train(training)
        original.train(training)
        if training:
            converted.get_submodule(eval_child).eval()
            original.get_submodule(eval_child).eval()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, exp = converted(xa), original(xb)
        assert_close(out, exp, torch.float32, "forward", f"converted model, training={training}")
        out.sum().backward()
        exp.sum().backward()
        assert_close(xa.grad, xb.grad, torch.float32, "grad", "grad_input")
        for (n, p), (_, q) in zip(converted.named_parameters(), original.named_parameters()):
            if q.grad is not None:
                assert_close(p.grad, q.grad, torch.float32, "grad", f"{n}.grad")
        for (n, t), (_, u) in zip(converted.named_buffers(), original.named_buffers()):
            if n.endswith("num_batches_tracked"):
                assert torch.equal(t, u), n
            else:
                assert_close(t, u, torch.float32, "stats", n)

    back = torchnorm.convert(converted, back=True)
    assert not any(type(m).__module__.startswith("torchnorm") for m in back.modules())
    orig_modules = dict(original.named_modules())
    for n, m in back.named_modules():
        assert type(m) is type(orig_modules[n]), f"{n} came back as {type(m)}"
    assert_same_model_state(back, converted)
    back.train()
    original.train()
    assert_close(back(x), original(x), torch.float32, "forward", "converted back")
