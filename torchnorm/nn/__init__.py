"""Drop-in ``nn.Module`` replacements for torch.nn's normalization layers."""
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d
from .convert import convert
from .norms import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct2d", "LayerNorm", "RMSNorm", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "convert",
]
