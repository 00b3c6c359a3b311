"""Inference: fold eval-mode BatchNorm into the Conv / ConvTranspose / Linear before it."""
import contextlib
import copy
import dataclasses
import inspect
import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from ..nn.conv_bn import _activate, _ConvBNNd
from . import _graph

__all__ = ["fold_conv_bn", "fold_parameters", "FoldReport", "Fold"]

# Largest accepted error of one fold, relative to the largest magnitude of
# the unfused output, per dtype of the layer: a few units in the last place
# of the dtype times the growth of a long dot product.
DEFAULT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

_FOLDABLE_LAYERS = _graph.CONV_TYPES + _graph.TRANSPOSED_TYPES + _graph.LINEAR_TYPES


def fold_parameters(layer: torch.nn.Module, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``layer`` (Conv, ConvTranspose or Linear) with the
    inference BatchNorm ``(running_mean, running_var, eps, weight, bias)`` of
    its output channels folded in, computed in float64 and cast to the
    layer's dtype:

        s = weight / sqrt(running_var + eps)        (weight = 1 when None)
        W' = W * s       per output channel
        b' = (b - running_mean) * s + bias          (b = 0 when the layer has none)

    computed by the internal ops conv_bn_frozen folds with, the one home of
    this formula: ``_frozen_bn_affine`` (s and b') and
    ``_conv_weight_channel_scale`` (W'; it knows how a ConvTranspose's
    (in, out / groups, *k) weight holds its output channels).
    """
    def as_double(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach().double()

    scale, new_bias, _ = torch.ops.torchnorm._frozen_bn_affine(
        as_double(layer.bias), as_double(weight), as_double(bias), as_double(running_mean), as_double(running_var),
        eps)
    transposed = isinstance(layer, _graph.TRANSPOSED_TYPES)
    folded = torch.ops.torchnorm._conv_weight_channel_scale(as_double(layer.weight), scale,
                                                            getattr(layer, "groups", 1), transposed)
    dtype = layer.weight.dtype
    return folded.to(dtype), new_bias.to(dtype)


def _out_channels(layer: torch.nn.Module) -> int:
    return layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels


@dataclasses.dataclass
class Fold:
    """One BatchNorm the pass looked at."""

    layer: str          # the layer's qualified name ('' when there is none)
    batch_norm: str     # the BatchNorm's qualified name (or the functional call's node)
    folded: bool
    reason: str = ""    # why it was not folded
    error: Optional[float] = None  # max |folded - unfused| / max |unfused| on example_inputs


class FoldReport:
    """What :func:`fold_conv_bn` did: one :class:`Fold` per BatchNorm; ``str()``
    prints it as a table."""

    def __init__(self, folds: List[Fold], tolerance: Optional[float], output_error: Optional[float]) -> None:
        self.folds = folds
        self.tolerance = tolerance
        self.output_error = output_error

    @property
    def folded(self) -> List[Fold]:
        return [f for f in self.folds if f.folded]

    def __str__(self) -> str:
        rows = [("layer", "batch norm", "result", "error")]
        for f in self.folds:
            result = "folded" if f.folded else f"left: {f.reason}"
            rows.append((f.layer or "-", f.batch_norm, result, "-" if f.error is None else f"{f.error:.2e}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = f"{len(self.folded)} of {len(self.folds)} BatchNorms folded"
        if self.tolerance is not None:
            summary += f"; each fold checked on the example inputs (tolerance {self.tolerance:g} relative)"
        if self.output_error is not None:
            summary += f"; model output error {self.output_error:.2e} relative"
        return "\n".join(lines + [summary])

    __repr__ = __str__


@dataclasses.dataclass
class _Candidate:
    bn_node: fx.Node
    layer_node: fx.Node
    layer: torch.nn.Module
    stats: Tuple[Any, ...]                    # running_mean, running_var, eps, weight, bias
    activation: Tuple[str, float] = ("none", 0.01)
    act_module: Optional[torch.nn.Module] = None  # timm's act, kept as a module
    residual: Optional[fx.Node] = None
    block: Optional[str] = None               # a torchnorm ConvBN block replaced whole
    output_size: Any = None                   # a ConvTranspose call's (value, node or list of them)

    @property
    def input_node(self) -> fx.Node:
        return self.layer_node.args[0]


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_BATCH_NORM_SIGNATURE = inspect.signature(torch.nn.functional.batch_norm)


def _functional_batch_norm(node: fx.Node, gm: fx.GraphModule):
    """(input node, stats) of an inference F.batch_norm call whose statistics
    and parameters are attributes of the model, else (None, reason)."""
    bound = _BATCH_NORM_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a["training"] is not False:
        return None, "in training mode (training=True)"
    tensors = []
    for name in ("running_mean", "running_var", "weight", "bias"):
        value = a[name]
        if value is None and name in ("weight", "bias"):
            tensors.append(None)
        elif isinstance(value, fx.Node) and value.op == "get_attr":
            tensors.append(_attribute(gm, value.target))
        else:
            return None, f"{name} is not a constant attribute of the model"
    mean, var, weight, bias = tensors
    return (a["input"], (mean, var, float(a["eps"]), weight, bias)), ""


# Functional layers (F.conv2d is torch.conv2d): the module each call equals,
# its arguments after (input, weight, bias), which are that module's
# constructor arguments of the same names, and its weight's rank.
_CONV_OPTIONS = ("stride", "padding", "dilation", "groups")
_TRANSPOSED_OPTIONS = ("stride", "padding", "output_padding", "groups", "dilation")
_FUNCTIONAL_LAYERS = {
    torch.conv1d: (torch.nn.Conv1d, _CONV_OPTIONS, 3),
    torch.conv2d: (torch.nn.Conv2d, _CONV_OPTIONS, 4),
    torch.conv3d: (torch.nn.Conv3d, _CONV_OPTIONS, 5),
    torch.conv_transpose1d: (torch.nn.ConvTranspose1d, _TRANSPOSED_OPTIONS, 3),
    torch.conv_transpose2d: (torch.nn.ConvTranspose2d, _TRANSPOSED_OPTIONS, 4),
    torch.conv_transpose3d: (torch.nn.ConvTranspose3d, _TRANSPOSED_OPTIONS, 5),
    torch.nn.functional.linear: (torch.nn.Linear, (), 2),
}


def _node_label(node: Any) -> str:
    """How the report names a layer node: its module's name, or the node's."""
    if not isinstance(node, fx.Node):
        return ""
    return node.target if node.op == "call_module" else node.name


def _functional_layer(node: fx.Node, gm: fx.GraphModule) -> Tuple[Optional[torch.nn.Module], str]:
    """The module a functional Conv / ConvTranspose / Linear call equals, holding
    the call's weight and bias, when those are attributes of the model and the
    other arguments constants; else (None, reason)."""
    cls, options, weight_rank = _FUNCTIONAL_LAYERS[node.target]
    names = ("input", "weight", "bias") + options
    if len(node.args) > len(names) or not set(node.kwargs) <= set(names[1:]) or not node.args:
        return None, "its arguments are not the functional signature's"
    bound = dict(zip(names, node.args), **node.kwargs)
    tensors = {}
    for name in ("weight", "bias"):
        value = bound.get(name)
        if value is None and name == "bias":
            tensors[name] = None
        elif isinstance(value, fx.Node) and value.op == "get_attr":
            tensors[name] = _attribute(gm, value.target)
        else:
            return None, f"its {name} is not a constant attribute of the model"
    kwargs = {name: bound[name] for name in options if name in bound}
    if any(isinstance(v, fx.Node) for v in kwargs.values()):
        return None, "its options are not constants"
    weight, bias = tensors["weight"], tensors["bias"]
    if not isinstance(weight, torch.Tensor) or weight.dim() != weight_rank:
        return None, f"its weight is not a {weight_rank}-D tensor"
    factory = dict(bias=bias is not None, device="meta", dtype=weight.dtype)
    try:
        if cls is torch.nn.Linear:
            layer = cls(weight.shape[1], weight.shape[0], **factory)
        elif cls in _graph.TRANSPOSED_TYPES:
            layer = cls(weight.shape[0], weight.shape[1] * kwargs.get("groups", 1), weight.shape[2:], **kwargs,
                        **factory)
        else:
            layer = cls(weight.shape[1] * kwargs.get("groups", 1), weight.shape[0], weight.shape[2:], **kwargs,
                        **factory)
    except (TypeError, ValueError, RuntimeError) as error:  # e.g. padding="same" with a stride
        return None, f"its arguments make no {cls.__name__}: {error}"
    layer.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
    return layer, ""


def _find_candidates(gm: fx.GraphModule) -> Tuple[List[_Candidate], List[Fold]]:
    modules = dict(gm.named_modules())
    calls = _graph.call_counts(gm.graph)
    candidates: List[_Candidate] = []
    skipped: List[Fold] = []

    def layer_of(input_node) -> Tuple[Optional[torch.nn.Module], str]:
        if (isinstance(input_node, fx.Node) and input_node.op == "call_function"
                and input_node.target in _FUNCTIONAL_LAYERS):
            if len(input_node.users) > 1:
                return None, f"the output of {input_node.name} is used more than once"
            return _functional_layer(input_node, gm)
        if not (isinstance(input_node, fx.Node) and input_node.op == "call_module"
                and isinstance(modules[input_node.target], _FOLDABLE_LAYERS)):
            return None, "does not follow a Conv, ConvTranspose or Linear"
        if calls[input_node.target] > 1:
            return None, f"{input_node.target} is called more than once"
        if len(input_node.users) > 1:
            return None, f"the output of {input_node.target} is used more than once"
        return modules[input_node.target], ""

    for node in list(gm.graph.nodes):
        found = None  # (input node, stats, epilogue, act module, residual)
        if node.op == "call_module" and isinstance(modules[node.target], _ConvBNNd):
            block = modules[node.target]
            name = node.target
            if block.bn.training or block.bn.running_mean is None:
                skipped.append(Fold(name + ".conv", name + ".bn", False, "in training mode: call model.eval() first"))
                continue
            residual = node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")
            output_size = node.args[2] if len(node.args) > 2 else node.kwargs.get("output_size")
            bn = block.bn
            candidates.append(_Candidate(node, node, block.conv,
                                         (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias),
                                         ((block.activation or "none"), block.negative_slope), None, residual, name,
                                         output_size))
            continue
        if node.op == "call_module" and isinstance(modules[node.target], torch.nn.modules.batchnorm._BatchNorm):
            bn = modules[node.target]
            name = node.target
            epilogue = _graph.batch_norm_epilogue(bn)
            if epilogue is None and not _graph.is_timm_batch_norm_act(bn):
                skipped.append(Fold("", name, False, f"{type(bn).__name__} is not a BatchNorm this pass knows"))
                continue
            if bn.training:
                skipped.append(Fold("", name, False, "in training mode: call model.eval() first"))
                continue
            if bn.running_mean is None:
                skipped.append(Fold("", name, False, "has no running statistics"))
                continue
            if calls[name] > 1:
                skipped.append(Fold("", name, False, "is called more than once (shared)"))
                continue
            act_module = None
            if _graph.is_timm_batch_norm_act(bn):
                if not isinstance(bn.drop, (torch.nn.Identity, torch.nn.Dropout)):
                    skipped.append(Fold("", name, False, f"its drop ({type(bn.drop).__name__}) is not an identity"))
                    continue
                act_module, epilogue = bn.act, ("none", 0.01)
            residual = node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")
            found = (node.args[0], (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias), epilogue,
                     act_module, residual)
        elif node.op == "call_function" and node.target is torch.nn.functional.batch_norm:
            name = node.name
            parsed, reason = _functional_batch_norm(node, gm)
            if parsed is None:
                skipped.append(Fold("", name, False, reason))
                continue
            found = (parsed[0], parsed[1], ("none", 0.01), None, None)
        if found is None:
            continue
        input_node, stats, epilogue, act_module, residual = found
        layer, reason = layer_of(input_node)
        if layer is None:
            skipped.append(Fold(_node_label(input_node), name, False, reason))
            continue
        if _out_channels(layer) != stats[0].numel():
            skipped.append(Fold(_node_label(input_node), name, False,
                                f"{_out_channels(layer)} output channels but {stats[0].numel()} statistics"))
            continue
        output_size = _graph.output_size_of(input_node, layer) if input_node.op == "call_module" else None
        if output_size is _graph.UNKNOWN_CALL:
            skipped.append(Fold(_node_label(input_node), name, False,
                                "is called with arguments this pass does not know"))
            continue
        candidates.append(_Candidate(node, input_node, layer, stats, epilogue, act_module, residual,
                                     output_size=output_size))
    return candidates, skipped


def _layer_name(c: _Candidate) -> str:
    return c.block + ".conv" if c.block else _node_label(c.layer_node)


def _bn_name(c: _Candidate) -> str:
    if c.block:
        return c.block + ".bn"
    return c.bn_node.target if c.bn_node.op == "call_module" else c.bn_node.name


def _folded_layer(c: _Candidate) -> torch.nn.Module:
    layer = copy.deepcopy(c.layer)
    weight, bias = fold_parameters(c.layer, *c.stats)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer


def _epilogue(c: _Candidate, z: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    if residual is not None:
        z = z + residual
    if c.act_module is not None:
        return c.act_module(z)
    return _activate(z, *c.activation)


@contextlib.contextmanager
def _full_float32():
    """TF32 off for cuDNN convolutions and matrix products (on by default for
    cuDNN): the fold checks compare the folded and the unfused layer, and
    TF32's 10-bit mantissa would put its rounding (about 1e-3 relative) into
    every comparison, over any float32 tolerance."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want64, got64 = want.detach().double(), got.detach().double()
    scale = want64.abs().max().item() if want64.numel() else 0.0
    diff = (got64 - want64).abs().max().item() if want64.numel() else 0.0
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else diff


class _Recorder(fx.Interpreter):
    """Runs the unfused graph and keeps the values the fold checks need."""

    def __init__(self, gm: fx.GraphModule, wanted: set) -> None:
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.wanted:
            # A copy: a later in-place op (ReLU(inplace=True)) may change it.
            self.values[n] = value.clone() if isinstance(value, torch.Tensor) else value
        return value


def _rewrite(gm: fx.GraphModule, c: _Candidate, layer: torch.nn.Module, replaced: Dict[fx.Node, fx.Node]) -> None:
    """Puts the folded layer in place and replaces the BatchNorm (or the whole
    ConvBN block) by its epilogue: + residual, then the activation.
    `replaced` maps each rewritten BatchNorm node to the node that now holds
    its value (a residual may be an earlier fold's output)."""
    graph = gm.graph
    if c.block:
        gm.add_submodule(c.block, layer)  # the folded conv takes the block's place
        layer_node = c.bn_node
        layer_node.args = layer_node.args[:1]
        layer_node.kwargs = {} if c.output_size is None else {"output_size": c.output_size}
    elif c.layer_node.op == "call_module":
        gm.add_submodule(c.layer_node.target, layer)
        layer_node = c.layer_node
    else:  # a functional call becomes a call of the folded module
        name = _free_attribute_name(gm, c.layer_node.name)
        gm.add_submodule(name, layer)
        with graph.inserting_after(c.layer_node):
            layer_node = graph.call_module(name, (c.input_node,))
        c.layer_node.replace_all_uses_with(layer_node)
        graph.erase_node(c.layer_node)
    inserted, last = [], layer_node
    if c.residual is not None:
        residual = c.residual
        while residual in replaced:
            residual = replaced[residual]
        with graph.inserting_after(last):
            last = graph.call_function(torch.add, (last, residual))
        inserted.append(last)
    if c.act_module is not None:
        act_name = f"{_bn_name(c)}_act"
        gm.add_submodule(act_name, c.act_module)
        with graph.inserting_after(last):
            last = graph.call_module(act_name, (last,))
        inserted.append(last)
    elif c.activation[0] != "none":
        with graph.inserting_after(last):
            last = graph.call_function(_activate, (last, c.activation[0], c.activation[1]))
        inserted.append(last)
    if c.bn_node is not layer_node:
        c.bn_node.replace_all_uses_with(last)
        graph.erase_node(c.bn_node)
    elif inserted:
        layer_node.replace_all_uses_with(last, delete_user_cb=lambda user: user not in inserted)
    replaced[c.bn_node] = last


def _free_attribute_name(gm: fx.GraphModule, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ...: the first name `gm` does not have."""
    name, n = base, 1
    while hasattr(gm, name):
        name, n = f"{base}_{n}", n + 1
    return name


def _drop_unused_attributes(gm: fx.GraphModule, targets: set) -> None:
    """Deletes the model attributes in `targets` (what folded functional calls
    read: a layer's weight and bias, F.batch_norm's statistics and parameters)
    that no get_attr node reads any more, unless they belong to a module the
    graph still calls (its forward reads them)."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for target in targets - read:
        owner_name, _, attr = target.rpartition(".")
        if owner_name in called:
            continue
        try:
            owner = gm.get_submodule(owner_name)
        except AttributeError:  # delete_all_unused_submodules took the whole module
            continue
        delattr(owner, attr)


def fold_conv_bn(model: torch.nn.Module, example_inputs: Optional[Sequence[Any]] = None,
                 tolerance: Optional[float] = None) -> fx.GraphModule:
    """Folds every inference BatchNorm into the Conv1d/2d/3d, ConvTranspose1d/2d/3d
    or Linear before it, and returns the folded model as a new
    ``torch.fx.GraphModule`` (``model`` is not changed).

    Folded: torch.nn's and torchnorm's BatchNorm modules, timm's BatchNormAct2d,
    ``F.batch_norm(..., training=False)`` calls whose statistics are model
    attributes, and torchnorm's ConvBN blocks, after a layer module or a
    functional call (``F.conv2d``, ``F.conv_transpose2d``, ``F.linear``, ...)
    whose weight and bias are model attributes (the call becomes a module
    holding the folded parameters; attributes no longer read are dropped),
    when the BatchNorm is in eval mode, directly follows the layer, and the
    layer's output feeds nothing else. A fused activation or residual stays,
    after the folded layer. Left alone (and listed in the report): BatchNorm
    in training mode, shared layers or BatchNorms, layer outputs used twice.

    Linear + BatchNorm1d is folded only with ``example_inputs`` that show a
    2-D input (on (N, L, F) input BatchNorm1d normalizes L, not Linear's F).

    With ``example_inputs`` (a tuple of the model's arguments) each fold is
    checked: the folded layer's output on the input the unfused layer saw is
    compared with the unfused BatchNorm's output, and a fold whose error
    exceeds ``tolerance`` (relative to the largest output; default per dtype,
    DEFAULT_TOLERANCE) is refused. These checks run with TF32 off, so on a
    GPU they measure the fold, not TF32's rounding. The returned module's
    ``fold_report`` (printable) lists every BatchNorm, what happened to it
    and its error.

    Raises ValueError when there is nothing to fold, saying why for each
    BatchNorm found (e.g. in training mode).
    """
    gm = _graph.trace(model, copy_model=True)
    candidates, folds = _find_candidates(gm)
    if not candidates:
        reasons = "; ".join(f"{f.batch_norm}: {f.reason}" for f in folds) or "the model has no BatchNorm"
        raise ValueError(f"fold_conv_bn: found no Conv/ConvTranspose/Linear followed by an inference BatchNorm "
                         f"to fold ({reasons})")
    training = [f.batch_norm for f in folds if f.reason.startswith("in training mode")]
    if training:
        warnings.warn(f"fold_conv_bn: left {len(training)} BatchNorm(s) in training mode unfolded "
                      f"({', '.join(training[:5])}{', ...' if len(training) > 5 else ''}); call model.eval() "
                      "to fold them", stacklevel=2)
    values: Dict[fx.Node, Any] = {}
    reference_output = None
    if example_inputs is not None:
        wanted = set()
        for c in candidates:
            wanted.update({c.input_node, c.bn_node})
            if c.residual is not None:
                wanted.add(c.residual)
            fx.node.map_arg(c.output_size, wanted.add)
        recorder = _Recorder(gm, wanted)
        with torch.no_grad(), _full_float32():
            reference_output = recorder.run(*example_inputs)
        values = recorder.values
    used_tolerance = None
    inputs = {id(c): c.input_node for c in candidates}  # before any rewrite changes them
    functional_attributes = {a.target for c in candidates for node in (c.layer_node, c.bn_node)
                             if node.op == "call_function" for a in node.all_input_nodes if a.op == "get_attr"}
    replaced: Dict[fx.Node, fx.Node] = {}
    for c in candidates:
        layer = _folded_layer(c)
        fold = Fold(_layer_name(c), _bn_name(c), True)
        if isinstance(c.layer, torch.nn.Linear):
            # BatchNorm1d normalizes dim 1, Linear makes the last one: the
            # same channels only for 2-D input, which only a run can show.
            seen = values.get(c.bn_node)
            if seen is None or seen.dim() != 2:
                fold.folded = False
                fold.reason = ("needs example_inputs to show a 2-D input" if seen is None
                               else f"BatchNorm1d on {seen.dim()}-D input normalizes another dim than Linear's")
                folds.append(fold)
                continue
        if example_inputs is not None:
            limit = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(layer.weight.dtype, 1e-4)
            used_tolerance = limit if used_tolerance is None else max(used_tolerance, limit)
            with torch.no_grad(), _full_float32():
                # (a ConvTranspose's output_size as the unfused run had it)
                size = () if c.output_size is None else (fx.node.map_arg(c.output_size, values.__getitem__),)
                got = _epilogue(c, layer(values[inputs[id(c)]], *size), values.get(c.residual))
            fold.error = _relative_error(got, values[c.bn_node])
            if not fold.error <= limit:
                fold.folded, fold.reason = False, f"error {fold.error:.2e} over the tolerance {limit:g}"
                folds.append(fold)
                continue
        _rewrite(gm, c, layer, replaced)
        folds.append(fold)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    _drop_unused_attributes(gm, functional_attributes)
    gm.recompile()
    output_error = None
    if example_inputs is not None:
        with torch.no_grad(), _full_float32():
            folded_output = gm(*example_inputs)
        if isinstance(reference_output, torch.Tensor) and isinstance(folded_output, torch.Tensor):
            output_error = _relative_error(folded_output, reference_output)
    gm.fold_report = FoldReport(folds, used_tolerance, output_error)
    return gm
