"""Graph helpers shared by the fold (inference) and fuse (training) passes."""
import copy
import operator
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx

from ..nn import batch_norm as tn_batch_norm
from ..nn import sync_batch_norm as tn_sync_batch_norm
from ..nn.conv_bn import _ConvBNNd

CONV_TYPES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
TRANSPOSED_TYPES = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
LINEAR_TYPES = (torch.nn.Linear,)

_ACTIVATION_MODULES = {torch.nn.ReLU: "relu", torch.nn.SiLU: "silu", torch.nn.LeakyReLU: "leaky_relu"}
_ACTIVATION_FUNCTIONS = {torch.relu: "relu", torch.nn.functional.relu: "relu", torch.relu_: "relu",
                         torch.nn.functional.silu: "silu", torch.nn.functional.leaky_relu: "leaky_relu"}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def is_timm_batch_norm_act(module: torch.nn.Module) -> bool:
    """timm's BatchNormAct2d (BatchNorm, then `drop`, then `act`), recognized
    without importing timm."""
    return (isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and type(module).__name__ == "BatchNormAct2d"
            and hasattr(module, "act") and hasattr(module, "drop"))


def _activation_of_module(module: torch.nn.Module) -> Optional[Tuple[str, float]]:
    if isinstance(module, torch.nn.Identity):
        return "none", 0.01
    name = _ACTIVATION_MODULES.get(type(module))
    if name is None:
        return None
    return name, getattr(module, "negative_slope", 0.01)


def batch_norm_epilogue(module: torch.nn.Module, training: bool = False) -> Optional[Tuple[str, float]]:
    """(activation, negative_slope) a BatchNorm module applies after
    normalizing, or None when it is not a BatchNorm these passes understand
    (a subclass with its own forward). For `training` use, timm's dropout
    must be an identity (in eval mode any Dropout is)."""
    if type(module) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                        tn_batch_norm.BatchNorm1d, tn_batch_norm.BatchNorm2d, tn_batch_norm.BatchNorm3d):
        return "none", 0.01
    if type(module) in (tn_batch_norm.BatchNormAct2d, tn_sync_batch_norm.SyncBatchNorm):
        return (module.activation or "none"), module.negative_slope
    identities = (torch.nn.Identity,) if training else (torch.nn.Identity, torch.nn.Dropout)
    if is_timm_batch_norm_act(module) and isinstance(module.drop, identities):
        return _activation_of_module(module.act)
    return None


class Tracer(fx.Tracer):
    """symbolic_trace's tracer, with the BatchNorm modules above and
    torchnorm's ConvBN blocks kept as single calls (leaves)."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, _ConvBNNd) or is_timm_batch_norm_act(m):
            return True
        return batch_norm_epilogue(m) is not None or super().is_leaf_module(m, qualname)


def trace(model: torch.nn.Module, copy_model: bool, tracer: Optional[fx.Tracer] = None) -> fx.GraphModule:
    """A new GraphModule of `model` (of a deep copy of it when copy_model;
    else sharing its modules, parameters and buffers), traced by `tracer`
    (default: Tracer())."""
    if copy_model:
        model = copy.deepcopy(model)
    if isinstance(model, fx.GraphModule):
        graph = fx.Graph()
        graph.output(graph.graph_copy(model.graph, {}))
    else:
        graph = (tracer or Tracer()).trace(model)
    return fx.GraphModule(model, graph, type(model).__name__)


def activation_of_node(node: fx.Node, modules: Dict[str, torch.nn.Module]) -> Optional[Tuple[str, float]]:
    """(activation, negative_slope) when `node` applies a known activation to
    its first argument and nothing else, else None."""
    if node.op == "call_module":
        found = _activation_of_module(modules[node.target])
        return found if found and found[0] != "none" else None
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        name = _ACTIVATION_FUNCTIONS[node.target]
        rest, kwargs = list(node.args[1:]), dict(node.kwargs)
        slope = 0.01
        if name == "leaky_relu":
            slope = rest.pop(0) if rest else kwargs.pop("negative_slope", 0.01)
        # What remains may only be `inplace`.
        if len(rest) > 1 or set(kwargs) - {"inplace"} or not isinstance(slope, (int, float)):
            return None
        return name, float(slope)
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS and len(node.args) == 1 and not node.kwargs:
        return _ACTIVATION_METHODS[node.target], 0.01
    return None


UNKNOWN_CALL = object()


def output_size_of(layer_node: fx.Node, layer: torch.nn.Module):
    """The ``output_size`` that a call of a layer module gives (a ConvTranspose
    takes one, positionally or by keyword; a value, a node, or a list of
    them), None for none, or UNKNOWN_CALL for a call with other arguments."""
    args, kwargs = layer_node.args, layer_node.kwargs
    if isinstance(layer, TRANSPOSED_TYPES):
        if len(args) == 2 and not kwargs:
            return args[1]
        if len(args) == 1 and set(kwargs) <= {"output_size"}:
            return kwargs.get("output_size")
    elif len(args) == 1 and not kwargs:
        return None
    return UNKNOWN_CALL


def only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def call_counts(graph: fx.Graph) -> Dict[str, int]:
    """How many call_module nodes call each module (a shared module is called more than once)."""
    counts: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts
