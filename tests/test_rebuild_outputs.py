"""The memory saving of the Conv + BN blocks is real: rebuild_outputs() frees
block outputs after forward (weakrefs) and rebuilds them bit for bit in
backward, through chains, pooling and a following conv, with on_save
reporting what is kept; a residual block saves neither its conv output nor
its (rebuildable) input; save_memory_in() enters rebuild_outputs() around a
model's forward and leaves it on error; a block output modified in place is
saved as it is, not rebuilt from a stale recipe.
"""
import contextlib
import copy
import weakref

import pytest
import torch
import torch.nn.functional as F

import torchnorm  # noqa: F401  (registers the ops)
from torchnorm.nn import rebuild_outputs, save_memory_in
from conftest import (
    ACTIVATIONS,
    SavedTensors,
    act_name,
    assert_close,
    make_conv_bn_block,
    make_input,
    randn,
    unfused_conv_bn,
)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---------------------------------------------------------------------------
# Memory: the saving really happens
# ---------------------------------------------------------------------------


def _chain(depth=4, activation="relu", seed=20):
    return [make_conv_bn_block(2, torch.float32, activation, seed=seed + i, in_channels=5, out_channels=5).train()
            for i in range(depth)]


def _run_chain(blocks, x, context):
    """Forward through the chain; returns (loss, weakrefs to each block output)
    with no Python reference left to the outputs."""
    refs = []
    h = x
    with context:
        for block in blocks:
            h = block(h)
            refs.append(weakref.ref(h))
        loss = (h * h).sum()
    del h
    return loss, refs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
def test_chain_outputs_freed_inside_rebuild_outputs(activation, dtype):
    blocks = [b.to(dtype) for b in _chain(activation=activation)]
    blocks_plain = copy.deepcopy(blocks)
    x = make_input((2, 5, 7, 9), dtype, seed=1).requires_grad_()
    x_plain = x.detach().clone().requires_grad_()

    loss, refs = _run_chain(blocks, x, rebuild_outputs())
    alive = [r() is not None for r in refs]
    # every output is freed: the next block's conv (or the loss) saved a recipe
    assert alive == [False] * len(blocks), f"block outputs kept after forward: {alive}"

    loss_plain, refs_plain = _run_chain(blocks_plain, x_plain, contextlib.nullcontext())
    alive_plain = [r() is not None for r in refs_plain]
    assert alive_plain == [True] * len(blocks), f"without rebuild_outputs every output is kept: {alive_plain}"

    # The rebuild is bit-identical, so the gradients are too.
    params = [x] + [p for b in blocks for p in b.parameters()]
    params_plain = [x_plain] + [p for b in blocks_plain for p in b.parameters()]
    grads = torch.autograd.grad(loss, params)
    grads_plain = torch.autograd.grad(loss_plain, params_plain)
    assert torch.equal(loss, loss_plain)
    for i, (got, want) in enumerate(zip(grads, grads_plain)):
        assert torch.equal(got, want), f"gradient {i} differs with rebuilt outputs"
    assert all(r() is None for r in refs_plain)


def test_chain_with_pool_between_blocks():
    """Any op that saves a block output (max_pool2d saves its input) saves the recipe."""
    a, b = _chain(depth=2, activation="silu", seed=30)
    ra, rb = copy.deepcopy(a), copy.deepcopy(b)
    x = make_input((2, 5, 8, 10), torch.float32, seed=2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with rebuild_outputs():
        h = a(x)
        first = weakref.ref(h)
        h = b(F.max_pool2d(h, 2))
        loss = (h * h).sum()
        del h
    assert first() is None, "block output saved by max_pool2d was kept"
    h = rb(F.max_pool2d(ra(x_ref), 2))
    loss_ref = (h * h).sum()
    assert torch.equal(loss, loss_ref)
    for got, want in zip(torch.autograd.grad(loss, [x, a.conv.weight, b.bn.weight]),
                         torch.autograd.grad(loss_ref, [x_ref, ra.conv.weight, rb.bn.weight])):
        assert torch.equal(got, want)


def test_rebuild_outputs_on_save_reports_what_is_kept():
    """on_save sees every tensor kept for backward: for a recipe its pre-norm
    tensor and statistics, never the block output itself."""
    a, b = _chain(depth=2, activation="relu", seed=35)
    x = make_input((2, 5, 7, 9), torch.float32, seed=3).requires_grad_()
    reported = []
    with rebuild_outputs(on_save=reported.append):
        h = a(x)
        first, first_ptr = weakref.ref(h), h.untyped_storage().data_ptr()
        out = b(h)
        del h
    assert first() is None, "block output kept with on_save"
    assert all(isinstance(t, torch.Tensor) for t in reported)
    ptrs = [t.untyped_storage().data_ptr() for t in reported]
    assert first_ptr not in ptrs, "the block output itself was reported as kept"
    # b's conv saved a's output as a recipe: a's statistics were reported
    assert any(t.shape == (5,) and t.dtype == torch.float32 for t in reported)
    assert any(t.shape == (2, 5, 7, 9) for t in reported)  # pre-norm tensors
    out.sum().backward()
    assert a.conv.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=act_name)
