"""torch.fx passes: fold BatchNorm into the layer before it for inference
(:func:`fold_conv_bn`), and swap Conv+BatchNorm(+activation) chains for
torchnorm's memory-efficient blocks for training (:func:`fuse_conv_bn`,
undone by :func:`unfuse_conv_bn`), and fuse residual adds and activations
into the norms next to them (:func:`fuse_norms`, undone by :func:`unfuse_norms`)."""
from .fold import Fold, FoldReport, fold_conv_bn, fold_parameters
from .fuse import ConvOnRecipe, FusedChain, fuse_conv_bn, unfuse_conv_bn
from .norms import FusedAddNorm, FusedNormAct, fuse_norms, fuse_norms_in, unfuse_norms, unfuse_norms_in

__all__ = ["fold_conv_bn", "fold_parameters", "FoldReport", "Fold", "fuse_conv_bn", "unfuse_conv_bn", "FusedChain",
           "ConvOnRecipe",
           "fuse_norms", "unfuse_norms", "fuse_norms_in", "unfuse_norms_in", "FusedAddNorm", "FusedNormAct"]
