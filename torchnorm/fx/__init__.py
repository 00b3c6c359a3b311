"""torch.fx passes: fold BatchNorm into the layer before it for inference
(:func:`fold_conv_bn`), and swap Conv+BatchNorm(+activation) chains for
torchnorm's memory-efficient blocks for training (:func:`fuse_conv_bn`,
undone by :func:`unfuse_conv_bn`)."""
from .fold import Fold, FoldReport, fold_conv_bn, fold_parameters
from .fuse import FusedChain, fuse_conv_bn, unfuse_conv_bn

__all__ = ["fold_conv_bn", "fold_parameters", "FoldReport", "Fold", "fuse_conv_bn", "unfuse_conv_bn", "FusedChain"]
