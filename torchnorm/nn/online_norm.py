"""Online Normalization (Chiley et al. 2019, arXiv 1905.05894) as modules:
BatchNorm-quality normalization at any batch size, batch size 1 included,
from per-channel statistics carried across batches.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import functional as F

__all__ = ["OnlineNorm1d", "OnlineNorm2d"]

_STATE = ("mu", "var", "u", "v")
_ECM = (None, "ls", "ac")
# The activation clamp of "ac", as the authors' later code defaults it.
ACTIVATION_CLAMP = 5.0


class _OnlineNorm(torch.nn.Module):
    """Shared by OnlineNorm1d and OnlineNorm2d: ``_dims`` are the input ranks
    the subclass accepts."""

    _dims: tuple = ()

    def __init__(self, num_features: int, alpha_fwd: float = 0.999, alpha_bkw: float = 0.99, eps: float = 1e-5,
                 affine: bool = True, ecm: Optional[str] = "ls", device=None, dtype=None) -> None:
        super().__init__()
        if ecm not in _ECM:
            raise ValueError(f"ecm must be one of {_ECM}, got {ecm!r}")
        for name, alpha in (("alpha_fwd", alpha_fwd), ("alpha_bkw", alpha_bkw)):
            if not 0.0 <= alpha < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {alpha}")
        self.num_features, self.alpha_fwd, self.alpha_bkw, self.eps = num_features, alpha_fwd, alpha_bkw, eps
        self.affine, self.ecm = affine, ecm
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = torch.nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # The state stays float32 whatever the parameters' dtype (see _apply).
        for name in _STATE:
            self.register_buffer(name, torch.zeros(num_features, device=device, dtype=torch.float32))
        self.reset_state()

    def reset_state(self) -> None:
        """mu = 0, var = 1 and the backward's u = v = 0, as the paper starts."""
        for name in _STATE:
            getattr(self, name).zero_()
        self.var.fill_(1)

    def _apply(self, fn, recurse=True):
        # .half() / .to(bfloat16) would round the running statistics away:
        # the state keeps its float32 (or float64) values and only follows a
        # device move.
        before = {name: self._buffers[name] for name in _STATE}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype not in (torch.float32, torch.float64):
                self._buffers[name] = old.to(device=new.device)
        return self

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in self._dims or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__} expects an input of {' or '.join(map(str, self._dims))} "
                             f"dimensions with {self.num_features} channels in dim 1, got shape {tuple(x.shape)}")
        if self.training and torch._C._current_graph_task_id() != -1:
            raise RuntimeError(
                f"{type(self).__name__}: forward ran inside a backward pass, as activation checkpointing's "
                "recomputation does. Online Normalization updates its state in the forward (mu, var) and in the "
                "backward (u, v), so a recomputed forward would update it twice: keep this layer out of "
                "checkpointed regions")
        # The affine map and "ls" (layer scaling: y / sqrt(mean over C, H, W
        # of y^2 + eps), per sample) run in the normalization's passes.
        y = F.online_norm(x, self.mu, self.var, self.u, self.v, self.alpha_fwd, self.alpha_bkw, self.eps,
                          self.training, self.weight, self.bias, layer_scale=self.ecm == "ls")
        if self.ecm == "ac":
            y = y.clamp(-ACTIVATION_CLAMP, ACTIVATION_CLAMP)
        return y

    def extra_repr(self) -> str:
        return (f"{self.num_features}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, eps={self.eps}, "
                f"affine={self.affine}, ecm={self.ecm!r}")


class OnlineNorm1d(_OnlineNorm):
    """Online Normalization of ``(N, C)`` or ``(N, C, L)`` input.

    Per channel, samples in order: each sample is normalized with the running
    mean ``mu`` and variance ``var`` from before it, which it then updates
    (rate ``alpha_fwd``); the backward is the paper's control process with
    rate ``alpha_bkw`` and state ``u``, ``v``. All four are ``(C,)`` float32
    buffers in the state_dict, carried across batches. Then the affine
    ``weight * y + bias`` and the error compensation ``ecm``: ``"ls"`` (layer
    scaling, ``y / sqrt(mean over C, L of y^2 + eps)``), ``"ac"`` (clamp at
    +-5) or None. Eval normalizes with ``mu``, ``var`` and updates nothing.

    Hazards: the state changes in backward, so one forward's graph may be
    backpropagated once (a second backward raises), and the forward refuses
    to run inside a backward pass (activation checkpointing's recomputation).
    """

    _dims = (2, 3)


class OnlineNorm2d(_OnlineNorm):
    """Online Normalization of ``(N, C, H, W)`` input; as :class:`OnlineNorm1d`,
    statistics per channel over each sample's H x W positions, ``"ls"`` over
    (C, H, W)."""

    _dims = (4,)
