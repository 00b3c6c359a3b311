"""torchnorm.fx.fuse_norms / unfuse_norms: residual add + LayerNorm/RMSNorm
and GroupNorm/BatchNorm + activation fused in traced models.

The fused model is checked against the unfused one in float64 (outputs,
input and parameter gradients, running statistics) and in float32 at the
tolerance table's float32 entries; torchvision and timm models are used when
installed.
"""
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import torchnorm
from torchnorm.fx import FusedAddNorm, FusedNormAct, fuse_norms, unfuse_norms

from conftest import assert_close, generator


def randomize(model, seed=0):
    """Norm affine parameters (1-d) and BatchNorm running statistics random
    around their init (ones and zeros would hide a wrong term); other
    parameters keep their init, so deep models keep sane activations."""
    g = generator(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
    return model


def fused_calls(gm, cls):
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], cls)]


def assert_same_training_step(fused, model, make_input, dtype):
    """One forward+backward of both (fused shares model's parameters, so
    gradients are taken in turn): outputs, input and parameter gradients,
    buffers."""
    x = make_input(dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    names = [n for n, _ in model.named_parameters()]
    out_a = fused(xa)
    fused_params = dict(fused.named_parameters())
    grads_a = torch.autograd.grad(out_a, [xa] + [fused_params[n] for n in names], torch.cos(out_a),
                                  allow_unused=True)
    buffers_a = {k: v.clone() for k, v in fused.state_dict().items()}
    model.load_state_dict(state)  # running statistics as before the fused step
    out_b = model(xb)
    grads_b = torch.autograd.grad(out_b, [xb] + list(model.parameters()), torch.cos(out_b), allow_unused=True)
    assert_close(out_a, out_b, dtype, "forward", "output")
    for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        assert (ga is None) == (gb is None), i
        if ga is not None:
            assert_close(ga, gb, dtype, "grad", f"gradient {i}")
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(buffers_a[k], v), k
        else:
            assert_close(buffers_a[k], v, dtype, "stats", k)


def check_fusion(model, make_input, add_norms, norm_acts):
    """fuse_norms(model): the expected numbers of fused calls, the same
    state_dict keys and shared parameters, the same training step (float64,
    float32, train and eval), and unfuse_norms back to the same function."""
    for dtype in (torch.float64, torch.float32):
        original = randomize(copy.deepcopy(model)).to(dtype)
        fused = fuse_norms(original)
        assert len(fused_calls(fused, FusedAddNorm)) == add_norms, fused.code
        assert len(fused_calls(fused, FusedNormAct)) == norm_acts, fused.code
        # The same keys (a GraphModule orders its submodules by first use).
        assert sorted(fused.state_dict()) == sorted(original.state_dict())
        params = dict(original.named_parameters())
        assert all(p is params[n] for n, p in fused.named_parameters())
        for training in (True, False):
            fused.train(training)
            original.train(training)
            assert_same_training_step(fused, original, make_input, dtype)
        back = unfuse_norms(fused)
        assert not fused_calls(back, (FusedAddNorm, FusedNormAct))
        assert sorted(back.state_dict()) == sorted(original.state_dict())
        back.train()
        original.train()
        assert_same_training_step(back, original, make_input, dtype)


def tokens(shape=(2, 5, 16)):
    def make(dtype):
        return torch.randn(*shape, generator=generator(3), dtype=torch.float64).to(dtype)
    return make


def images(shape=(2, 8, 5, 5)):
    def make(dtype):
        return (torch.randn(*shape, generator=generator(3), dtype=torch.float64) * 2 + 0.5).to(dtype)
    return make


class PreNormBlock(nn.Module):
    """A hand-written pre-norm transformer block: x + attn(norm1(x)), then +
    mlp(norm2(.)); norm2 normalizes a residual add, whose sum goes on."""

    def __init__(self, dim=16, heads=4, norm=nn.LayerNorm):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = norm(dim), norm(dim), norm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(att)
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.norm3(x)  # the final norm of the residual stream, fused too


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm, torchnorm.nn.LayerNorm, torchnorm.nn.RMSNorm],
                         ids=["LayerNorm", "RMSNorm", "torchnorm.LayerNorm", "torchnorm.RMSNorm"])
def test_pre_norm_block(norm):
    check_fusion(PreNormBlock(norm=norm), tokens(), add_norms=2, norm_acts=0)


def test_pre_norm_block_converted_transformers_rms_norm():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    model = torchnorm.convert(PreNormBlock(norm=lambda d: llama.LlamaRMSNorm(d, eps=1e-5)))
    check_fusion(model, tokens(), add_norms=2, norm_acts=0)


class Broadcasting(nn.Module):
    """Adds the fused op does not take: a broadcast position embedding (fused
    call, which adds first, then normalizes) and an add with alpha (left)."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 5, 16))
        self.norm1, self.norm2 = nn.LayerNorm(16), nn.LayerNorm(16)

    def forward(self, x):
        y = self.norm1(x + self.pos)
        return self.norm2(torch.add(y, x, alpha=2.0)) + y


def test_broadcast_add_falls_back_and_add_with_alpha_is_left():
    check_fusion(Broadcasting(), tokens(), add_norms=1, norm_acts=0)


class NormAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gn, self.bn, self.bn1d = nn.GroupNorm(4, 8), nn.BatchNorm2d(8), nn.BatchNorm1d(8)
        self.act = nn.SiLU()

    def forward(self, x):
        x = self.act(self.gn(self.conv(x)))
        x = F.leaky_relu(self.bn(x), 0.2)
        x = self.bn1d(x.flatten(2)).relu()
        y = self.gn(x.reshape(-1, 8, 5, 5))  # used twice: left alone
        return torch.relu(y) + y


def test_norm_activation():
    check_fusion(NormAct(), images(), add_norms=0, norm_acts=3)
    fused = fuse_norms(NormAct())
    acts = {c.norm_name: (c.activation, c.negative_slope) for c in fused.modules() if isinstance(c, FusedNormAct)}
    assert acts == {"gn": ("silu", 0.01), "bn": ("leaky_relu", 0.2), "bn1d": ("relu", 0.01)}


def test_nothing_to_fuse_and_not_fused():
    with pytest.raises(ValueError, match="found no residual add"):
        fuse_norms(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="expected a GraphModule made by fuse_norms"):
        unfuse_norms(fx.symbolic_trace(nn.Linear(4, 4)))


@pytest.mark.slow
def test_torchvision_resnet():
    models = pytest.importorskip("torchvision.models")
    model = models.resnet18(num_classes=10)
    # bn1 + relu of the stem and of every BasicBlock (8); bn2 feeds the residual add.
    # (64x64, batch 4: at 32x32, batch 2, layer4's training BatchNorms see 2
    # values per channel, and their backward amplifies rounding 1e4-fold.)
    check_fusion(model, images((4, 3, 64, 64)), add_norms=0, norm_acts=9)


def test_timm_vit_block():
    vit = pytest.importorskip("timm.models.vision_transformer")
    model = nn.Sequential(vit.Block(dim=16, num_heads=4), vit.Block(dim=16, num_heads=4))
    torchnorm.convert(model)  # timm's LayerNorm -> torchnorm's (fuse_norms fuses only what it knows)
    # norm1 of the second block and norm2 of both normalize a residual add.
    check_fusion(model, tokens(), add_norms=3, norm_acts=0)
