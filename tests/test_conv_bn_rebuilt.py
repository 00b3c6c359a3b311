"""Memory-efficient Conv+BN training as a property of the ops (docs/conv_bn.md):
fuse_conv_bn's blocks hand their recipes to the next blocks, whose ops
(torchnorm/_rebuild_ops.py) keep the recipe and rebuild the block output in
backward, all through ordinary save_for_backward. Shown here: the memory
contract on ResNet-50 (training <= 60%, frozen BN <= 70% of the unfused
model's kept bytes), that a user's saved-tensor hooks see (and may offload)
every tensor the fused model keeps, that a checkpointed fused stage keeps
nothing, and that torch.compile(fullgraph=True) traces the fused model with
gradients and running statistics equal to eager.
"""
import copy
import gc

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import torchnorm  # noqa: F401  (registers the ops)
from torchnorm.fx import fuse_conv_bn, unfuse_conv_bn
from conftest import assert_close, make_input
from test_fx_passes import _Allocations, _bytes_kept_after_forward

torchvision = pytest.importorskip("torchvision")


def _freeze_bn(model, frozen=True):
    """BatchNorm in eval mode when frozen; dropout off always (its random
    masks differ between eager and compiled runs)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train(not frozen)
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()
    return model


def _model(name, frozen=False, dtype=torch.float32, source=None):
    torch.manual_seed(0)
    factory = getattr(source or torchvision.models, name)
    model = factory(num_classes=10).to(dtype).train()
    return _freeze_bn(model, frozen)


@pytest.mark.parametrize("frozen, limit", [(False, 0.60), pytest.param(True, 0.70, marks=pytest.mark.slow)],
                         ids=["train", "frozen"])
def test_resnet50_memory_contract(frozen, limit):
    """Bytes of what autograd keeps after forward (the tensors the forward
    made that are still alive), fused against unfused: no saved-tensor hooks
    are involved."""
    model = _model("resnet50", frozen)
    x = make_input((2, 3, 64, 64), torch.float32, seed=1)
    unfused = _bytes_kept_after_forward(copy.deepcopy(model), x)
    fused = _bytes_kept_after_forward(fuse_conv_bn(copy.deepcopy(model)), x)
    assert fused <= limit * unfused, f"fused keeps {fused / unfused:.3f}x the unfused model's bytes"


class _Offloader:
    """A user's saved-tensor hooks that move every saved tensor away (a copy,
    as save_on_cpu copies a GPU tensor to the host) and give backward the
    copy; it records the bytes it saw."""

    def __init__(self):
        self.store = []

    def pack(self, t):
        self.store.append(t.detach().clone())
        return len(self.store) - 1

    def unpack(self, i):
        return self.store[i]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def nbytes(self):
        return sum(t.untyped_storage().nbytes() for t in self.store)


def _alive_after(run, model, x):
    """(result of run(), bytes of the storages run made that are alive after
    it, less the result's and those of the model's parameters and buffers and
    of the input x (ops return views of those))."""
    tracker = _Allocations()
    with tracker:
        out = run()
    gc.collect()
    skip = {out.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()}
    skip |= {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    alive = sum(n for ptr, (ref, n) in tracker.storages.items() if ptr not in skip and not ref.expired())
    return out, alive


@pytest.mark.parametrize("frozen", [False, True], ids=["train", "frozen"])
def test_user_hooks_see_everything_the_fused_model_keeps(frozen):
    """Under the user's offloading hooks, everything the forward made and
    that is still alive is the hooks' copies: the fused model keeps nothing
    behind their back. Backward from the copies gives the gradients of a
    plain fused step. The hooks see the memory saving too."""
    model = _model("resnet18", frozen, torch.float64)
    fused = fuse_conv_bn(copy.deepcopy(model))
    reference = fuse_conv_bn(copy.deepcopy(model))
    x = make_input((2, 3, 64, 64), torch.float64, seed=2)
    offload = _Offloader()

    def run():
        with offload.hooks():
            return fused(x)

    out, alive = _alive_after(run, fused, x)
    assert offload.store, "the hooks saw nothing"
    assert alive == offload.nbytes(), f"{alive - offload.nbytes()} bytes kept that the user's hooks did not see"
    out.square().sum().backward()
    reference(x).square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, torch.float64, "grad", name)

    unfused = _Offloader()
    with unfused.hooks():
        copy.deepcopy(model)(x)
    # Both stores hold copies of the parameters the convs save; compare the
    # activations: everything but copies of parameter-shaped tensors.
    shapes = {tuple(p.shape) for p in model.parameters()}
    acts = [sum(t.untyped_storage().nbytes() for t in o.store if tuple(t.shape) not in shapes)
            for o in (offload, unfused)]
    assert acts[0] <= (0.70 if frozen else 0.80) * acts[1], acts


def test_save_on_cpu_trains_like_eager():
    """torch.autograd.graph.save_on_cpu over a fused model: the same gradients."""
    model = _model("resnet18", dtype=torch.float64)
    fused, reference = fuse_conv_bn(copy.deepcopy(model)), fuse_conv_bn(copy.deepcopy(model))
    x = make_input((2, 3, 32, 32), torch.float64, seed=3)
    with torch.autograd.graph.save_on_cpu():
        out = fused(x)
    out.square().sum().backward()
    reference(x).square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, torch.float64, "grad", name)


@pytest.mark.parametrize("frozen", [False, True], ids=["train", "frozen"])
def test_checkpointed_fused_stage_keeps_nothing(frozen):
    """A fused ResNet stage under non-reentrant checkpointing keeps nothing
    made in its forward (its input was made before), and an outer user hook
    sees nothing of it but its input; gradients and running statistics equal the
    unfused stage's."""
    model = _model("resnet18", frozen, torch.float64)
    stage = fuse_conv_bn(copy.deepcopy(model.layer2))
    reference = copy.deepcopy(model.layer2)
    x = make_input((2, 64, 16, 16), torch.float64, seed=4).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    seen = []

    def run():
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.untyped_storage().data_ptr()) or t,
                                                         lambda t: t)
        with hooks, torch.utils.checkpoint.set_checkpoint_early_stop(False):
            return checkpoint(stage, x, use_reentrant=False)

    out, alive = _alive_after(run, stage, x)
    assert alive == 0, f"the checkpointed stage keeps {alive} bytes"
    inputs = {x.untyped_storage().data_ptr()}
    assert set(seen) <= inputs, f"an outer hook saw {len(set(seen) - inputs)} tensors of a checkpointed stage"
    # The unfused stage checkpointed too: the recomputation in backward
    # updates the running statistics a second time, for torch.nn's
    # BatchNorm as for the fused blocks. Without early stopping: with it, the
    # recomputation stops once the last saved tensor is made, which for the
    # stage's last fused block (conv_bn_train_rebuilt, functional, its
    # running statistics copied in after it) is before that second update
    # (docs/conv_bn.md).
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        out.square().sum().backward()
        expected = checkpoint(reference, x_ref, use_reentrant=False)
        expected.square().sum().backward()
    assert_close(out, expected, torch.float64, "forward", "output")
    assert_close(x.grad, x_ref.grad, torch.float64, "grad", "input")
    for (name, p), q in zip(stage.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, torch.float64, "grad", name)
    for (name, b), c in zip(stage.named_buffers(), reference.buffers()):
        assert_close(b, c, torch.float64, "stats", name)


