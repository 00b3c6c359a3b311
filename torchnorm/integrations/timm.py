"""timm: conversions of its LayerNorm (channels-last), LayerNorm2d
(channels-first), GroupNorm, RmsNorm and norm+activation classes
BatchNormAct2d and GroupNormAct (nothing here imports timm).

The norm+activation classes run the activation inside torchnorm's kernel
when it is ReLU, LeakyReLU, SiLU or Identity and their ``drop`` is an
Identity (or the module is in eval mode and ``drop`` a Dropout); otherwise
the norm runs on torchnorm's kernel and ``drop`` and ``act`` after it, as timm
does. timm's ``fast_norm`` option (float32 compute under autocast) is not
consulted: torchnorm's kernels accumulate in float32 anyway.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import functional as F
from ..nn.batch_norm import _batch_norm_forward
from ..nn.convert import NotConvertible, register_conversion
from ._common import activation_of, convert_rms_norm, swap_to

_NORM, _NORM_ACT = "timm.layers.norm", "timm.layers.norm_act"


def layer_norm_forward(self, x: Tensor, residual: Optional[Tensor] = None):
    """timm's LayerNorm (over the trailing normalized_shape), with torchnorm's
    optional fused residual: ``(norm(x + residual), x + residual)``."""
    return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, residual)


def layer_norm_2d_forward(self, x: Tensor) -> Tensor:
    """LayerNorm over the channels of an (N, C, H, W) input: the channels
    moved last (a view; a copy unless the input is channels-last), normalized,
    moved back, as timm does."""
    return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                        self.eps).permute(0, 3, 1, 2)


def group_norm_forward(self, x: Tensor) -> Tensor:
    """timm's GroupNorm on torchnorm's kernel."""
    return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _fused_activation(module: torch.nn.Module) -> Optional[Tuple[str, float]]:
    # The activation the kernel can apply, when drop does nothing.
    drop_is_identity = isinstance(module.drop, torch.nn.Identity) or (
        not module.training and isinstance(module.drop, torch.nn.Dropout))
    return activation_of(module.act) if drop_is_identity else None


def batch_norm_act_forward(self, x: Tensor) -> Tensor:
    """timm's BatchNormAct2d: BatchNorm2d (as torch.nn's, running statistics
    included), then drop and act, fused when it can be."""
    fused = _fused_activation(self)
    if fused is not None:
        return _batch_norm_forward(self, x, fused[0], fused[1], None)
    return self.act(self.drop(_batch_norm_forward(self, x, None, 0.0, None)))


def group_norm_act_forward(self, x: Tensor) -> Tensor:
    """timm's GroupNormAct: GroupNorm, then drop and act, fused when it can be."""
    fused = _fused_activation(self)
    if fused is not None:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, fused[0], fused[1])
    return self.act(self.drop(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)))


def _converter(kind, forward, **attributes):
    def convert(module: torch.nn.Module) -> torch.nn.Module:
        if isinstance(module, torch.nn.LayerNorm) and kind == "layer_norm_2d" and len(module.normalized_shape) != 1:
            raise NotConvertible(f"normalized_shape {module.normalized_shape} is not (channels,)")
        return swap_to(module, kind, forward, **attributes)
    return convert


register_conversion(f"{_NORM}.LayerNorm", _converter("layer_norm", layer_norm_forward, _tn_residual=True))
register_conversion(f"{_NORM}.LayerNorm2d", _converter("layer_norm_2d", layer_norm_2d_forward))
register_conversion(f"{_NORM}.GroupNorm", _converter("group_norm", group_norm_forward))
register_conversion(f"{_NORM}.RmsNorm", convert_rms_norm)
register_conversion(f"{_NORM_ACT}.BatchNormAct2d", _converter("batch_norm_act", batch_norm_act_forward))
register_conversion(f"{_NORM_ACT}.GroupNormAct", _converter("group_norm_act", group_norm_act_forward))
