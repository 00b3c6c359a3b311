"""Training: fuse the memory passes around norms in a traced model, and back.

- A residual add feeding a LayerNorm or RMSNorm becomes one call of
  torchnorm's residual op, which returns the normalized sum and the sum (the
  residual stream of a pre-norm transformer) from one pass over memory.
- A GroupNorm or BatchNorm followed by ReLU, LeakyReLU or SiLU becomes one
  call of torchnorm's op with the activation fused.
"""
import inspect
import operator
from typing import List, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor

from .. import functional as F
from ..nn import batch_norm as tn_batch_norm
from ..nn import group_norm as tn_group_norm
from ..nn import layer_norm as tn_layer_norm
from . import _graph

__all__ = ["fuse_norms", "unfuse_norms", "fuse_norms_in", "unfuse_norms_in", "FusedAddNorm", "FusedNormAct"]

_LAYER_NORMS = (torch.nn.LayerNorm, tn_layer_norm.LayerNorm)
_RMS_NORMS = (torch.nn.RMSNorm, tn_layer_norm.RMSNorm)
_GROUP_NORMS = (torch.nn.GroupNorm, tn_group_norm.GroupNorm)


def _takes_residual(module: torch.nn.Module) -> bool:
    """A norm whose residual form fuse_norms can call: torch.nn's or
    torchnorm's LayerNorm/RMSNorm, or a converted third-party norm
    (torchnorm.convert's, marked _tn_residual)."""
    return type(module) in _LAYER_NORMS + _RMS_NORMS or getattr(type(module), "_tn_residual", False)


def _takes_activation(module: torch.nn.Module) -> bool:
    """A GroupNorm or BatchNorm (torch.nn's or torchnorm's, without an
    activation of its own) whose activation can be fused."""
    if type(module) in _GROUP_NORMS:
        return getattr(module, "activation", None) is None
    return type(module) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                            tn_batch_norm.BatchNorm1d, tn_batch_norm.BatchNorm2d, tn_batch_norm.BatchNorm3d)


def add_norm(norm: torch.nn.Module, x: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]:
    """``(norm(x + residual), x + residual)``, one pass of torchnorm's op when
    both have the same shape and dtype (else the add, then the norm)."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        total = x + residual  # broadcasting or promoting: the op takes neither
        return norm(total), total
    if type(norm) in _LAYER_NORMS:
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps, residual)
    if type(norm) in _RMS_NORMS:
        return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps, residual)
    return norm(x, residual)


class FusedAddNorm(torch.nn.Module):
    """``x + residual`` and the norm of it, in one call: returns ``(norm(x +
    residual), x + residual)``. The norm module stays registered where it was
    in the model (held here as a plain attribute), so parameters and
    state_dict are the model's."""

    def __init__(self, norm: torch.nn.Module, norm_name: str) -> None:
        super().__init__()
        self.__dict__["_shared"] = norm
        self.norm_name = norm_name

    def forward(self, x: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]:
        return add_norm(self._shared, x, residual)

    def extra_repr(self) -> str:
        return f"norm={self.norm_name}"


class FusedNormAct(torch.nn.Module):
    """A GroupNorm or BatchNorm and the activation after it, in one call of
    torchnorm's op. The norm module stays registered where it was (held here
    as a plain attribute); BatchNorm's running statistics are updated as
    torch.nn does."""

    def __init__(self, norm: torch.nn.Module, norm_name: str, activation: str, negative_slope: float) -> None:
        super().__init__()
        self.__dict__["_shared"] = norm
        self.norm_name, self.activation, self.negative_slope = norm_name, activation, negative_slope

    def forward(self, x: Tensor) -> Tensor:
        norm = self._shared
        if type(norm) in _GROUP_NORMS:
            return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, self.activation,
                                self.negative_slope)
        return tn_batch_norm._batch_norm_forward(norm, x, self.activation, self.negative_slope, None)

    def extra_repr(self) -> str:
        return f"norm={self.norm_name}, activation={self.activation!r}"


class _Tracer(_graph.Tracer):
    # Norms stay single calls (torchnorm's drop-ins would be traced through).
    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return _takes_residual(m) or _takes_activation(m) or super().is_leaf_module(m, qualname)


def _is_add(node: fx.Node) -> bool:
    # Out-of-place adds of two traced values (an in-place one changes its
    # first operand, which the fused op would not).
    if node.op == "call_function" and node.target in (operator.add, torch.add):
        pass
    elif not (node.op == "call_method" and node.target == "add"):
        return False
    return (len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args))


def _add_name(gm: fx.GraphModule, base: str) -> str:
    name = base
    while hasattr(gm, name):
        name += "_"
    return name


def _fuse_add_norm(gm: fx.GraphModule, node: fx.Node, modules) -> bool:
    if not (node.op == "call_module" and _takes_residual(modules[node.target]) and len(node.args) == 1
            and not node.kwargs and isinstance(node.args[0], fx.Node) and _is_add(node.args[0])):
        return False
    add = node.args[0]
    name = _add_name(gm, f"{node.target.replace('.', '_')}_add_fused")
    gm.add_submodule(name, FusedAddNorm(modules[node.target], node.target))
    graph = gm.graph
    with graph.inserting_after(add):
        fused = graph.call_module(name, tuple(add.args))
    with graph.inserting_after(fused):
        total = graph.call_function(operator.getitem, (fused, 1))
    with graph.inserting_after(total):
        out = graph.call_function(operator.getitem, (fused, 0))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    add.replace_all_uses_with(total)
    graph.erase_node(add)
    return True


