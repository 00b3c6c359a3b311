"""diffusers: :func:`apply` / :func:`remove` (GroupNorm + activation fused
in ResNet blocks), and conversions of its RMSNorm and AdaGroupNorm (nothing
here imports diffusers). Its ResNet blocks' GroupNorms are torch.nn's, converted
as such."""
from typing import List

import torch

from .. import functional as F
from ..nn.convert import register_conversion
from ._common import convert_rms_norm, swap_to
from ._rewrite import apply_rule, check_rule, remove_rule

_NORMALIZATION = "diffusers.models.normalization"

register_conversion(f"{_NORMALIZATION}.RMSNorm", convert_rms_norm)


def ada_group_norm_forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """AdaGroupNorm: GroupNorm without affine (torchnorm's kernel), then the
    per-sample scale and shift from the embedding. The per-sample affine
    cannot go into the kernel, whose affine is per channel."""
    if self.act:
        emb = self.act(emb)
    scale, shift = self.linear(emb)[:, :, None, None].chunk(2, dim=1)
    return F.group_norm(x, self.num_groups, None, None, self.eps) * (1 + scale) + shift


def convert_ada_group_norm(module: torch.nn.Module) -> torch.nn.Module:
    """diffusers' AdaGroupNorm with torchnorm's GroupNorm kernel."""
    return swap_to(module, "ada_group_norm", ada_group_norm_forward)


register_conversion(f"{_NORMALIZATION}.AdaGroupNorm", convert_ada_group_norm)


def _is_resnet_block(module: torch.nn.Module) -> bool:
    cls = type(module)
    return cls.__module__ == "diffusers.models.resnet" and cls.__name__.startswith("ResnetBlock")


def apply(model: torch.nn.Module) -> List[str]:
    """Runs each ResNet block's GroupNorm + activation (diffusers'
    ``ResnetBlock2D`` and the like: ``h = self.norm1(h); h =
    self.nonlinearity(h)``) as one torchnorm GroupNorm kernel with the
    activation fused (in place), after converting the model's norms
    (:func:`torchnorm.convert`). Everything else in the block's forward is the
    library's code as installed; the state_dict and outputs are unchanged
    beyond rounding. Raises ValueError, naming the class, for a block whose
    forward has no such statements (before changing anything).
    :func:`remove` undoes it. Returns the names of the blocks."""
    from ..nn.convert import convert

    check_rule(model, _is_resnet_block, "norm_act")  # refuse before changing anything
    convert(model)
    return apply_rule(model, _is_resnet_block, "norm_act")


def remove(model: torch.nn.Module) -> List[str]:
    """Undoes :func:`apply` (the blocks get their classes back; the norms
    stay converted). Returns the names of the blocks."""
    return remove_rule(model, "norm_act")
