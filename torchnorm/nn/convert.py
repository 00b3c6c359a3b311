"""Swapping normalization layers for torchnorm's, and back.

One registry (:func:`register_conversion`) holds every conversion: torch.nn's
norms (registered below), the norms of transformers, diffusers and timm
(registered by name in :mod:`torchnorm.integrations`, so none of those
libraries is imported) and the user's own. :func:`convert` walks a model and
swaps each module whose exact class has a conversion.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import batch_norm, group_norm, layer_norm, sync_batch_norm

__all__ = ["convert", "register_conversion", "NotConvertible", "ConversionReport"]


class NotConvertible(Exception):
    """Raised by a conversion to leave a module alone; its message is the reason
    :func:`convert` reports."""


class _Conversion(NamedTuple):
    to_torchnorm: Callable[[torch.nn.Module], torch.nn.Module]
    back: Optional[Callable[[torch.nn.Module], torch.nn.Module]]


# Conversions by class, and by "module.QualName" for classes of libraries that
# torchnorm does not import (looked up from type(m).__module__/__qualname__).
_BY_CLASS: Dict[type, _Conversion] = {}
_BY_NAME: Dict[str, _Conversion] = {}
# The way back, by the class of a converted module.
_BACK: Dict[type, Callable[[torch.nn.Module], torch.nn.Module]] = {}
# Functions cls -> _Conversion or None, for families of classes that share one
# conversion but no name (transformers' many copies of one RMSNorm).
_RESOLVERS: List[Callable[[type], Optional[_Conversion]]] = []


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_conversion(cls: Union[type, str], to_torchnorm: Callable[[torch.nn.Module], torch.nn.Module],
                        back: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None, *,
                        converted: Sequence[type] = ()) -> None:
    """Teaches :func:`convert` to swap modules of class ``cls``.

    Args:
        cls: the class, or its ``"module.QualName"`` (e.g.
            ``"transformers.models.llama.modeling_llama.LlamaRMSNorm"``), so a
            library need not be imported to register its classes. Only modules
            of exactly this class are swapped (a subclass may compute
            something else).
        to_torchnorm: module -> its torchnorm replacement, which should share
            the module's parameters and buffers (not copy them) and keep its
            state_dict keys. It may raise :class:`NotConvertible` to leave a
            module alone; the message is reported.
        back: converted module -> a module of the original kind, for
            ``convert(model, back=True)``; None when there is no way back.
        converted: classes that ``to_torchnorm`` returns, so ``back`` also
            applies to modules built from them directly. Classes of returned
            modules are also learned as conversions happen.

    A later registration for the same class replaces the earlier one.
    """
    if not (isinstance(cls, type) or isinstance(cls, str)):
        raise TypeError(f"register_conversion: cls must be a class or a 'module.QualName' string, got {cls!r}")
    if not callable(to_torchnorm) or (back is not None and not callable(back)):
        raise TypeError("register_conversion: to_torchnorm and back must be callables")
    conversion = _Conversion(to_torchnorm, back)
    if isinstance(cls, str):
        _BY_NAME[cls] = conversion
    else:
        _BY_CLASS[cls] = conversion
    for out_cls in converted:
        if back is not None:
            _BACK[out_cls] = back


def _conversion_for(cls: type) -> Optional[_Conversion]:
    found = _BY_CLASS.get(cls) or _BY_NAME.get(_class_name(cls))
    if found is not None:
        return found
    for resolve in _RESOLVERS:
        found = resolve(cls)
        if found is not None:
            return found
    return None


def _back_for(cls: type) -> Optional[Callable[[torch.nn.Module], torch.nn.Module]]:
    return _BACK.get(cls)


# ---------------------------------------------------------------------------
# torch.nn's norms
# ---------------------------------------------------------------------------

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
# Attributes torchnorm's modules add to torch.nn's, with the value that
# means "the same as torch.nn".
_EXTRA_ATTRIBUTES = {
    group_norm.GroupNorm: {"activation": None, "negative_slope": 0.01},
    sync_batch_norm.SyncBatchNorm: sync_batch_norm.EXTRA_ATTRIBUTES,
}


def retyped(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A new module object of class ``cls`` holding the very same Parameters
    and buffers (so optimizers and hooks keep working), submodules, device,
    dtype and mode as ``module``: the way most conversions swap a module."""
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    for name in ("_parameters", "_buffers", "_modules"):
        setattr(new, name, getattr(module, name).copy())
    for name, default in _EXTRA_ATTRIBUTES.get(cls, {}).items():
        new.__dict__.setdefault(name, default)
    for name in _EXTRA_ATTRIBUTES.get(type(module), {}):
        new.__dict__.pop(name, None)
    return new


def _register_torch_nn() -> None:
    for torch_cls, torchnorm_cls in _TO_TORCHNORM.items():
        def to_torchnorm(module, cls=torchnorm_cls):
            return retyped(module, cls)

        def back(module, cls=torch_cls):
            if getattr(module, "activation", None) is not None:
                # A GroupNorm with a fused activation has no torch.nn equivalent.
                raise ValueError(f"convert(back=True): {module!r} fuses an activation, which torch.nn's "
                                 f"{cls.__name__} cannot express")
            return retyped(module, cls)

        register_conversion(torch_cls, to_torchnorm, back, converted=[torchnorm_cls])


