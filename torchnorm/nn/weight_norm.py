"""Weight Normalization (Salimans and Kingma 2016, arXiv 1602.07868) as a
parametrization backed by torchnorm's fused kernel, interchangeable with
``torch.nn.utils.parametrizations.weight_norm``, and the paper's
data-dependent initialization. Design: docs/weight_norm.md.
"""
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..functional import WEIGHT_NORM_EPS

__all__ = ["WeightNorm", "weight_norm", "weight_norm_init_"]


class WeightNorm(nn.Module):
    """The parametrization ``w = g * v / ||v||`` (``original0`` = g,
    ``original1`` = v), as torch's ``_WeightNorm`` with torchnorm's fused op
    (``torchnorm::weight_norm``) in its forward.

    ``dim`` follows torch's convention: ``None`` is stored as -1, and -1 means
    one norm of the whole tensor (not the last dimension); any other negative
    dim counts from the end. A slice's norm is clamped to at least
    :data:`torchnorm.functional.WEIGHT_NORM_EPS`, so a zero slice gives zeros
    where torch's gives NaN.
    """

    def __init__(self, dim: Optional[int] = 0) -> None:
        super().__init__()
        self.dim = -1 if dim is None else dim

    def extra_repr(self) -> str:
        return f"dim={self.dim}" + (" (whole tensor)" if self.dim == -1 else "")

    @property
    def op_dim(self) -> Optional[int]:
        """The dim as the op takes it: None for the whole tensor."""
        return None if self.dim == -1 else self.dim

    def forward(self, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
        w, _ = torch.ops.torchnorm.weight_norm.default(weight_v, weight_g, self.op_dim, WEIGHT_NORM_EPS)
        return w

    def right_inverse(self, weight: torch.Tensor):
        """(g, v) = (the norms of ``weight``'s slices, ``weight``), g shaped as
        ``torch.norm_except_dim`` returns it (size 1 outside dim; 0-d for the
        whole tensor), so state_dicts match torch's. The norms are taken in
        float32 for float16/bfloat16 weights, then stored in their dtype."""
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        if self.op_dim is None:
            g = torch.linalg.vector_norm(weight, dtype=acc)
        elif weight.dim() == 1:  # each element is a slice (vector_norm would take dim=[] as every dim)
            g = weight.abs().to(acc)
        else:
            d = self.op_dim % weight.dim()
            others = [k for k in range(weight.dim()) if k != d]
            g = torch.linalg.vector_norm(weight, dim=others, keepdim=True, dtype=acc)
        return g.to(weight.dtype), weight


def _check_dim(module: nn.Module, name: str, dim: Optional[int]) -> None:
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight_norm: {type(module).__name__} has no tensor {name!r} to normalize")
    if dim not in (None, -1) and not -weight.dim() <= dim < weight.dim():
        raise ValueError(f"weight_norm: dim must be None or in [{-weight.dim()}, {weight.dim()}) for "
                         f"{name} of shape {tuple(weight.shape)}, got {dim}")


def weight_norm(module: nn.Module, name: str = "weight", dim: Optional[int] = 0) -> nn.Module:
    """Applies weight normalization to ``module.<name>``, as
    ``torch.nn.utils.parametrizations.weight_norm`` does, with torchnorm's
    fused kernel (forward and backward).

    Interchangeable with torch's: the same parameters
    ``parametrizations.<name>.original0`` (g) and ``original1`` (v), so
    state_dicts load both ways; the same ``dim`` (default 0: one norm per
    output unit of a Linear or ConvNd; ``None`` or -1: one norm of the whole
    tensor; a ConvTranspose's weight is (in, out / groups, ...), so dim=1 is
    its output channels, and dim=0, torch's default, its input channels);
    the old ``<name>_g`` / ``<name>_v`` state_dict keys of
    ``torch.nn.utils.weight_norm`` load too. ``parametrize.cached()`` and
    ``parametrize.remove_parametrizations`` work as with any parametrization.
    The one difference: a zero slice of v gives zeros, not NaN (its norm is
    clamped to at least ``torchnorm.functional.WEIGHT_NORM_EPS``).

    Returns:
        ``module``, with the parametrization registered.
    """
    _check_dim(module, name, dim)
    parametrize.register_parametrization(module, name, WeightNorm(dim), unsafe=True)

    def _old_state_dict_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                             error_msgs) -> None:
        # torch.nn.utils.weight_norm's keys, renamed as torch's parametrization does.
        g_key, v_key = f"{prefix}{name}_g", f"{prefix}{name}_v"
        if g_key in state_dict and v_key in state_dict:
            state_dict[f"{prefix}parametrizations.{name}.original0"] = state_dict.pop(g_key)
            state_dict[f"{prefix}parametrizations.{name}.original1"] = state_dict.pop(v_key)

    module._register_load_state_dict_pre_hook(_old_state_dict_keys)
    return module


