"""Online Normalization (torchnorm::online_norm, OnlineNorm1d/2d) against the
float64 reference torchnorm.reference.online_norm: outputs, gradients (the
paper's control process) and the state mu, var, u, v over consecutive
batches; one batch of N against N batches of one; batch size 1; half inputs
with float32 state; eval; bad input (state untouched); the backward-twice and
checkpoint hazards; state_dict. Tolerances from tests/tolerances.py."""
import pytest
import torch

import torchnorm
from conftest import DEVICES, StatsUnchanged, assert_close, expect_error, make_input
from torchnorm import reference

OPS = torch.ops.torchnorm
ALPHAS = dict(alpha_fwd=0.9, alpha_bkw=0.8, eps=1e-5)  # fast rates: the state moves visibly in a few samples
SHAPES = [pytest.param((6, 3), id="NC"), pytest.param((5, 3, 7), id="NCL"), pytest.param((4, 3, 5, 6), id="NCHW")]


def fresh_state(C, device="cpu", dtype=torch.float32):
    """mu = 0, var = 1, u = v = 0, as the paper (and the modules) start."""
    return [torch.zeros(C, dtype=dtype, device=device), torch.ones(C, dtype=dtype, device=device),
            torch.zeros(C, dtype=dtype, device=device), torch.zeros(C, dtype=dtype, device=device)]


def batches(shape, count, seed):
    """(input, output gradient) pairs, float64, with means far from 0 so that
    the state has something to track."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3,
             torch.randn(shape, generator=gen, dtype=torch.float64)) for _ in range(count)]


def run_op(state, x, dy, dtype, device):
    """One training forward and backward of the op; returns (y, dx)."""
    xa = x.detach().to(device, dtype).clone().requires_grad_()
    y, _, _, _ = OPS.online_norm(xa, None, None, *state, ALPHAS["alpha_fwd"], ALPHAS["alpha_bkw"], ALPHAS["eps"])
    y.backward(dy.to(device, dtype))
    return y, xa.grad


def run_reference(state, x, dy):
    xa = x.detach().clone().requires_grad_()
    y = reference.online_norm(xa, *state, **ALPHAS)
    y.backward(dy)
    return y, xa.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_over_batches(shape, dtype, device):
    """Three consecutive batches: outputs, input gradients and the state after
    each batch's forward and backward."""
    C = shape[1]
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ours, ref = fresh_state(C, device, state_dtype), fresh_state(C, dtype=torch.float64)
    for i, (x, dy) in enumerate(batches(shape, 3, seed=1)):
        x, dy = x.to(dtype).double(), dy.to(dtype).double()  # the reference sees the values the kernel sees
        y, dx = run_op(ours, x, dy, dtype, device)
        y_ref, dx_ref = run_reference(ref, x, dy)
        assert y.dtype == dtype and dx.dtype == dtype
        assert_close(y, y_ref, dtype, "forward", f"batch {i} output")
        assert_close(dx, dx_ref, dtype, "grad", f"batch {i} grad")
        for name, a, b in zip("mu var u v".split(), ours, ref):
            assert a.dtype == state_dtype, f"{name} is {a.dtype}: the state must stay float32 or wider"
            assert_close(a, b, state_dtype if dtype != torch.bfloat16 else torch.float32, "stats", f"batch {i} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_affine_matches_reference(shape, dtype, device):
    """The op with weight and bias: out = y * weight + bias in the same pass,
    and the control process on weight * dy; against the reference followed by
    the affine map in float64, two batches: output, the input, weight and bias
    gradients, the state."""
    C = shape[1]
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ours, ref = fresh_state(C, device, state_dtype), fresh_state(C, dtype=torch.float64)
    gen = torch.Generator().manual_seed(13)
    w64, b64 = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5, torch.randn(C, generator=gen, dtype=torch.float64)
    pshape = (1, -1) + (1,) * (len(shape) - 2)
    for i, (x, dy) in enumerate(batches(shape, 2, seed=14)):
        x, dy = x.to(dtype).double(), dy.to(dtype).double()
        xa, w, b = (t.to(device, dtype).clone().requires_grad_() for t in (x, w64, b64))
        y, _, _, _ = OPS.online_norm(xa, w, b, *ours, ALPHAS["alpha_fwd"], ALPHAS["alpha_bkw"], ALPHAS["eps"])
        y.backward(dy.to(device, dtype))
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w64, b64))
        z = reference.online_norm(xr, *ref, **ALPHAS) * wr.view(pshape) + br.view(pshape)
        z.backward(dy)
        assert_close(y, z, dtype, "forward", f"batch {i} output")
        for name, got, want in (("input", xa.grad, xr.grad), ("weight", w.grad, wr.grad), ("bias", b.grad, br.grad)):
            assert got.dtype == dtype, f"{name} grad dtype {got.dtype}"
            assert_close(got, want, dtype, "grad", f"batch {i} {name} grad")
        for name, a, e in zip("mu var u v".split(), ours, ref):
            assert_close(a, e, state_dtype, "stats", f"batch {i} {name}")


