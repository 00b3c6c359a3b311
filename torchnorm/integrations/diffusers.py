"""diffusers: conversions of its RMSNorm and AdaGroupNorm (nothing here
imports diffusers). Its ResNet blocks' GroupNorms are torch.nn's, converted
as such."""
import torch

from .. import functional as F
from ..nn.convert import register_conversion
from ._common import convert_rms_norm, swap_to

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
