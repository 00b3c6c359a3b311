"""LayerNorm and RMSNorm modules (normalization over each sample's trailing
dimensions) running torchnorm's kernels, with an optional fused residual add.

Each class subclasses its torch.nn counterpart, so constructor arguments,
parameters, buffers, state_dict keys, ``isinstance`` checks and repr are
torch.nn's; only the forward runs torchnorm's operator, with the fused
options as extra (optional) arguments. GroupNorm and InstanceNorm are in
group_norm.py, BatchNorm in batch_norm.py.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import functional as F


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm`, with an optional fused residual.

    ``forward(x)`` is torch.nn.LayerNorm's; ``forward(x, residual)`` returns
    ``(layer_norm(x + residual), x + residual)`` from one pass over memory.
    """

    def forward(self, input: Tensor, residual: Optional[Tensor] = None):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, residual)


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for :class:`torch.nn.RMSNorm`, with an optional fused residual.

    ``forward(x, residual)`` returns ``(rms_norm(x + residual), x + residual)``.
    """

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps, residual)
