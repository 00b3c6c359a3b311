"""Drop-in ``nn.Module`` replacements for torch.nn's normalization layers."""
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d, convert

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct2d", "convert"]
