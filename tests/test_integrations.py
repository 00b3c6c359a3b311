"""Fusion in layers torch.fx cannot trace or in submodules it can:
torchnorm.integrations.transformers.apply / remove (residual add +
post-attention norm of decoder layers), torchnorm.integrations.diffusers.apply
/ remove (ResNet blocks' GroupNorm + SiLU), and torchnorm.fx.fuse_norms_in /
unfuse_norms_in (BERT's residual add + LayerNorm blocks).

Fused models are checked against the originals in float64 (outputs and every
parameter gradient): at float32's tolerances where the library's norms
compute in float32 (transformers' RMSNorms), else at float64's."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import torchnorm
from torchnorm.fx import fuse_norms_in, unfuse_norms_in
from torchnorm.integrations import _rewrite

from conftest import assert_close, generator


def assert_same_step(fused, original, inputs, output_of, dtype):
    outs = []
    for model in (fused, original):
        model.zero_grad()
        out = output_of(model(*inputs))
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
        outs.append(out)
    assert_close(outs[0], outs[1], dtype, "forward", "output")
    for (n, p), (_, q) in zip(fused.named_parameters(), original.named_parameters()):
        if q.grad is not None:
            assert_close(p.grad, q.grad, dtype, "grad", n)


def tokens():
    return (torch.randint(0, 64, (2, 12), generator=generator(5)),)


def _causal_lm(name):
    t = pytest.importorskip("transformers")
    config_cls, model_cls = {"llama": (t.LlamaConfig, t.LlamaForCausalLM), "mistral": (t.MistralConfig,
                             t.MistralForCausalLM), "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM)}[name]
    cfg = config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return model_cls(cfg).double()


@pytest.mark.parametrize("name", ["llama", pytest.param("mistral", marks=pytest.mark.slow),
                                  pytest.param("qwen2", marks=pytest.mark.slow)])
def test_transformers_apply_and_remove(name):
    import torchnorm.integrations.transformers as integration

    model = _causal_lm(name)
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    layers = integration.apply(model)
    assert layers == ["model.layers.0", "model.layers.1"]
    layer_cls = type(original.model.layers[0])
    assert all(type(model.get_submodule(n)).__bases__[0] is layer_cls for n in layers)
    assert list(model.state_dict()) == keys
    assert_same_step(model, original, tokens(), lambda out: out.logits, torch.float32)
    assert integration.remove(model) == layers
    assert all(type(model.get_submodule(n)) is layer_cls for n in layers)
    assert list(model.state_dict()) == keys
    assert_same_step(model, original, tokens(), lambda out: out.logits, torch.float32)


def test_transformers_apply_refuses_unknown_layer_naming_it():
    t = pytest.importorskip("transformers")
    import torchnorm.integrations.transformers as integration

    cfg = t.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64)
    model = t.BertModel(cfg)
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"modeling_bert\.Bert\w+: its forward is not recognized"):
        integration.apply(model)
    assert [type(m) for m in model.modules()] == classes  # refused before changing anything
    with pytest.raises(ValueError, match="lists no layer classes"):
        integration.apply(nn.Sequential(nn.Linear(2, 2)))


def _unet():
    d = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return d.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                         layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D")).double()


def test_diffusers_apply_and_remove():
    import torchnorm.integrations.diffusers as integration

    model = _unet()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    blocks = integration.apply(model)
    assert len(blocks) == 8 and all(".resnets." in b for b in blocks)
    assert list(model.state_dict()) == keys
    g = generator(5)
    inputs = (torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([3, 500]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_step(model, original, inputs, lambda out: out.sample, torch.float64)
        assert integration.remove(model) == blocks
        assert not any("_tn_rule" in type(m).__dict__ for m in model.modules())
        assert_same_step(model, original, inputs, lambda out: out.sample, torch.float64)


class FakeBlock(nn.Module):
    """A block with the statements in an if, and one without them."""

    def __init__(self, act=None):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(2, 4), nn.LayerNorm(4)
        self.act = act or nn.SiLU()

    def forward(self, x, flag: bool = True):
        if flag:
            x = self.norm1(x)
            x = self.act(x)
        h = x.transpose(1, 3)
        r = h.cos()
        h = r + h
        r = h
        h = self.norm2(h)
        return h + r.sin()


class NotABlock(nn.Module):
    def forward(self, x):
        return x * 2


@pytest.mark.parametrize("act", [nn.SiLU(), nn.ReLU(), nn.LeakyReLU(0.3), nn.GELU()], ids=str)
def test_rewriter_rules(act):
    for rule in _rewrite.RULES:
        model = nn.Sequential(FakeBlock(act)).double()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator(1), dtype=torch.float64) * 0.3)
        original = copy.deepcopy(model)
        torchnorm.convert(model)
        assert _rewrite.apply_rule(model, lambda m: isinstance(m, FakeBlock), rule) == ["0"]
        x = torch.randn(2, 4, 3, 4, generator=generator(2), dtype=torch.float64)
        assert_same_step(model, original, (x,), lambda out: out, torch.float64)
        assert _rewrite.remove_rule(model, rule) == ["0"] and type(model[0]) is FakeBlock
    with pytest.raises(ValueError, match=r"NotABlock: its forward is not recognized \(no norm act"):
        _rewrite.apply_rule(nn.Sequential(NotABlock()), lambda m: isinstance(m, NotABlock), "norm_act")


def test_fuse_norms_in_bert():
    t = pytest.importorskip("transformers")
    cfg = t.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = t.BertModel(cfg, add_pooling_layer=False).double()
    original = copy.deepcopy(model)
    torchnorm.convert(model)
    before = dict(model.named_modules())
    fused = fuse_norms_in(model)
    # The residual add + LayerNorm blocks; the embeddings (optional arguments) are left.
    assert fused == [f"encoder.layer.{i}.{b}" for i in range(2) for b in ("attention.output", "output")]
    assert sorted(model.state_dict()) == sorted(original.state_dict())
    assert_same_step(model, original, tokens(), lambda out: out.last_hidden_state, torch.float64)
    assert sorted(unfuse_norms_in(model)) == sorted(fused)
    assert all(model.get_submodule(n) is before[n] for n in fused)
