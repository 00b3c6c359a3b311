"""torchnorm.convert on tiny configs of real models (transformers Llama,
Gemma, T5, BERT; diffusers UNet2DModel; timm ConvNeXt): what is swapped, a
few SGD steps of the converted model equal the original's, state_dict keys
unchanged, and the way back.

Models run in float64. The transformers/diffusers RMSNorms compute in float32
whatever the input, so those models are compared at float32's tolerances;
the others (torch.nn's LayerNorm/GroupNorm, timm's) at float64's, loosened
by the steps' growth (see STEP_TOLERANCE)."""
import copy

import pytest
import torch

import torchnorm

from conftest import assert_close, generator

# Parameters after 3 SGD steps: each step's error is the forward/backward
# error times the learning rate, and they add up; a float64 model is
# compared at float32's "grad" entry when its norms compute in float32.
STEPS, LR = 3, 0.05


def _tokens(vocab, shape=(2, 12)):
    return lambda: (torch.randint(0, vocab, shape, generator=generator(5)),)


def _images(c, hw, n=2):
    return lambda: (torch.randn(n, c, hw, hw, generator=generator(5), dtype=torch.float64),)


def llama():
    t = pytest.importorskip("transformers")
    cfg = t.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return t.LlamaForCausalLM(cfg), _tokens(64), lambda out: out.logits, "LlamaRMSNorm", 5


def gemma():
    t = pytest.importorskip("transformers")
    cfg = t.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
    return t.GemmaForCausalLM(cfg), _tokens(64), lambda out: out.logits, "GemmaRMSNorm", 5


def t5():
    t = pytest.importorskip("transformers")
    cfg = t.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0)
    return t.T5EncoderModel(cfg), _tokens(64), lambda out: out.last_hidden_state, "T5LayerNorm", 5


def bert():
    t = pytest.importorskip("transformers")
    cfg = t.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return t.BertModel(cfg, add_pooling_layer=False), _tokens(64), lambda out: out.last_hidden_state, "LayerNorm", 5


def unet():
    d = pytest.importorskip("diffusers")
    model = d.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                          layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    images = _images(3, 8)
    return (model, lambda: images() + (torch.tensor([10, 500]),), lambda out: out.sample, "GroupNorm",
            sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()))


def convnext():
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    return model, _images(3, 32), lambda out: out, "LayerNorm", sum(
        "LayerNorm" in type(m).__name__ for m in model.modules())


MODELS = {"llama": llama, "bert": bert, "gemma": gemma, "t5": t5, "unet": unet, "convnext": convnext}
FLOAT32_INSIDE = {"llama", "gemma", "t5"}  # RMSNorms computing in float32
SLOW = {"gemma", "t5", "unet", "convnext"}


def _sgd_steps(model, make_inputs, output_of):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        out = output_of(model(*make_inputs()))
        loss = (out * torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else [])
                                  for n in MODELS])
def test_converted_model_trains_like_the_original(name):
    torch.manual_seed(0)
    model, make_inputs, output_of, norm_name, expected = MODELS[name]()
    model = model.double().train()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    converted, report = torchnorm.convert(model, report=True)
    assert len(report.swapped) == expected, str(report)
    assert all(norm_name in src for _, src, _ in report.swapped), str(report)
    assert list(converted.state_dict()) == keys

    dtype = torch.float32 if name in FLOAT32_INSIDE else torch.float64
    out_a = _sgd_steps(converted, make_inputs, output_of)
    out_b = _sgd_steps(original, make_inputs, output_of)
    assert_close(out_a, out_b, dtype, "grad", "output of the last step")
    for (n, p), (_, q) in zip(converted.named_parameters(), original.named_parameters()):
        assert_close(p, q, dtype, "grad", n)

    back = torchnorm.convert(converted, back=True)
    for (n, m), (_, o) in zip(back.named_modules(), original.named_modules()):
        assert type(m) is type(o), n
    assert list(back.state_dict()) == keys