def _fuse_norm_act(gm: fx.GraphModule, node: fx.Node, modules) -> bool:
    if not (node.op == "call_module" and _takes_activation(modules[node.target]) and len(node.args) == 1
            and not node.kwargs):
        return False
    user = _graph.only_user(node)
    act = None if user is None else _graph.activation_of_node(user, modules)
    if act is None:
        return False
    name = _add_name(gm, f"{node.target.replace('.', '_')}_act_fused")
    gm.add_submodule(name, FusedNormAct(modules[node.target], node.target, act[0], act[1]))
    with gm.graph.inserting_after(user):
        fused = gm.graph.call_module(name, node.args)
    user.replace_all_uses_with(fused)
    gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return True


def _graph_copy(graph: fx.Graph) -> fx.Graph:
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy


def fuse_norms(model: torch.nn.Module) -> fx.GraphModule:
    """Traces ``model`` with torch.fx and fuses, for training and inference:

    - ``norm(a + b)`` where norm is a LayerNorm or RMSNorm (torch.nn's,
      torchnorm's, or a third-party one converted by
      :func:`torchnorm.convert`) -> one :class:`FusedAddNorm` call, whose
      sum output also replaces every other use of ``a + b`` (the residual
      stream). Inputs that broadcast are added first, then normalized.
    - a GroupNorm or BatchNorm1d/2d/3d (torch.nn's or torchnorm's) whose only
      user is a ReLU, LeakyReLU or SiLU (module, function or method) -> one
      :class:`FusedNormAct` call.

    The result shares ``model``'s parameters and buffers and has its
    state_dict keys; :func:`unfuse_norms` gives the unfused graph back.
    Convert third-party norms first (``torchnorm.convert``): unconverted ones
    are not fused. Raises ValueError when there is nothing to fuse, and
    torch.fx's error when the model cannot be traced.
    """
    gm = _graph.trace(model, copy_model=False, tracer=_Tracer())
    original = _graph_copy(gm.graph)
    modules = dict(gm.named_modules())
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and not node._erased:  # (an activation fused before is erased)
            fused += _fuse_add_norm(gm, node, modules) or _fuse_norm_act(gm, node, modules)
    if not fused:
        raise ValueError("fuse_norms: found no residual add feeding a LayerNorm/RMSNorm and no GroupNorm/BatchNorm "
                         "followed by ReLU/LeakyReLU/SiLU to fuse")
    gm.graph.lint()
    gm.recompile()
    gm.meta["torchnorm_unfused_graph"] = original
    return gm


def unfuse_norms(model: fx.GraphModule) -> fx.GraphModule:
    """The graph of a :func:`fuse_norms` result before fusion, as a new
    GraphModule sharing the parameters and buffers."""
    original: Optional[fx.Graph] = getattr(model, "meta", {}).get("torchnorm_unfused_graph")
    if not isinstance(model, fx.GraphModule) or original is None:
        raise ValueError(f"unfuse_norms: expected a GraphModule made by fuse_norms, got {type(model).__name__}")
    out = fx.GraphModule(model, _graph_copy(original), type(model).__name__)
    out.recompile()
    return out


def _traces_faithfully(module: torch.nn.Module) -> bool:
    """Whether a trace of module's forward holds for every call: required
    positional parameters only (an optional one would be traced as given)
    and no branch on self.training."""
    forward = type(module).forward
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
        source = inspect.getsource(forward)
    except (TypeError, OSError, ValueError):
        return False
    return all(p.kind == p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in params) and (
        "self.training" not in source)


def fuse_norms_in(model: torch.nn.Module) -> List[str]:
    """:func:`fuse_norms` applied, in place, to the largest submodules of
    ``model`` that torch.fx traces and that have something to fuse (for
    models that do not trace as a whole: transformers' BERT layers'
    ``*Output`` blocks, diffusers' ResNet blocks). Each such submodule is
    replaced by its fused GraphModule; :func:`unfuse_norms_in` puts the
    originals back. Returns the names of the replaced submodules.

    A torch.fx trace is specialized to what the forward decided while traced
    (Python conditions on its arguments, on ``self.training``), so only
    submodules whose forward takes required positional arguments only and
    does not read ``self.training`` are replaced; the others are searched.
    """
    fused: List[str] = []

    def visit(module: torch.nn.Module, prefix: str) -> None:
        for name, child in list(module._modules.items()):
            if child is None or isinstance(child, fx.GraphModule):
                continue
            path = f"{prefix}{name}"
            try:
                if not _traces_faithfully(child):
                    raise ValueError(path)
                gm = fuse_norms(child)
            except Exception:  # noqa: BLE001 - untraceable or nothing to fuse: try its children
                visit(child, path + ".")
                continue
            gm.meta["torchnorm_original_module"] = child
            module._modules[name] = gm
            fused.append(path)

    visit(model, "")
    return fused


def unfuse_norms_in(model: torch.nn.Module) -> List[str]:
    """Puts back the submodules that :func:`fuse_norms_in` replaced; returns their names."""
    restored: List[str] = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            original = getattr(child, "meta", {}).get("torchnorm_original_module") if child is not None else None
            if isinstance(child, fx.GraphModule) and original is not None:
                parent._modules[name] = original
                restored.append(f"{parent_name}.{name}" if parent_name else name)
    return restored