def test_residual_block_does_not_save_conv_output(activation):
    block = make_conv_bn_block(2, torch.float32, activation, seed=40, in_channels=5, out_channels=5).train()
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input((2, 5, 7, 9), torch.float32, seed=3).requires_grad_()
    res = make_input((2, 5, 7, 9), torch.float32, seed=4, offset=False).requires_grad_()
    with SavedTensors() as fused:
        out = block(x, residual=res)
    extra = fused.activation_sized(out.shape, [x, res, out])
    assert extra == [], f"the residual block saved {len(extra)} activation-sized tensor(s) besides x and residual"
    # the measurement sees the conv output unfused torch.nn keeps
    with SavedTensors() as unfused:
        expected = unfused_conv_bn(ref_conv, ref_bn, x, res, activation)
    assert len(unfused.activation_sized(out.shape, [x, res, expected])) >= 1
    assert_close(out, expected, torch.float32, "forward", "output")


def test_residual_block_input_is_rebuilt():
    """The ResNet tail: the residual block's input and identity are the previous
    block's output, which it saves as a recipe inside rebuild_outputs."""
    a = make_conv_bn_block(2, torch.float64, "relu", seed=50, in_channels=5, out_channels=5).train()
    b = make_conv_bn_block(2, torch.float64, "relu", seed=51, in_channels=5, out_channels=5).train()
    ra, rb = copy.deepcopy(a), copy.deepcopy(b)
    x = make_input((2, 5, 7, 9), torch.float64, seed=5).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with rebuild_outputs():
        h = a(x)
        first = weakref.ref(h)
        out = b(h, residual=h)
        del h
        loss = (out * out).sum()
    assert first() is None, "the residual block kept its (rebuildable) input"
    h = unfused_conv_bn(ra.conv, ra.bn, x_ref, None, "relu")
    expected = unfused_conv_bn(rb.conv, rb.bn, h, h, "relu")
    loss_ref = (expected * expected).sum()
    assert_close(out, expected, torch.float64, "forward", "output")
    params = [x, a.conv.weight, a.bn.weight, a.bn.bias, b.conv.weight, b.bn.weight, b.bn.bias]
    params_ref = [x_ref, ra.conv.weight, ra.bn.weight, ra.bn.bias, rb.conv.weight, rb.bn.weight, rb.bn.bias]
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(loss_ref, params_ref)):
        assert_close(got, want, torch.float64, "grad", "grads")


# (id, block kwargs, input shape): the two paths of the frozen op (fold the
# weight, scale the smaller output) for a conv and a transposed conv.


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_block_followed_by_conv(training):
    """A following conv (not an element-wise op) saves the block output."""
    dtype = torch.float64
    block = make_conv_bn_block(2, dtype, "relu", seed=3)
    after = torch.nn.Conv2d(7, 4, 3, padding=1, dtype=dtype)
    ref_conv, ref_bn, ref_after = (copy.deepcopy(m) for m in (block.conv, block.bn, after))
    for m in (block, ref_conv, ref_bn):
        m.train(training)
    x = make_input((2, 5, 7, 9), dtype, seed=4).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with rebuild_outputs():
        out = block(x)
        out_ref = weakref.ref(out)
        loss = after(out).square().sum()
        del out
    assert (out_ref() is None) == training
    expected = ref_after(unfused_conv_bn(ref_conv, ref_bn, x_ref, None, "relu")).square().sum()
    assert_close(loss, expected, dtype, "forward", "loss")
    params = [x, block.conv.weight, block.bn.weight, block.bn.bias, after.weight]
    params_ref = [x_ref, ref_conv.weight, ref_bn.weight, ref_bn.bias, ref_after.weight]
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params_ref)):
        assert_close(got, want, dtype, "grad", "grads")


# ---------------------------------------------------------------------------
# save_memory_in
# ---------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self, fail=False):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_chain(depth=3, activation="relu", seed=80))
        self.fail = fail

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        if self.fail:
            raise RuntimeError("forward failed on purpose")
        return (x * x).sum()


