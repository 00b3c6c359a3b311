"""Streaming Normalization (StreamingNorm1d/2d) against the float64 reference
torchnorm.reference.streaming_norm: outputs, gradients and the state over
consecutive batches with weight updates between some of them; alpha = (0, 1)
is training-mode BatchNorm; batch size 1; half inputs with float32 state;
eval uses the long-term statistics; bad input (state untouched); the
backward-twice and checkpoint hazards; state_dict; the optimizer hook.
Tolerances from tests/tolerances.py."""
import pytest
import torch
import torch.nn.functional as TF

import torchnorm
from conftest import StatsUnchanged, assert_close, expect_error, make_input
from torchnorm import reference
from torchnorm.nn.streaming_norm import _STATE

MIX = dict(alpha=(0.3, 0.7), beta=(0.2, 0.5, 0.3))  # every history term in play
SHAPES = [pytest.param((6, 3), id="NC"), pytest.param((5, 3, 7), id="NCL"), pytest.param((4, 3, 5, 6), id="NCHW")]
UPDATES_AFTER = (1, 2, 4)  # weight_update() after these batches: two batches share a short-term history


def module_for(shape, **kw):
    cls = torchnorm.nn.StreamingNorm2d if len(shape) == 4 else torchnorm.nn.StreamingNorm1d
    m = cls(shape[1], **kw)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
        m.bias.copy_(torch.linspace(-1, 1, shape[1]))
    return m


