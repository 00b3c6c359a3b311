"""torchnorm.convert on third-party norms (transformers, diffusers, timm),
register_conversion and convert(report=True).

Each built-in conversion is checked against the library's own module
(float64 and float32: outputs, input and parameter gradients; parameters
shared; state_dict both ways; back to the library's class), then on tiny
configs of real models (a few SGD steps equal the original's). The libraries
are optional: their tests skip without them. The transformers and diffusers
norms compute in float32 even for float64 input, so a float64 model is
compared at float32's tolerance; timm's compute in the input's dtype.
"""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import torchnorm
from torchnorm.nn.convert import NotConvertible

from conftest import assert_close, assert_same_model_state, generator

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def randomize_params(model, seed=0):
    """Every parameter random around its init (Llama's ones, Gemma's zeros
    would hide a wrong scale), deterministic."""
    g = generator(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    return model


def is_torchnorm(module):
    return type(module).__module__.split(".")[0] == "torchnorm"


def run(model, inputs, output_of):
    out = output_of(model(*inputs))
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
    return out


def assert_same_function(converted, original, make_inputs, output_of, dtype, kind_dtype):
    """Outputs, gradients of the float inputs and of every parameter, judged
    at kind_dtype's tolerances."""
    a, b = make_inputs(dtype), make_inputs(dtype)
    out_a, out_b = run(converted, a, output_of), run(original, b, output_of)
    assert out_a.dtype == out_b.dtype
    assert_close(out_a, out_b, kind_dtype, "forward", "output")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.is_floating_point() and x.requires_grad:
            assert_close(x.grad, y.grad, kind_dtype, "grad", f"grad of input {i}")
    for (n, p), (_, q) in zip(converted.named_parameters(), original.named_parameters()):
        if q.grad is not None:
            assert_close(p.grad, q.grad, kind_dtype, "grad", f"{n}.grad")
    for (n, t), (_, u) in zip(converted.named_buffers(), original.named_buffers()):
        assert_close(t, u, kind_dtype, "stats", n)


def check_conversion(module, make_inputs, output_of=lambda out: out, internal_float32=True, expect_swapped=None,
                     subclass=True):
    """convert(module) against module itself in float64 and float32: output
    and gradients, parameters shared, state_dict keys and values, and back.
    With subclass, each converted module is an instance of its original's
    class (the library's isinstance checks, in weight init or fp32 module
    lists, still hold)."""
    for dtype in (torch.float64, torch.float32):
        original = randomize_params(copy.deepcopy(module).to(dtype))
        model = copy.deepcopy(original)
        params = list(model.parameters())
        converted, report = torchnorm.convert(model, report=True)
        swapped = [m for m in converted.modules() if is_torchnorm(m)]
        assert swapped, f"nothing swapped:\n{report}"
        if expect_swapped is not None:
            assert len(report.swapped) == expect_swapped, str(report)
        assert all(p is q for p, q in zip(converted.parameters(), params)), "parameters must be shared"
        assert_same_model_state(converted, original)
        for m in swapped if subclass else ():
            assert isinstance(m, type(dict(original.named_modules())[_name_of(converted, m)]))
        kind_dtype = torch.float32 if internal_float32 else dtype
        assert_same_function(converted, original, make_inputs, output_of, dtype, kind_dtype)
        back = torchnorm.convert(converted, back=True)
        assert not any(is_torchnorm(m) for m in back.modules())
        for (n, m), (_, o) in zip(back.named_modules(), original.named_modules()):
            assert type(m) is type(o), n
        assert_same_model_state(back, converted)
        back.zero_grad()
        original.zero_grad()
        assert_same_function(back, original, make_inputs, output_of, dtype, kind_dtype)


def _name_of(model, module):
    return next(n for n, m in model.named_modules() if m is module)


def rows_input(hidden, shape=(3, 5)):
    def make(dtype):
        g = generator(7)
        return (torch.randn(*shape, hidden, generator=g, dtype=torch.float64).to(dtype).requires_grad_(),)
    return make


def image_input(c, hw=6, n=2):
    def make(dtype):
        g = generator(7)
        return ((torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).requires_grad_(),)
    return make


def library_class(module_path, name):
    module = pytest.importorskip(module_path)
    return getattr(module, name)


# ---------------------------------------------------------------------------
# The registry and the report (no third-party library needed)
# ---------------------------------------------------------------------------


def test_import_does_not_import_the_libraries():
    code = ("import sys, torchnorm; m = torchnorm.convert(torchnorm.nn.LayerNorm(4)); "
            "print(sorted(n for n in ('transformers', 'diffusers', 'timm', 'torchvision') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


class ScaleNorm(nn.Module):
    """A user's norm: x / rms(x) * weight over the last dimension."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _scale_norm_to_torchnorm(module):
    new = torchnorm.nn.RMSNorm(module.weight.shape[0], eps=module.eps, device="meta")
    new.weight = module.weight  # shared
    return new


def _scale_norm_back(module):
    new = ScaleNorm(module.weight.shape[0], module.eps)
    new.weight = module.weight
    return new


@pytest.fixture
def registered_scale_norm():
    """Restores the registry after the test (torchnorm.nn.convert is the
    function; the module is in sys.modules)."""
    registry = sys.modules["torchnorm.nn.convert"]
    saved = (dict(registry._BY_CLASS), dict(registry._BY_NAME), dict(registry._BACK))
    yield registry
    registry._BY_CLASS.clear(), registry._BY_NAME.clear(), registry._BACK.clear()
    registry._BY_CLASS.update(saved[0]), registry._BY_NAME.update(saved[1]), registry._BACK.update(saved[2])


@pytest.mark.parametrize("by_name", [False, True])
def test_register_conversion_user_class(registered_scale_norm, by_name):
    key = f"{ScaleNorm.__module__}.{ScaleNorm.__qualname__}" if by_name else ScaleNorm
    torchnorm.register_conversion(key, _scale_norm_to_torchnorm, _scale_norm_back)
    model = nn.Sequential(nn.Linear(8, 8), ScaleNorm(8), nn.Linear(8, 8)).double()
    check_conversion(model, rows_input(8), internal_float32=False, expect_swapped=1, subclass=False)


def test_register_conversion_rejects_bad_arguments():
    with pytest.raises(TypeError, match="class or a 'module.QualName'"):
        torchnorm.register_conversion(3, lambda m: m)
    with pytest.raises(TypeError, match="callables"):
        torchnorm.register_conversion(ScaleNorm, None)


class MyLayerNorm(nn.LayerNorm):
    pass


def test_report_says_what_was_left_and_why(registered_scale_norm):
    def refuse(module):
        raise NotConvertible("eps too large for this test")

    torchnorm.register_conversion(ScaleNorm, refuse)
    model = nn.Sequential(nn.LayerNorm(4), MyLayerNorm(4), ScaleNorm(4), torchnorm.nn.GroupNorm(2, 4),
                          nn.Linear(4, 4), nn.LocalResponseNorm(2))
    model, report = torchnorm.convert(model, report=True)
    assert [(n, b) for n, _, b in report.swapped] == [("0", "torchnorm.nn.layer_norm.LayerNorm")]
    left = {n: why for n, _, why in report.left}
    assert set(left) == {"1", "2", "3", "5"}
    assert "subclass of torch.nn.modules.normalization.LayerNorm" in left["1"]
    assert left["2"] == "eps too large for this test"
    assert left["3"] == "already torchnorm's"
    assert "no conversion registered" in left["5"]
    text = str(report)
    assert "swapped 1 module(s)" in text and "left 4 norm-like module(s)" in text and "eps too large" in text
    assert type(model[1]) is MyLayerNorm and type(model[2]) is ScaleNorm


def test_shared_module_stays_shared():
    norm = nn.LayerNorm(4)
    model = nn.Sequential(norm, nn.Linear(4, 4), norm)
    torchnorm.convert(model)
    assert model[0] is model[2] and is_torchnorm(model[0])


def _fake_library_class(name, forward, eps_name="variance_epsilon", extra_init=None):
    # A class that looks like transformers' (by module path) with a given forward.
    def __init__(self, hidden, eps=1e-6):
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.ones(hidden))
        setattr(self, eps_name, eps)
    cls = type(name, (nn.Module,), {"__init__": __init__, "forward": forward})
    cls.__module__ = "transformers.models.fake.modeling_fake"
    return cls


def _llama_like(self, x):
    x32 = x.to(torch.float32)
    return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


def _mean_subtracting(self, x):
    c = x - x.mean(-1, keepdim=True)
    return self.weight * c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def _gated(self, x, gate=None):
    return _llama_like(self, x) if gate is None else _llama_like(self, x * gate)


def test_transformers_family_recognized_by_probing_the_forward():
    good = _fake_library_class("FakeRMSNorm", _llama_like)
    check_conversion(nn.Sequential(good(8)), rows_input(8), expect_swapped=1)
    for cls, reason in [(_fake_library_class("FakeCenteredRMSNorm", _mean_subtracting), "does not compute"),
                        (_fake_library_class("FakeGatedRMSNorm", _gated), "forward takes ['x', 'gate']"),
                        (_fake_library_class("FakeOtherEpsRMSNorm", _llama_like, eps_name="tolerance"),
                         "has no float eps attribute")]:
        model, report = torchnorm.convert(nn.Sequential(cls(8)), report=True)
        assert not report.swapped and type(model[0]) is cls
        assert reason in report.left[0][2], report


# ---------------------------------------------------------------------------
# Each built-in conversion against the library's module
# ---------------------------------------------------------------------------

TRANSFORMERS_NORMS = [
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
    ("transformers.models.phi3.modeling_phi3", "Phi3RMSNorm"),
    ("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm"),
    ("transformers.models.t5.modeling_t5", "T5LayerNorm"),
    ("transformers.models.olmo2.modeling_olmo2", "Olmo2RMSNorm"),  # scale then cast: input dtype out
]


@pytest.mark.parametrize("path,name", TRANSFORMERS_NORMS, ids=[n for _, n in TRANSFORMERS_NORMS])
def test_transformers_rms_norm(path, name):
    cls = library_class(path, name)
    check_conversion(nn.Sequential(cls(16, eps=1e-5)), rows_input(16), expect_swapped=1)


@pytest.mark.parametrize("path,name", TRANSFORMERS_NORMS, ids=[n for _, n in TRANSFORMERS_NORMS])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_transformers_rms_norm_mixed_dtypes(path, name, weight_dtype):
    """bfloat16 input: the result has the library's dtype, and its value to
    bfloat16's tolerance (the libraries round at other places)."""
    cls = library_class(path, name)
    original = randomize_params(cls(16, eps=1e-5)).to(weight_dtype)
    converted = torchnorm.convert(copy.deepcopy(original))
    x = rows_input(16)(torch.bfloat16)[0].detach()
    expected, out = original(x), converted(x)
    assert out.dtype == expected.dtype
    assert_close(out, expected, torch.bfloat16, "forward", name)


def test_diffusers_rms_norm():
    cls = library_class("diffusers.models.normalization", "RMSNorm")
    check_conversion(nn.Sequential(cls(16, eps=1e-5)), rows_input(16), expect_swapped=1)
    check_conversion(nn.Sequential(cls(16, eps=1e-5, bias=True)), rows_input(16), expect_swapped=1)
    check_conversion(nn.Sequential(cls(16, eps=1e-5, elementwise_affine=False), nn.Linear(16, 4)),
                     rows_input(16), expect_swapped=1)


class _WithEmbedding(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm, self.emb = norm, nn.Linear(3, 5)

    def forward(self, x):
        return self.norm(x, self.emb(torch.linspace(-1, 1, 2 * 3, dtype=x.dtype).reshape(2, 3)))


@pytest.mark.parametrize("act_fn", [None, "silu"])
def test_diffusers_ada_group_norm(act_fn):
    cls = library_class("diffusers.models.normalization", "AdaGroupNorm")
    check_conversion(_WithEmbedding(cls(5, 8, num_groups=4, act_fn=act_fn)), image_input(8), expect_swapped=1)


def test_timm_layer_norms():
    norm = pytest.importorskip("timm.layers.norm")
    check_conversion(nn.Sequential(norm.LayerNorm2d(8)), image_input(8), internal_float32=False, expect_swapped=1)
    check_conversion(nn.Sequential(norm.LayerNorm(8)), rows_input(8), internal_float32=False, expect_swapped=1)
    check_conversion(nn.Sequential(norm.GroupNorm(8, num_groups=4)), image_input(8), internal_float32=False, expect_swapped=1)
    check_conversion(nn.Sequential(norm.RmsNorm(8)), rows_input(8), internal_float32=False, expect_swapped=1)


@pytest.mark.parametrize("act", ["relu", "silu", "leaky_relu", "gelu", "identity"])
@pytest.mark.parametrize("cls_name", ["BatchNormAct2d", "GroupNormAct"])
def test_timm_norm_act(act, cls_name):
    norm_act = pytest.importorskip("timm.layers.norm_act")
    kwargs = {"num_groups": 4} if cls_name == "GroupNormAct" else {}
    layer = getattr(norm_act, cls_name)(8, act_layer=act, **kwargs)
    if cls_name == "BatchNormAct2d":
        with torch.no_grad():
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 1.5)
    model = nn.Sequential(layer)
    check_conversion(model, image_input(8), internal_float32=False, expect_swapped=1)
    model.eval()
    check_conversion(model, image_input(8), internal_float32=False, expect_swapped=1)