def _outputs_alive(net, x):
    """Runs net(x); returns the loss and which block outputs are still alive."""
    refs = []
    handles = [b.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o))) for b in net.blocks]
    loss = net(x)
    for h in handles:
        h.remove()
    return loss, [r() is not None for r in refs]


def _a_block_output_outside_is_kept():
    """True when no rebuild_outputs context is left active: a block output
    saved by a later op is kept as itself."""
    block = make_conv_bn_block(2, torch.float32, "relu", seed=90).train()
    out = block(make_input((2, 5, 4, 4), torch.float32, seed=1))
    ref = weakref.ref(out)
    loss = (out * out).sum()  # noqa: F841  (keeps the graph alive)
    del out
    return ref() is not None


def test_save_memory_in():
    net = _Net()
    plain = copy.deepcopy(net)
    keys = list(net.state_dict())
    assert save_memory_in(net) is net
    assert save_memory_in(net) is net  # twice: harmless, hooks registered once
    assert len(net._forward_pre_hooks) == 1 and len(net._forward_hooks) == 1
    assert list(net.state_dict()) == keys
    x = make_input((2, 5, 7, 9), torch.float32, seed=10).requires_grad_()
    x_plain = x.detach().clone().requires_grad_()

    loss, alive = _outputs_alive(net, x)
    assert alive == [False, False, False], f"save_memory_in: block outputs kept after forward: {alive}"
    loss_plain, alive_plain = _outputs_alive(plain, x_plain)
    assert alive_plain == [True, True, True]
    assert _a_block_output_outside_is_kept(), "rebuild_outputs still active after the forward"

    # entered once per forward even after two calls: the forward still works
    # and the gradients are those of the plain model, bit for bit
    assert torch.equal(loss, loss_plain)
    params = [x] + list(net.parameters())
    params_plain = [x_plain] + list(plain.parameters())
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(loss_plain, params_plain)):
        assert torch.equal(got, want)
    net.load_state_dict(plain.state_dict())  # same keys both ways
    plain.load_state_dict(net.state_dict())


def test_save_memory_in_exits_on_error():
    net = save_memory_in(_Net(fail=True))
    with pytest.raises(RuntimeError, match="on purpose"):
        net(make_input((2, 5, 7, 9), torch.float32, seed=11).requires_grad_())
    assert _a_block_output_outside_is_kept(), "rebuild_outputs left active by a failing forward"
    net.fail = False
    loss, alive = _outputs_alive(net, make_input((2, 5, 7, 9), torch.float32, seed=12).requires_grad_())
    assert alive == [False, False, False]
    loss.backward()


# ---------------------------------------------------------------------------
# Block outputs modified in place
# ---------------------------------------------------------------------------

INPLACE = {
    "add_": lambda out, s: out.add_(1.5),
    "view-mul_": lambda out, s: (out[:, 1:3].mul_(-2.0), out)[1],
    "mul_-param": lambda out, s: out.mul_(s),
    "sigmoid_": lambda out, s: out.sigmoid_(),  # saves its (changed) result
    "no_grad-add_": lambda out, s: _no_grad(out.add_, 0.75),
}


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


@pytest.mark.parametrize("activation", ["silu", "leaky_relu"])
@pytest.mark.parametrize("op", list(INPLACE))
def test_inplace_modified_output(op, activation):
    """A block output changed in place before a later op saves it is saved as
    it is, not rebuilt from its (stale) recipe."""
    dtype = torch.float64
    block = make_conv_bn_block(2, dtype, activation, seed=95).train()
    ref_conv, ref_bn = copy.deepcopy(block.conv), copy.deepcopy(block.bn)
    x = make_input((2, 5, 7, 9), dtype, seed=13).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    s = randn((1, 7, 1, 1), 14, dtype, scale=0.5, offset=1.0).requires_grad_()
    s_ref = s.detach().clone().requires_grad_()
    g = make_input((2, 7, 7, 9), dtype, seed=15, offset=False)
    with rebuild_outputs():
        out = block(x)
        out = INPLACE[op](out, s)
        loss = (out * out * g).sum()
    expected = INPLACE[op](unfused_conv_bn(ref_conv, ref_bn, x_ref, None, activation), s_ref)
    loss_ref = (expected * expected * g).sum()
    assert_close(out, expected, dtype, "forward", op)
    params = [x, s, block.conv.weight, block.bn.weight, block.bn.bias]
    params_ref = [x_ref, s_ref, ref_conv.weight, ref_bn.weight, ref_bn.bias]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    want = torch.autograd.grad(loss_ref, params_ref, allow_unused=True)
    for name, a, b in zip(["x", "s", "conv.weight", "bn.weight", "bn.bias"], got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(a, b, dtype, "grad", f"{op}: grad of {name}")