_register_torch_nn()


# ---------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------

_NORM_BASES = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm,
               torch.nn.LocalResponseNorm)


def _looks_like_norm(module: torch.nn.Module) -> bool:
    # What the report lists when it is left alone: torch.nn's norms and their
    # subclasses, and any class named like a norm.
    return isinstance(module, _NORM_BASES) or "norm" in type(module).__name__.lower()


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``swapped`` lists ``(name, from_class,
    to_class)``, ``left`` lists ``(name, class, reason)`` for the modules that
    look like norms (torch.nn's norms, their subclasses, classes named
    ``*Norm*``) but were left alone. ``str(report)`` is a readable table."""
    swapped: List[Tuple[str, str, str]] = field(default_factory=list)
    left: List[Tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} module(s):"]
        lines += [f"  {name or '(model)'}: {a} -> {b}" for name, a, b in self.swapped]
        lines.append(f"left {len(self.left)} norm-like module(s):")
        lines += [f"  {name or '(model)'}: {cls}: {why}" for name, cls, why in self.left]
        return "\n".join(lines)


def _is_torchnorm(module: torch.nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "torchnorm"


def _why_left(module: torch.nn.Module, back: bool) -> str:
    cls = type(module)
    if back:
        return "not a torchnorm module" if not _is_torchnorm(module) else "no way back registered for this class"
    if _is_torchnorm(module):
        return "already torchnorm's"
    for base in cls.__mro__[1:]:
        if _conversion_for(base) is not None:
            return (f"subclass of {_class_name(base)}, which has a conversion; a subclass may compute something "
                    "else, so register_conversion it to convert it")
    return "no conversion registered for this class (torchnorm.register_conversion adds one)"


def convert(model: torch.nn.Module, back: bool = False, report: bool = False, sync: bool = False,
            process_group=None):
    """Replaces the normalization layers in ``model`` with torchnorm's (in place).

    Swaps every module whose exact class has a conversion: torch.nn's
    BatchNorm1d/2d/3d, LayerNorm, RMSNorm, GroupNorm and
    InstanceNorm1d/2d/3d; transformers' RMSNorm family (Llama, Mistral,
    Qwen2, Phi-3, Gemma's ``1 + weight``, T5's LayerNorm and their many
    copies), diffusers' RMSNorm and AdaGroupNorm, timm's LayerNorm,
    LayerNorm2d, GroupNorm and norm+activation classes (see
    :mod:`torchnorm.integrations`); and the classes given to
    :func:`register_conversion`. Parameters and buffers are shared, not
    copied, so an optimizer built before the conversion still updates the
    model, and the state_dict keys stay the same. Other classes, including
    subclasses of those, are left alone.

    With ``back=True``, converted modules (and torchnorm's torch.nn
    drop-ins) are turned back into the originals' classes (a GroupNorm with
    a fused activation, which torch.nn cannot express, raises).

    torch.nn.SyncBatchNorm becomes :class:`torchnorm.nn.SyncBatchNorm`; with
    ``sync=True`` every BatchNorm does (over ``process_group``, default the
    whole job), as :meth:`torchnorm.nn.SyncBatchNorm.convert_sync_batchnorm`.

    Returns:
        ``model`` (or its replacement, when ``model`` itself is a
        normalization layer); with ``report=True``, ``(model,
        ConversionReport)``, saying what was swapped and what was left and why.
    """
    from .. import integrations  # noqa: F401  (registers the third-party classes; imports none of them)

    result = ConversionReport()
    done: Dict[int, torch.nn.Module] = {}  # a module used at several places becomes one new module

    def swap(module: torch.nn.Module, name: str) -> torch.nn.Module:
        if id(module) in done:
            return done[id(module)]
        cls = type(module)
        try:
            if back:
                undo = module.__dict__.get("_torchnorm_back") or _back_for(cls)
                if undo is None:
                    raise NotConvertible(_why_left(module, back))
                new = undo(module)
                new.__dict__.pop("_torchnorm_back", None)
            else:
                conversion = None if _is_torchnorm(module) else _conversion_for(cls)
                if conversion is None:
                    raise NotConvertible(_why_left(module, back))
                new = conversion.to_torchnorm(module)
                if conversion.back is not None and _BACK.setdefault(type(new), conversion.back) is not conversion.back:
                    # Another conversion returns this class too (a user's norm
                    # made a torchnorm.nn.RMSNorm): this module remembers its own.
                    new.__dict__["_torchnorm_back"] = conversion.back
        except NotConvertible as why:
            if _looks_like_norm(module) and (not back or _is_torchnorm(module)):
                result.left.append((name, _class_name(cls), str(why)))
            return module
        result.swapped.append((name, _class_name(cls), _class_name(type(new))))
        done[id(module)] = new
        return new

    if sync and back:
        raise ValueError("convert: sync=True converts to torchnorm's SyncBatchNorm; it cannot be combined with "
                         "back=True")
    model = swap(model, "")
    for parent_name, parent in model.named_modules():
        for name, child in list(parent._modules.items()):
            if child is not None:
                new = swap(child, f"{parent_name}.{name}" if parent_name else name)
                if new is not child:
                    parent._modules[name] = new
    if sync:
        model = sync_batch_norm.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return (model, result) if report else model
