"""Swapping torch.nn's normalization layers for torchnorm's, and back."""
import torch

from . import batch_norm, group_norm, layer_norm, sync_batch_norm

_TO_TORCHNORM = {
    torch.nn.BatchNorm1d: batch_norm.BatchNorm1d,
    torch.nn.BatchNorm2d: batch_norm.BatchNorm2d,
    torch.nn.BatchNorm3d: batch_norm.BatchNorm3d,
    torch.nn.LayerNorm: layer_norm.LayerNorm,
    torch.nn.RMSNorm: layer_norm.RMSNorm,
    torch.nn.GroupNorm: group_norm.GroupNorm,
    torch.nn.InstanceNorm1d: group_norm.InstanceNorm1d,
    torch.nn.InstanceNorm2d: group_norm.InstanceNorm2d,
    torch.nn.InstanceNorm3d: group_norm.InstanceNorm3d,
    torch.nn.SyncBatchNorm: sync_batch_norm.SyncBatchNorm,
}
_TO_TORCH = {v: k for k, v in _TO_TORCHNORM.items()}
# Attributes torchnorm's modules add to torch.nn's, with the value that
# means "the same as torch.nn".
_EXTRA_ATTRIBUTES = {
    group_norm.GroupNorm: {"activation": None, "negative_slope": 0.01},
    sync_batch_norm.SyncBatchNorm: sync_batch_norm.EXTRA_ATTRIBUTES,
}


def _retyped(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    # A new module object of class cls holding the very same Parameters and
    # buffers (so optimizers and hooks keep working), device, dtype and mode.
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    for name in ("_parameters", "_buffers", "_modules"):
        setattr(new, name, getattr(module, name).copy())
    for name, default in _EXTRA_ATTRIBUTES.get(cls, {}).items():
        new.__dict__.setdefault(name, default)
    for name in _EXTRA_ATTRIBUTES.get(type(module), {}):
        new.__dict__.pop(name, None)
    return new


def _convertible_back(module: torch.nn.Module) -> bool:
    # A GroupNorm with a fused activation has no torch.nn equivalent.
    return getattr(module, "activation", None) is None


def convert(model: torch.nn.Module, back: bool = False, sync: bool = False, process_group=None) -> torch.nn.Module:
    """Replaces torch.nn's normalization layers in ``model`` with torchnorm's (in place).

    Handles BatchNorm1d/2d/3d, LayerNorm, RMSNorm, GroupNorm and
    InstanceNorm1d/2d/3d. Parameters and buffers are shared, not copied, so an
    optimizer built before the conversion still updates the model. With
    ``back=True``, torchnorm's modules are turned back into torch.nn's (a
    GroupNorm with a fused activation, which torch.nn cannot express, raises).
    Subclasses of the torch.nn classes (other than torchnorm's) are left alone.
    torch.nn.SyncBatchNorm becomes :class:`torchnorm.nn.SyncBatchNorm`; with
    ``sync=True`` every BatchNorm does (over ``process_group``, default the
    whole job), as :meth:`torchnorm.nn.SyncBatchNorm.convert_sync_batchnorm`.

    Returns:
        ``model`` (or its replacement, when ``model`` itself is a normalization layer).
    """
    mapping = _TO_TORCH if back else _TO_TORCHNORM

    def swap(module):
        if back and not _convertible_back(module):
            raise ValueError(f"convert(back=True): {module!r} fuses an activation, which torch.nn's "
                             f"{mapping[type(module)].__name__} cannot express")
        return _retyped(module, mapping[type(module)])

    if sync and back:
        raise ValueError("convert: sync=True converts to torchnorm's SyncBatchNorm; it cannot be combined with "
                         "back=True")
    if type(model) in mapping:
        model = swap(model)
    else:
        for parent in model.modules():
            for name, child in parent._modules.items():
                if child is not None and type(child) in mapping:
                    parent._modules[name] = swap(child)
    if sync:
        model = sync_batch_norm.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return model