def layer_scaled(z, eps):
    """The error compensation "ls" written out: z / sqrt(mean over each sample's (C, *) of z^2 + eps)."""
    return z / torch.sqrt(z.pow(2).mean(dim=tuple(range(1, z.dim())), keepdim=True) + eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_layer_scale_matches_reference(shape, dtype, affine, device):
    """layer_scale=True: the layer scaling fused into the op's passes against
    the reference, the affine map and the scaling written out in float64, two
    batches: output, each sample's layer_rstd, the input, weight and bias
    gradients (the scaling's derivative, then the control process) and the
    state. In float64 also against the unfused composition (the op, then
    rms_norm), which the module ran before."""
    C = shape[1]
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ours, ref, unfused = (fresh_state(C, device, state_dtype), fresh_state(C, dtype=torch.float64),
                          fresh_state(C, device, state_dtype))
    gen = torch.Generator().manual_seed(15)
    w64, b64 = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5, torch.randn(C, generator=gen, dtype=torch.float64)
    pshape = (1, -1) + (1,) * (len(shape) - 2)
    eps = ALPHAS["eps"]
    for i, (x, dy) in enumerate(batches(shape, 2, seed=16)):
        x, dy = x.to(dtype).double(), dy.to(dtype).double()
        xa, w, b = (t.to(device, dtype).clone().requires_grad_() for t in (x, w64, b64))
        params = (w, b) if affine else (None, None)
        y, _, _, layer_rstd = OPS.online_norm(xa, *params, *ours, ALPHAS["alpha_fwd"], ALPHAS["alpha_bkw"], eps, True)
        y.backward(dy.to(device, dtype))
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w64, b64))
        z = reference.online_norm(xr, *ref, **ALPHAS)
        if affine:
            z = z * wr.view(pshape) + br.view(pshape)
        r_ref = 1 / torch.sqrt(z.detach().pow(2).mean(dim=tuple(range(1, z.dim()))) + eps)
        z = layer_scaled(z, eps)
        z.backward(dy)
        assert_close(y, z, dtype, "forward", f"batch {i} output")
        assert_close(layer_rstd, r_ref, dtype, "stats", f"batch {i} layer_rstd")
        grads = [("input", xa.grad, xr.grad)]
        if affine:
            grads += [("weight", w.grad, wr.grad), ("bias", b.grad, br.grad)]
        for name, got, want in grads:
            assert_close(got, want, dtype, "grad", f"batch {i} {name} grad")
        for name, a, e in zip("mu var u v".split(), ours, ref):
            assert_close(a, e, state_dtype, "stats", f"batch {i} {name}")
        if dtype == torch.float64:
            xu, wu, bu = (t.to(device, dtype).clone().requires_grad_() for t in (x, w64, b64))
            uparams = (wu, bu) if affine else (None, None)
            yu, _, _, _ = OPS.online_norm(xu, *uparams, *unfused, ALPHAS["alpha_fwd"], ALPHAS["alpha_bkw"], eps)
            yu = torchnorm.functional.rms_norm(yu, list(shape[1:]), None, eps)
            yu.backward(dy.to(device))
            assert_close(y, yu, dtype, "forward", f"batch {i} output against the composition")
            unfused_grads = [xu.grad] + ([wu.grad, bu.grad] if affine else [])
            for (name, got, _), want in zip(grads, unfused_grads):
                assert_close(got, want, dtype, "grad", f"batch {i} {name} grad against the composition")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_one_batch_of_n_equals_n_batches_of_one(shape, device):
    """The samples are processed in order, so batching does not matter:
    outputs, gradients and state agree bit for bit up to float64 rounding."""
    (x, dy), = batches(shape, 1, seed=2)
    whole, single = fresh_state(shape[1], device, torch.float64), fresh_state(shape[1], device, torch.float64)
    y, dx = run_op(whole, x, dy, torch.float64, device)
    parts = [run_op(single, x[n:n + 1], dy[n:n + 1], torch.float64, device) for n in range(shape[0])]
    assert_close(y, torch.cat([p[0] for p in parts]), torch.float64, "forward", "output")
    assert_close(dx, torch.cat([p[1] for p in parts]), torch.float64, "grad", "grad")
    for name, a, b in zip("mu var u v".split(), whole, single):
        assert_close(a, b, torch.float64, "stats", name)


