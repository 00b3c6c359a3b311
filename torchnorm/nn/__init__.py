"""Drop-in ``nn.Module`` replacements for torch.nn's normalization layers."""
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d
from .conv_bn import (ConvBN1d, ConvBN2d, ConvBN3d, ConvTransposeBN1d, ConvTransposeBN2d, ConvTransposeBN3d,
                      conv_bn_forward)
from .convert import convert
from .group_norm import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layer_norm import LayerNorm, RMSNorm
from .online_norm import OnlineNorm1d, OnlineNorm2d
from .sequence import BNLSTM, BNRNN, BNLSTMCell, RecurrentBatchNorm1d, SequenceBatchNorm1d

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct2d", "LayerNorm", "RMSNorm", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "convert",
    "ConvBN1d", "ConvBN2d", "ConvBN3d", "ConvTransposeBN1d", "ConvTransposeBN2d", "ConvTransposeBN3d",
    "conv_bn_forward",
    "RecurrentBatchNorm1d", "BNLSTMCell", "BNLSTM", "SequenceBatchNorm1d", "BNRNN",
    "OnlineNorm1d", "OnlineNorm2d",
]
from .streaming_norm import StreamingNorm1d, StreamingNorm2d, streaming_norm_hook

__all__ += ["StreamingNorm1d", "StreamingNorm2d", "streaming_norm_hook"]
from .sync_batch_norm import SyncBatchNorm

__all__ += ["SyncBatchNorm"]
from .cosine_norm import CosineConv2d, CosineLinear

__all__ += ["CosineLinear", "CosineConv2d"]
from .weight_norm import WeightNorm, weight_norm, weight_norm_init_

__all__ += ["WeightNorm", "weight_norm", "weight_norm_init_"]
