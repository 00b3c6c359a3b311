"""transformers: conversions of its RMSNorm family (Llama, Mistral, Qwen2,
Phi-3, Gemma's ``1 + weight``, T5's LayerNorm and the many copies of them).

Nothing here imports transformers. The classes are recognized by name (the
common ones, listed below) and, for the rest, by the pattern
``transformers.*RMSNorm`` / ``transformers.*LayerNorm`` (not a subclass of
torch.nn.LayerNorm); in both cases :func:`~._common.recognize_rms_norm`
runs the class's own forward once on float64 probes, so a class is converted
only when its math is ``(weight or 1 + weight) * x / sqrt(mean(x**2) + eps)``
over the last dimension (a gated or grouped variant is left, with the reason).
"""
from typing import Optional

import torch

from ..nn.convert import _RESOLVERS, _Conversion, register_conversion
from ._common import convert_rms_norm

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