# ---------------------------------------------------------------------------
# Data-dependent initialization (the paper's section 3)
# ---------------------------------------------------------------------------

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _weight_norm_parametrization(module: nn.Module, name: str):
    """The parametrization list of ``module.<name>`` when its only
    parametrization is a weight norm (torchnorm's or torch's), else None."""
    plist = getattr(getattr(module, "parametrizations", None), name, None)
    if plist is None or len(plist) != 1:
        return None
    torch_weight_norm = getattr(torch.nn.utils.parametrizations, "_WeightNorm", ())
    return plist if isinstance(plist[0], (WeightNorm, torch_weight_norm)) else None


def _output_units(module: nn.Module, batch: torch.Tensor):
    """(the dim of the weight that indexes output units, the dim of the
    module's output that does), or a TypeError for other layers."""
    if isinstance(module, nn.Linear):
        return 0, -1
    if isinstance(module, _CONV + _CONV_TRANSPOSE):
        batched = batch.dim() == len(module.kernel_size) + 2
        if isinstance(module, _CONV):
            return 0, 1 if batched else 0
        if module.groups != 1:
            raise ValueError("weight_norm_init_: a grouped ConvTranspose's weight (in, out / groups, ...) mixes "
                             "several output channels in each slice along dim 1, so g cannot set one scale per "
                             "output channel")
        return 1, 1 if batched else 0
    raise TypeError(f"weight_norm_init_: expected a weight-normalized Linear, ConvNd or ConvTransposeNd, "
                    f"got {type(module).__name__}")


@torch.no_grad()
def weight_norm_init_(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The data-dependent initialization of Salimans and Kingma (2016): one
    batch through the weight-normalized ``module`` sets g and the bias so that
    its pre-activations have zero mean and unit variance per output unit.

    With v fixed, each unit's pre-activation before g and the bias is
    ``t = (v . x) / ||v||``; over the batch (and, for a convolution, every
    output position), with ``mean(t)`` and the biased ``std(t)``::

        g = 1 / std(t),    b = -mean(t) / std(t)

    so that ``g * t + b = (t - mean(t)) / std(t)``. A module without a bias
    gets only g: its pre-activations then have unit variance and keep the
    mean ``mean(t) / std(t)``, which no parameter can shift.

    ``module``: a Linear, Conv1d/2d/3d or ConvTranspose1d/2d/3d (groups=1)
    whose ``weight`` is weight-normalized (by :func:`weight_norm` or by
    ``torch.nn.utils.parametrizations.weight_norm``) along its output units:
    dim 0 (Linear, ConvNd) or dim 1 (ConvTransposeNd). A unit whose t is the
    same for every element of the batch (std 0; e.g. a Linear given one
    sample) raises, and the module is left as it was.

    Returns:
        the module's output on ``batch`` after the initialization (no grad):
        the next layer's input for a layer-by-layer initialization.
    """
    plist = _weight_norm_parametrization(module, "weight")
    if plist is None:
        raise ValueError(f"weight_norm_init_: {type(module).__name__}.weight is not weight-normalized: apply "
                         "torchnorm.weight_norm (or torch.nn.utils.parametrizations.weight_norm) first")
    weight_dim, output_dim = _output_units(module, batch)
    v = plist.original1
    dim = plist[0].dim
    if dim == -1 or dim % v.dim() != weight_dim:
        raise ValueError(f"weight_norm_init_: {type(module).__name__}'s weight must be normalized along its output "
                         f"units, dim {weight_dim}, for g to scale each unit; it is normalized along "
                         + ("the whole tensor" if dim == -1 else f"dim {dim}"))
    g, bias = plist.original0, getattr(module, "bias", None)
    saved = [(p, p.clone()) for p in (g, bias) if p is not None]
    try:
        g.fill_(1)
        if bias is not None:
            bias.zero_()
        t = module(batch)
        units = t.movedim(output_dim, -1).reshape(-1, t.shape[output_dim]).double()
        if units.shape[0] < 2:
            raise ValueError("weight_norm_init_: the batch gives fewer than two pre-activations per output unit; "
                             "their variance is undefined")
        mean, std = units.mean(0), units.std(0, correction=0)
        # A std within the rounding of t's own dtype is a constant t.
        rounding = 16 * torch.finfo(t.dtype).eps * units.square().mean(0).sqrt()
        flat = (std <= rounding) | ~torch.isfinite(std)
        if flat.any():
            raise ValueError(f"weight_norm_init_: the pre-activations of output units "
                             f"{flat.nonzero().flatten().tolist()[:8]} are constant over the batch (standard "
                             f"deviation {std[flat][0].item():.3g}, within {t.dtype}'s rounding), so 1 / std(t) is "
                             "undefined; use a batch with more varied samples")
        g.copy_((1 / std).reshape(g.shape))
        if bias is not None:
            bias.copy_(-mean / std)
    except BaseException:
        for p, value in saved:
            p.copy_(value)
        raise
    return module(batch)