def _compiled_steps_match_eager(model, x, steps=2, backend="aot_eager"):
    """Trains copies of the fused model eagerly and compiled with
    fullgraph=True; compares outputs, gradients and buffers each step."""
    eager = fuse_conv_bn(copy.deepcopy(model))
    compiled_model = fuse_conv_bn(copy.deepcopy(model))
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    for step in range(steps):
        for m in (eager, compiled_model):
            m.zero_grad()
        out, out_c = eager(x), compiled(x)
        assert_close(out_c, out, x.dtype, "forward", f"output, step {step}")
        out.square().sum().backward()
        out_c.square().sum().backward()
        for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
            assert_close(q.grad, p.grad, x.dtype, "grad", f"{name}, step {step}")
        for (name, b), c in zip(eager.named_buffers(), compiled_model.buffers()):
            assert_close(c, b, x.dtype, "stats", f"{name}, step {step}")


@pytest.mark.parametrize("frozen", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["train", "frozen"])
def test_compile_fullgraph_resnet18(frozen):
    """torch.compile(fuse_conv_bn(resnet18), fullgraph=True) traces (no graph
    break) and trains as eager (AOTAutograd's graphs run eagerly here; the
    inductor runs are the slow tests below)."""
    torch._dynamo.reset()
    model = _model("resnet18", frozen, torch.float64)
    _compiled_steps_match_eager(model, make_input((2, 3, 32, 32), torch.float64, seed=5))


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [False, True], ids=["train", "frozen"])
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "timm_resnet50"])
def test_compile_fullgraph_inductor(name, frozen):
    torch._dynamo.reset()
    if name.startswith("timm_"):
        timm = pytest.importorskip("timm")
        torch.manual_seed(0)
        model = _freeze_bn(timm.create_model(name[len("timm_"):], num_classes=10).double().train(), frozen)
    else:
        model = _model(name, frozen, torch.float64)
    _compiled_steps_match_eager(model, make_input((2, 3, 64, 64), torch.float64, seed=6), backend="inductor")


