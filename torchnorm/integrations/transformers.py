"""transformers: :func:`apply` / :func:`remove` (the fused residual norm in
decoder layers), and the conversions of its RMSNorm family (Llama, Mistral, Qwen2,
Phi-3, Gemma's ``1 + weight``, T5's LayerNorm and the many copies of them).

Nothing here imports transformers. The classes are recognized by name (the
common ones, listed below) and, for the rest, by the pattern
``transformers.*RMSNorm`` / ``transformers.*LayerNorm`` (not a subclass of
torch.nn.LayerNorm); in both cases :func:`~._common.recognize_rms_norm`
runs the class's own forward once on float64 probes, so a class is converted
only when its math is ``(weight or 1 + weight) * x / sqrt(mean(x**2) + eps)``
over the last dimension (a gated or grouped variant is left, with the reason).
"""
from typing import List, Optional

import torch

from ..nn.convert import _RESOLVERS, _Conversion, register_conversion
from ._common import convert_rms_norm
from ._rewrite import apply_rule, check_rule, remove_rule

# Common classes by "module.QualName" (module paths as of transformers 4.4x-5.x).
NAMED = [f"transformers.models.{model}.modeling_{model}.{cls}" for model, cls in [
    ("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("qwen2", "Qwen2RMSNorm"),
    ("qwen3", "Qwen3RMSNorm"), ("phi3", "Phi3RMSNorm"), ("gemma", "GemmaRMSNorm"), ("gemma2", "Gemma2RMSNorm"),
    ("gemma3", "Gemma3RMSNorm"), ("t5", "T5LayerNorm"), ("mixtral", "MixtralRMSNorm"),
]]
for _name in NAMED:
    register_conversion(_name, convert_rms_norm)

_FAMILY = _Conversion(convert_rms_norm, None)  # the way back is the subclass's own (see torchnorm_subclass)


def _resolve(cls: type) -> Optional[_Conversion]:
    """The RMSNorm conversion for any other transformers class named like one."""
    if not cls.__module__.startswith("transformers.") or issubclass(cls, torch.nn.LayerNorm):
        return None
    name = cls.__name__
    return _FAMILY if name.endswith("RMSNorm") or name.endswith("LayerNorm") else None


_RESOLVERS.append(_resolve)


def _layer_classes(model: torch.nn.Module) -> set:
    # The layer classes transformers names in its models' _no_split_modules.
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return names


def apply(model: torch.nn.Module) -> List[str]:
    """Routes each decoder layer's residual add + post-attention norm through
    torchnorm's fused residual op (in place), after converting the model's
    norms (:func:`torchnorm.convert`).

    The layers are the modules of the classes the model lists in
    ``_no_split_modules`` (its decoder layers). In each, the statements
    ``h = residual + h; residual = h; h = self.post_attention_layernorm(h)``
    of the library's own forward become one call that returns the norm and
    the sum; everything else in the forward is the library's code as
    installed. The state_dict and outputs are unchanged beyond rounding.
    Raises ValueError, naming the class, for a layer whose forward has no
    such statements (before changing anything). :func:`remove` undoes it.
    Returns the names of the layers.
    """
    from ..nn.convert import convert

    names = _layer_classes(model)
    if not names:
        raise ValueError(f"torchnorm.integrations.transformers.apply: {type(model).__name__} lists no layer classes "
                         "(_no_split_modules); is it a transformers model?")
    check_rule(model, lambda m: type(m).__name__ in names, "residual_norm")  # refuse before changing anything
    convert(model)
    return apply_rule(model, lambda m: type(m).__name__ in names, "residual_norm")


def remove(model: torch.nn.Module) -> List[str]:
    """Undoes :func:`apply` (the layers get their classes back; their norms
    stay converted: ``torchnorm.convert(model, back=True)`` undoes those).
    Returns the names of the layers."""
    return remove_rule(model, "residual_norm")