def test_large_mean_keeps_the_variance():
    """Each sample's variance is two-pass: at mean 1e4 and std 1 the state's
    variance follows the float64 reference (E[x^2] - E[x]^2 in float32 would
    be off by ~10 here)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 2, 16, 16, generator=gen, dtype=torch.float64) + 1e4
    ours, ref = fresh_state(2), fresh_state(2, dtype=torch.float64)
    OPS.online_norm(x.float(), None, None, *ours, 0.5, 0.8, 1e-5)
    with torch.no_grad():
        reference.online_norm(x.float().double(), *ref, alpha_fwd=0.5, alpha_bkw=0.8, eps=1e-5)
    assert_close(ours[1], ref[1], torch.float32, "stats", "var")


@pytest.mark.parametrize("device", DEVICES)
def test_eval_normalizes_with_the_state_and_updates_nothing(device):
    m = torchnorm.nn.OnlineNorm2d(3, ecm=None, affine=False).to(device)
    x = make_input((4, 3, 5, 5), torch.float32, device, seed=4).requires_grad_()
    for _ in range(2):
        m(x).sum().backward()
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    y = m(x)
    expected = (x.detach().double() - m.mu.double().view(1, -1, 1, 1)) / torch.sqrt(m.var.double().view(1, -1, 1, 1) + m.eps)
    assert_close(y, expected, torch.float32, "forward", "eval output")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()), "eval changed the state"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ecm", [None, "ls", "ac"])
@pytest.mark.parametrize("cls,shape", [(torchnorm.nn.OnlineNorm1d, (1, 4)), (torchnorm.nn.OnlineNorm1d, (3, 4, 6)),
                                       (torchnorm.nn.OnlineNorm2d, (1, 4, 5, 5)),
                                       (torchnorm.nn.OnlineNorm2d, (3, 4, 5, 5))],
                         ids=["1d-batch1", "1d-NCL", "2d-batch1", "2d"])
def test_module_matches_reference_composition(cls, shape, ecm, device):
    """The module, batch size 1 included, against the reference followed by
    the affine map and the error compensation written out in float64, over two
    training batches: outputs, input and parameter gradients, state."""
    C = shape[1]
    m = cls(C, ecm=ecm, **ALPHAS).to(device)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        m.weight.copy_(torch.rand(C, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(C, generator=gen))
    ref_state = fresh_state(C, dtype=torch.float64)
    w, b = m.weight.detach().double().cpu().requires_grad_(), m.bias.detach().double().cpu().requires_grad_()
    pshape = (1, -1) + (1,) * (len(shape) - 2)
    for i, (x, dy) in enumerate(batches(shape, 2, seed=6)):
        xa = x.float().to(device).requires_grad_()
        y = m(xa)
        y.backward(dy.float().to(device))
        xr = x.float().double().requires_grad_()
        z = reference.online_norm(xr, *ref_state, **ALPHAS) * w.view(pshape) + b.view(pshape)
        if ecm == "ls":
            z = layer_scaled(z, m.eps)
        elif ecm == "ac":
            z = z.clamp(-5, 5)
        z.backward(dy)
        assert_close(y, z, torch.float32, "forward", f"batch {i} output")
        assert_close(xa.grad, xr.grad, torch.float32, "grad", f"batch {i} input grad")
        for name, a, e in zip("mu var u v".split(), (m.mu, m.var, m.u, m.v), ref_state):
            assert_close(a, e, torch.float32, "stats", f"batch {i} {name}")
    assert_close(m.weight.grad, w.grad, torch.float32, "grad", "weight grad")
    assert_close(m.bias.grad, b.grad, torch.float32, "grad", "bias grad")


def test_half_modules_keep_float32_state():
    for dtype in (torch.float16, torch.bfloat16):
        m = torchnorm.nn.OnlineNorm2d(3).to(dtype)
        assert m.weight.dtype == dtype
        assert all(getattr(m, n).dtype == torch.float32 for n in "mu var u v".split())
        x = make_input((2, 3, 4, 4), dtype, seed=7).requires_grad_()
        y = m(x)
        y.sum().backward()
        assert y.dtype == dtype and x.grad.dtype == dtype
        assert all(getattr(m, n).dtype == torch.float32 for n in "mu var u v".split())


def test_backward_twice_raises_and_leaves_the_state():
    x = make_input((3, 2, 4), torch.float32, seed=8).requires_grad_()
    state = fresh_state(2)
    y, _, _, _ = OPS.online_norm(x, None, None, *state, 0.9, 0.8, 1e-5)
    y.sum().backward(retain_graph=True)
    after_first = [s.clone() for s in state]
    with pytest.raises(RuntimeError, match="backward already ran"):
        y.sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(state, after_first)), "a refused backward changed u or v"


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recomputation_raises(use_reentrant):
    from torch.utils.checkpoint import checkpoint
    m = torchnorm.nn.OnlineNorm2d(2)
    x = make_input((2, 2, 3, 3), torch.float32, seed=9).requires_grad_()
    out = checkpoint(m, x, use_reentrant=use_reentrant)
    state = [t.clone() for t in (m.mu, m.var)]
    with pytest.raises(RuntimeError, match="inside a backward pass"):
        out.sum().backward()
    assert torch.equal(m.mu, state[0]) and torch.equal(m.var, state[1]), "the recomputation updated mu, var again"


@pytest.mark.parametrize("args,match", [
    (lambda x, s: (x[:, :2], *s), "of shape \\(3,\\)|one per channel"),
    (lambda x, s: (x[0, 0], *s), r"\(N, C, \*\)"),
    (lambda x, s: (x, s[0][:2], *s[1:]), "mu of shape"),
    (lambda x, s: (x, s[0], s[1].half(), *s[2:]), "float32 or float64"),
    (lambda x, s: (x[:, :, :0], *s), "at least one position"),
    (lambda x, s: (x, s[0], torch.ones(1).expand(3), *s[2:]), "overlap|single memory location"),
    (lambda x, s: (x, s[0], s[0], s[2], s[2]), None),
], ids=["channels", "1-d", "state-shape", "half-state", "no-positions", "expanded-state", "shared-state-ok"])
def test_bad_input_raises_and_leaves_the_state(args, match):
    x = make_input((2, 3, 4), torch.float32, seed=10)
    state = fresh_state(3)
    if match is None:  # the same tensor as mu and var is allowed, as on the CPU's copy_ back
        OPS.online_norm(x, None, None, *args(x, state)[1:], 0.9, 0.8, 1e-5)
        return
    guard = StatsUnchanged(*state)
    inputs = args(x, state)
    expect_error(lambda: OPS.online_norm(inputs[0], None, None, *inputs[1:], 0.9, 0.8, 1e-5), match, guard)


@pytest.mark.parametrize("name,value", [("alpha_fwd", 1.0), ("alpha_bkw", -0.1)])
def test_bad_rates_raise(name, value):
    with pytest.raises(ValueError, match=name):
        torchnorm.nn.OnlineNorm1d(3, **{name: value})
    rates = dict(alpha_fwd=0.9, alpha_bkw=0.8)
    rates[name] = value
    state = fresh_state(3)
    guard = StatsUnchanged(*state)
    expect_error(lambda: OPS.online_norm(make_input((2, 3), torch.float32, seed=11), None, None, *state,
                                         rates["alpha_fwd"],
                                         rates["alpha_bkw"], 1e-5), name, guard)


def test_module_rejects_wrong_rank_and_channels():
    with pytest.raises(ValueError, match="channels"):
        torchnorm.nn.OnlineNorm2d(3)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="dimensions"):
        torchnorm.nn.OnlineNorm1d(3)(torch.randn(2, 3, 3, 3))


def test_state_dict_round_trip():
    a = torchnorm.nn.OnlineNorm2d(3)
    x = make_input((2, 3, 4, 4), torch.float32, seed=12).requires_grad_()
    a(x).sum().backward()
    assert set(a.state_dict()) == {"weight", "bias", "mu", "var", "u", "v"}
    b = torchnorm.nn.OnlineNorm2d(3)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