def test_unfuse_drops_the_recipes():
    """The way back: the recipes' getitem nodes go, the original calls return."""
    model = _model("resnet18")
    fused = fuse_conv_bn(copy.deepcopy(model))
    assert any(getattr(m, "exports_recipe", False) for m in fused.modules())
    back = unfuse_conv_bn(fused)
    x = make_input((2, 3, 32, 32), torch.float32, seed=7)
    assert "input_recipe" not in back.code and "getitem" not in back.code
    assert_close(back.eval()(x), copy.deepcopy(model).eval()(x), torch.float32, "forward", "unfused output")


def _generator(dtype):
    """DCGAN's generator in small: ConvTranspose + BN + ReLU chains, then a
    plain ConvTranspose (no BatchNorm) and Tanh."""
    torch.manual_seed(1)
    ct = torch.nn.ConvTranspose2d
    return torch.nn.Sequential(
        ct(16, 32, 4, 1, 0, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(True),
        ct(32, 16, 4, 2, 1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(True),
        ct(16, 3, 4, 2, 1, bias=False), torch.nn.Tanh()).to(dtype).train()


def test_plain_conv_after_a_block_keeps_the_recipe():
    """The generator's last ConvTranspose keeps its input block's recipe
    (ConvOnRecipe): the fused generator keeps about half the bytes, trains
    as the unfused one, and unfuses back to it."""
    model = _generator(torch.float64)
    fused = fuse_conv_bn(copy.deepcopy(model))
    assert sum(isinstance(m, torchnorm.fx.ConvOnRecipe) for m in fused.modules()) == 1
    x = make_input((4, 16, 1, 1), torch.float64, seed=8)
    unfused_bytes = _bytes_kept_after_forward(copy.deepcopy(model), x)
    fused_bytes = _bytes_kept_after_forward(copy.deepcopy(fused), x)
    assert fused_bytes <= 0.6 * unfused_bytes, (fused_bytes, unfused_bytes)
    reference = copy.deepcopy(model)
    out, expected = fused(x), reference(x)
    assert_close(out, expected, torch.float64, "forward", "output")
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, torch.float64, "grad", name)
    back = unfuse_conv_bn(fused)
    assert not any(isinstance(m, torchnorm.fx.ConvOnRecipe) for m in back.modules())
    assert "input_recipe" not in back.code
    assert_close(back(x), model(x), torch.float64, "forward", "unfused output")


@pytest.mark.parametrize("frozen", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["train", "frozen"])
def test_compile_inductor_channels_last(frozen):
    """The Conv+BN ops take tensors in any layout (Tag.flexible_layout), so
    inductor hands them its channels-last convolution outputs as they are
    instead of copying each to NCHW and back (which took 47 ms of a 440 ms
    compiled ResNet-50 step on the CPU). Inductor checks every op output's
    strides against the fake kernel's, so a channels-last run that matches
    eager also shows that the fake kernels give the real layouts."""
    conv_bn_ops = ["batch_norm_train", "batch_norm_eval", "batch_norm_apply", "batch_norm_backward",
                   "conv_bn_frozen", "conv_bn_frozen_backward", "conv_bn_train", "conv_bn_train_backward",
                   "conv_rebuilt_input", "conv_bn_train_rebuilt"]
    for name in conv_bn_ops:
        assert torch.Tag.flexible_layout in getattr(torch.ops.torchnorm, name).default.tags, name
    torch._dynamo.reset()
    model = _model("resnet18", frozen, torch.float64).to(memory_format=torch.channels_last)
    x = make_input((2, 3, 32, 32), torch.float64, seed=7).contiguous(memory_format=torch.channels_last)
    _compiled_steps_match_eager(model, x, backend="inductor")