def batches(shape, count, seed):
    """(input, output gradient) pairs, float64, with means far from 0."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3,
             torch.randn(shape, generator=gen, dtype=torch.float64)) for _ in range(count)]


def step_module(m, x, dy, dtype):
    xa = x.to(dtype).clone().requires_grad_()
    y = m(xa)
    y.backward(dy.to(dtype))
    grads = xa.grad, m.weight.grad.clone(), m.bias.grad.clone()
    m.weight.grad = m.bias.grad = None
    return y, grads


def step_reference(state, m, x, dy, **kw):
    xa = x.clone().requires_grad_()
    w = m.weight.detach().double().clone().requires_grad_()
    b = m.bias.detach().double().clone().requires_grad_()
    y = reference.streaming_norm(xa, state, w, b, eps=m.eps, **kw)
    y.backward(dy)
    return y, (xa.grad, w.grad, b.grad)


def assert_state(m, state, dtype, msg):
    for name in _STATE:
        assert_close(getattr(m, name), state[name], dtype, "stats", f"{msg}: {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=["f64", "f32", "f16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_over_batches(shape, dtype):
    """Five batches, weight updates after some: outputs, input / weight / bias
    gradients and the whole state after each batch."""
    m = module_for(shape, k1=0.6, k3=0.8, **MIX)
    if dtype == torch.float64:
        m.double()
    elif dtype == torch.float16:
        m.half()
    state = reference.streaming_norm_state(shape[1])
    for i, (x, dy) in enumerate(batches(shape, 5, seed=1)):
        x, dy = x.to(dtype).double(), dy.to(dtype).double()  # the reference sees the values the module sees
        y, grads = step_module(m, x, dy, dtype)
        y_ref, grads_ref = step_reference(state, m, x, dy, **MIX)
        assert y.dtype == dtype
        assert_close(y, y_ref, dtype, "forward", f"batch {i}: output")
        for name, g, g_ref in zip(("input", "weight", "bias"), grads, grads_ref):
            assert_close(g, g_ref, dtype, "grad", f"batch {i}: {name} gradient")
        assert_state(m, state, dtype, f"batch {i}")
        if i in UPDATES_AFTER:
            m.weight_update()
            reference.streaming_norm_weight_update(state, k1=0.6, k3=0.8)
            assert_state(m, state, dtype, f"after weight update {i}")


@pytest.mark.parametrize("beta", [(0.0, 0.0, 1.0), None], ids=["current-grad", "short-grad"])
@pytest.mark.parametrize("shape", SHAPES)
def test_alpha_0_1_is_training_batch_norm(shape, beta):
    """alpha = (0, 1), float64, weight_update() after every batch (one step
    per batch): outputs and all gradients equal F.batch_norm in training mode,
    on every batch (with beta = (0, 0, 1) or the default (0, 1, 0))."""
    m = module_for(shape, alpha=(0.0, 1.0), beta=beta).double()
    for i, (x, dy) in enumerate(batches(shape, 3, seed=2)):
        y, grads = step_module(m, x, dy, torch.float64)
        xa = x.clone().requires_grad_()
        w = m.weight.detach().clone().requires_grad_()
        b = m.bias.detach().clone().requires_grad_()
        y_bn = TF.batch_norm(xa, None, None, w, b, training=True, eps=m.eps)
        grads_bn = torch.autograd.grad(y_bn, (xa, w, b), dy)
        assert_close(y, y_bn, torch.float64, "forward", f"batch {i}: output")
        for name, g, g_bn in zip(("input", "weight", "bias"), grads, grads_bn):
            assert_close(g, g_bn, torch.float64, "grad", f"batch {i}: {name} gradient")
        m.weight_update()


def test_batch_size_one_trains():
    """(1, C) input: std sqrt(eps), finite outputs and gradients, matching the
    reference over several batches and updates; alpha = (0, 1) gives the bias."""
    shape = (1, 4)
    m = module_for(shape, **MIX).double()
    state = reference.streaming_norm_state(4)
    for i, (x, dy) in enumerate(batches(shape, 4, seed=3)):
        y, grads = step_module(m, x, dy, torch.float64)
        y_ref, grads_ref = step_reference(state, m, x, dy, **MIX)
        assert_close(y, y_ref, torch.float64, "forward", f"batch {i}")
        for g, g_ref in zip(grads, grads_ref):
            assert torch.isfinite(g).all()
            assert_close(g, g_ref, torch.float64, "grad", f"batch {i}")
        assert_close(m.short_stats[1], torch.full((4,), 1e-5 ** 0.5, dtype=torch.float64), torch.float64, "stats")
        m.weight_update()
        reference.streaming_norm_weight_update(state)
    bn_like = module_for(shape, alpha=(0.0, 1.0))
    x = make_input(shape, torch.float32, seed=4)
    assert_close(bn_like(x), bn_like.bias.detach().expand(shape), torch.float32, "forward")


def test_channels_last_matches_contiguous():
    """The op keeps a channels-last input in its layout (BatchNorm's rowwise
    passes): the same outputs, gradients and state as the contiguous input."""
    shape = (3, 4, 5, 6)
    mods = [module_for(shape, **MIX) for _ in range(2)]
    for i, (x, dy) in enumerate(batches(shape, 3, seed=19)):
        results = []
        for m, fmt in zip(mods, (torch.contiguous_format, torch.channels_last)):
            xa = x.float().contiguous(memory_format=fmt).requires_grad_()
            y = m(xa)
            y.backward(dy.float().contiguous(memory_format=fmt))
            results.append((y, xa.grad, m.weight.grad.clone(), m.bias.grad.clone()))
            m.weight.grad = m.bias.grad = None
        assert results[1][0].is_contiguous(memory_format=torch.channels_last)
        for a, b in zip(*results):
            assert_close(a, b, torch.float32, "forward", f"batch {i}")
        for name in _STATE:
            assert_close(getattr(mods[1], name), getattr(mods[0], name), torch.float32, "stats", name)
        if i == 1:
            for m in mods:
                m.weight_update()


def test_op_refuses_a_bad_history_and_leaves_the_state():
    """The op checks every history before it writes any: a wrong shape or a
    half-precision history raises, naming it, and nothing changes."""
    m = torchnorm.nn.StreamingNorm1d(3)
    state = [getattr(m, name) for name in _STATE]
    x = make_input((4, 3), torch.float32, seed=20)
    for index, bad, match in ((2, torch.zeros(2, 4), "long_stats of shape"),
                              (7, torch.zeros(1), "grad_long_count a 0-dim"),
                              (4, torch.zeros(2, 3, dtype=torch.float16), "grad_short in float32 or float64")):
        args = list(state)
        args[index] = bad
        guard = StatsUnchanged(*state)
        expect_error(lambda: torch.ops.torchnorm.streaming_norm(x, None, None, *args, 0.5, 0.5, 0.5, 0.5, 0.0, 1e-5),
                     match, guard)


def test_half_keeps_float32_state():
    m = torchnorm.nn.StreamingNorm2d(3).half()
    assert m.weight.dtype == torch.float16
    assert all(getattr(m, name).dtype == torch.float32 for name in _STATE)
    x = make_input((2, 3, 4, 4), torch.float16, seed=5).requires_grad_()
    m(x).sum().backward()
    m.weight_update()
    assert all(getattr(m, name).dtype == torch.float32 for name in _STATE)
    assert x.grad.dtype == torch.float16


def test_eval_uses_long_term_statistics():
    m = module_for((4, 3), **MIX)
    shape = [1, -1]
    x = make_input((5, 3), torch.float32, seed=6)
    m.eval()  # before any weight update: the initial long-term mean 0, std 1
    assert_close(m(x), x * m.weight.detach() + m.bias.detach(), torch.float32, "forward")
    m.train()
    for seed in (7, 8):
        m(make_input((4, 3), torch.float32, seed=seed)).sum().backward()
        m.weight_update()
    m(make_input((4, 3), torch.float32, seed=9))  # a short-term history that eval must ignore
    snapshot = {name: getattr(m, name).clone() for name in _STATE}
    m.eval()
    xe = x.clone().requires_grad_()
    y = m(xe)
    mean, std = m.long_stats
    expected = (x - mean.view(shape)) / std.view(shape) * m.weight.detach() + m.bias.detach()
    assert_close(y, expected, torch.float32, "forward")
    y.backward(torch.ones_like(y))
    assert_close(xe.grad, (m.weight.detach() / std).expand(5, 3), torch.float32, "grad")
    assert all(torch.equal(getattr(m, n), snapshot[n]) for n in _STATE), "eval changed the state"


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.randn(2, 4, 3), "channels"),
    (lambda: torch.randn(2, 3, 3, 3), "dimensions"),
    (lambda: torch.randn(0, 3), "at least one value"),
    (lambda: torch.ones(2, 3, dtype=torch.int64), "floating-point"),
], ids=["channels", "rank", "empty", "integer"])
def test_bad_input_raises_and_leaves_the_state(bad, match):
    m = torchnorm.nn.StreamingNorm1d(3)
    m(make_input((2, 3), torch.float32, seed=10)).sum().backward()
    guard = StatsUnchanged(*(getattr(m, name) for name in _STATE))
    expect_error(lambda: m(bad()), match, guard)


@pytest.mark.parametrize("kw,match", [(dict(alpha=(1.0,)), "alpha"), (dict(beta=(1.0, 0.0)), "beta"),
                                      (dict(k1=1.5), "k1"), (dict(eps=0.0), "eps")])
def test_bad_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        torchnorm.nn.StreamingNorm1d(3, **kw)


def test_backward_twice_raises_and_leaves_the_state():
    m = torchnorm.nn.StreamingNorm1d(2)
    y = m(make_input((3, 2, 4), torch.float32, seed=11).requires_grad_())
    y.sum().backward(retain_graph=True)
    after_first = [m.grad_short.clone(), m.grad_short_count.clone()]
    with pytest.raises(RuntimeError, match="backward already ran"):
        y.sum().backward()
    assert torch.equal(m.grad_short, after_first[0]) and torch.equal(m.grad_short_count, after_first[1])


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recomputation_raises(use_reentrant):
    from torch.utils.checkpoint import checkpoint
    m = torchnorm.nn.StreamingNorm2d(2)
    out = checkpoint(m, make_input((2, 2, 3, 3), torch.float32, seed=12).requires_grad_(),
                     use_reentrant=use_reentrant)
    before = m.short_stats.clone(), m.short_count.clone()
    with pytest.raises(RuntimeError, match="inside a backward pass"):
        out.sum().backward()
    assert torch.equal(m.short_stats, before[0]) and torch.equal(m.short_count, before[1])


def test_state_dict_round_trip():
    a = torchnorm.nn.StreamingNorm2d(3)
    for seed in (13, 14):
        a(make_input((2, 3, 4, 4), torch.float32, seed=seed)).sum().backward()
        a.weight_update()
    a(make_input((2, 3, 4, 4), torch.float32, seed=15)).sum().backward()
    assert set(a.state_dict()) == {"weight", "bias", *_STATE}
    b = torchnorm.nn.StreamingNorm2d(3)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    x = make_input((2, 3, 4, 4), torch.float32, seed=16)
    assert torch.equal(a(x), b(x))  # training: the same histories give the same output
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))


def test_optimizer_hook_calls_weight_update():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torchnorm.nn.StreamingNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = torchnorm.nn.streaming_norm_hook(opt, model)
    norm = model[1]
    model(make_input((5, 4), torch.float32, seed=17)).sum().backward()
    short = norm.short_stats.clone()
    opt.step()
    assert norm.long_count.item() == 1 and norm.short_count.item() == 0
    assert torch.equal(norm.long_stats, short), "the first weight update sets long = short"
    handle.remove()
    model(make_input((5, 4), torch.float32, seed=18)).sum().backward()
    opt.step()
    assert norm.long_count.item() == 1, "a removed hook still ran"
