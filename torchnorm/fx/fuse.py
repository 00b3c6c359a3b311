"""Training: swap Conv -> BatchNorm (-> + residual) (-> activation) chains for
torchnorm's memory-efficient blocks, and back."""
import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from ..nn.conv_bn import conv_bn_forward, conv_forward
from ..nn.sync_batch_norm import SyncBatchNorm
from . import _graph

__all__ = ["fuse_conv_bn", "unfuse_conv_bn", "FusedChain", "ConvOnRecipe"]

# Placeholders in a recorded step's arguments: the chain's running value,
# the block input, the residual and a ConvTranspose's output_size.
_PREV, _INPUT, _RESIDUAL, _OUTPUT_SIZE = "<prev>", "<input>", "<residual>", "<output_size>"


class FusedChain(torch.nn.Module):
    """One fused chain of a model returned by :func:`fuse_conv_bn`.

    It runs :func:`torchnorm.nn.conv_bn_forward` on the model's own conv and
    BatchNorm modules. Those stay registered where they were, not here, so
    the fused model's parameters, buffers and state_dict are the original
    model's. ``steps`` records the replaced nodes, for :func:`unfuse_conv_bn`.

    With ``exports_recipe`` (set by :func:`fuse_conv_bn` on a block without
    residual whose every user is another fused block's input or residual)
    it returns ``(output, recipe)``, and its users take the recipe as
    ``input_recipe`` or ``residual_recipe``:
    they keep it instead of the output for backward (see
    :func:`torchnorm.nn.conv_bn_forward`).
    """

    def __init__(self, conv: torch.nn.Module, bn: torch.nn.Module, activation: str, negative_slope: float,
                 steps: List[Tuple[str, Any, tuple, dict]]) -> None:
        super().__init__()
        self.__dict__["_shared"] = (conv, bn)  # plain attribute: not a submodule
        self.activation, self.negative_slope, self.steps = activation, negative_slope, steps
        self.exports_recipe = False

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None, output_size=None,
                input_recipe: Optional[tuple] = None, residual_recipe: Optional[tuple] = None):
        conv, bn = self._shared
        return conv_bn_forward(conv, bn, input, self.activation, self.negative_slope, residual, output_size,
                               input_recipe, self.exports_recipe, residual_recipe)

    def extra_repr(self) -> str:
        conv_name, bn_name = self.steps[0][1], self.steps[1][1]
        return f"conv={conv_name}, bn={bn_name}, activation={self.activation!r}"


class ConvOnRecipe(torch.nn.Module):
    """A conv without BatchNorm after it (a generator's last ConvTranspose,
    say) whose input is a :class:`FusedChain`'s output, in a model from
    :func:`fuse_conv_bn`: it keeps that block's recipe instead of the input
    (:func:`torchnorm.nn.conv_bn.conv_forward`). The conv stays registered
    where it was (``conv_name``), as with FusedChain."""

    def __init__(self, conv: torch.nn.Module, conv_name: str) -> None:
        super().__init__()
        self.__dict__["_shared"] = (conv,)  # plain attribute: not a submodule
        self.conv_name = conv_name

    def forward(self, input: torch.Tensor, output_size=None, input_recipe: Optional[tuple] = None) -> torch.Tensor:
        return conv_forward(self._shared[0], input, output_size, input_recipe)

    def extra_repr(self) -> str:
        return f"conv={self.conv_name}"


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _graph.ADD_FUNCTIONS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _template(node: fx.Node, prev: fx.Node, roles: Dict[fx.Node, str]) -> Tuple[str, Any, tuple, dict]:
    def swap(a):
        if a is prev:
            return _PREV
        return roles.get(a, a) if isinstance(a, fx.Node) else a
    return node.op, node.target, tuple(swap(a) for a in node.args), {k: swap(v) for k, v in node.kwargs.items()}


def _match(bn_node: fx.Node, modules: Dict[str, torch.nn.Module]):
    """(chain of nodes conv..end, residual node, activation) when bn_node ends
    a fusable chain, else None."""
    bn = modules[bn_node.target]
    epilogue = _graph.batch_norm_epilogue(bn, training=True)
    conv_node = bn_node.args[0] if bn_node.args else None
    if epilogue is None or not isinstance(conv_node, fx.Node) or conv_node.op != "call_module":
        return None
    conv = modules[conv_node.target]
    if (type(conv) not in _graph.CONV_TYPES + _graph.TRANSPOSED_TYPES or len(conv_node.users) != 1
            or bn.num_features != conv.out_channels):
        return None
    if _graph.output_size_of(conv_node, conv) is _graph.UNKNOWN_CALL:
        return None
    if conv.weight.dim() - 2 != {torch.nn.BatchNorm1d: 1, torch.nn.BatchNorm2d: 2, torch.nn.BatchNorm3d: 3,
                                 SyncBatchNorm: conv.weight.dim() - 2}.get(_bn_base(bn), -1):
        return None
    chain, residual = [conv_node, bn_node], None
    if epilogue[0] != "none" or len(bn_node.args) > 1 or bn_node.kwargs:
        # The BatchNorm applies its own activation (and takes the residual).
        residual = bn_node.args[1] if len(bn_node.args) > 1 else bn_node.kwargs.get("residual")
        return chain, residual, epilogue
    end = bn_node
    user = _graph.only_user(end)
    if user is not None and _is_add(user):
        other = [a for a in user.args if a is not end]
        if len(other) == 1 and isinstance(other[0], fx.Node):
            residual = other[0]
            chain.append(user)
            end = user
            user = _graph.only_user(end)
    if user is not None:
        act = _graph.activation_of_node(user, modules)
        if act is not None:
            chain.append(user)
            return chain, residual, act
    return chain, residual, epilogue


def _bn_base(bn: torch.nn.Module) -> Optional[type]:
    for base in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, SyncBatchNorm):
        if isinstance(bn, base):
            return base
    return None


def fuse_conv_bn(model: torch.nn.Module, save_memory: bool = True) -> fx.GraphModule:
    """Replaces every Conv1d/2d/3d or ConvTranspose1d/2d/3d -> BatchNorm (->
    + residual) (-> ReLU / LeakyReLU / SiLU) chain of ``model`` with one
    :class:`FusedChain` call and returns the result as a
    ``torch.fx.GraphModule``.

    The fused model shares ``model``'s parameters and buffers (training one
    trains the other) and has the same state_dict keys. It computes the same
    function, updates running statistics as torch.nn does, and in training
    keeps about half the activation memory for backward (see
    :mod:`torchnorm.nn.conv_bn`): with ``save_memory`` (default), a block
    whose output only feeds other blocks hands them its recipe, and they
    rebuild that output in backward instead of keeping it. Chains whose
    intermediate values are used elsewhere are left alone. A ConvTranspose's
    ``output_size`` goes to the block. The ResNet tail
    ``act(BN(conv(x)) + identity)`` becomes one block.
    :func:`unfuse_conv_bn` undoes it.

    Raises ValueError when the model has no Conv+BatchNorm chain.
    """
    gm = _graph.trace(model, copy_model=False)
    modules = dict(gm.named_modules())
    graph = gm.graph
    fused, made = 0, []
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target),
                                                      torch.nn.modules.batchnorm._BatchNorm):
            continue
        found = _match(node, modules)
        if found is None:
            continue
        chain, residual, (activation, negative_slope) = found
        conv_node, end = chain[0], chain[-1]
        roles = {conv_node.args[0]: _INPUT}
        if residual is not None:
            roles[residual] = _RESIDUAL
        output_size = _graph.output_size_of(conv_node, modules[conv_node.target])
        kwargs = {} if output_size is None else {"output_size": output_size}
        # The conv step as a call with the block's input (and output_size).
        steps = [(conv_node.op, conv_node.target, (_INPUT,), {k: _OUTPUT_SIZE for k in kwargs})]
        steps += [_template(n, prev, roles) for prev, n in zip(chain, chain[1:])]
        block = FusedChain(modules[conv_node.target], modules[node.target], activation, negative_slope, steps)
        name = f"{conv_node.target}_fused"
        while name in modules:  # a conv called more than once, into different BatchNorms
            name += "_"
        gm.add_submodule(name, block)
        modules[name] = block
        with graph.inserting_after(end):
            args = (conv_node.args[0],) if residual is None else (conv_node.args[0], residual)
            new = graph.call_module(name, args, kwargs)
        end.replace_all_uses_with(new)
        for n in reversed(chain):
            graph.erase_node(n)
        fused += 1
        made.append(new)
    if not fused:
        raise ValueError("fuse_conv_bn: found no Conv1d/2d/3d or ConvTranspose1d/2d/3d followed by a BatchNorm of "
                         "its output to fuse")
    if save_memory:
        _wire_recipes(graph, made, modules)
    graph.lint()
    gm.recompile()
    return gm


def _plain_conv_user(user: fx.Node, node: fx.Node, modules: Dict[str, torch.nn.Module]) -> bool:
    """Whether ``user`` calls a Conv / ConvTranspose module on ``node`` alone
    (a ConvTranspose's output_size aside)."""
    if user.op != "call_module" or not user.args or user.args[0] is not node:
        return False
    conv = modules.get(user.target)
    return (type(conv) in _graph.CONV_TYPES + _graph.TRANSPOSED_TYPES
            and _graph.output_size_of(user, conv) is not _graph.UNKNOWN_CALL
            and node not in user.args[1:] and node not in user.kwargs.values())


def _wire_recipes(graph: fx.Graph, made: List[fx.Node], modules: Dict[str, torch.nn.Module]) -> None:
    """Makes every block without residual whose users are all other blocks
    taking it as their input or their residual (not both), or plain convs of
    it, hand those its recipe (a plain conv's call becomes a ConvOnRecipe's).
    Other users would keep the output anyway, or might change it in place
    before the rebuild."""
    blocks = set(made)
    for node in made:
        users = list(node.users)
        if len(node.args) != 1 or not users or any(
                not _plain_conv_user(u, node, modules) and (u not in blocks or list(u.args).count(node) != 1
                                                            or node in u.kwargs.values())
                for u in users):
            continue
        modules[node.target].exports_recipe = True
        with graph.inserting_after(node):
            out = graph.call_function(operator.getitem, (node, 0))
        with graph.inserting_after(out):
            recipe = graph.call_function(operator.getitem, (node, 1))
        node.replace_all_uses_with(out, delete_user_cb=lambda u: u not in (out, recipe))
        for u in users:
            if u in blocks:
                role = "input_recipe" if u.args[0] is out else "residual_recipe"
                u.kwargs = {**u.kwargs, role: recipe}
                continue
            output_size = _graph.output_size_of(u, modules[u.target])
            name = f"{u.target}_on_recipe"
            while name in modules:
                name += "_"
            modules[name] = ConvOnRecipe(modules[u.target], u.target)
            graph.owning_module.add_submodule(name, modules[name])
            kwargs = {"input_recipe": recipe} if output_size is None else {"output_size": output_size,
                                                                           "input_recipe": recipe}
            with graph.inserting_after(u):
                new = graph.call_module(name, (out,), kwargs)
            u.replace_all_uses_with(new)
            graph.erase_node(u)


def unfuse_conv_bn(model: fx.GraphModule) -> fx.GraphModule:
    """The plain structure back: every :class:`FusedChain` call of a model from
    :func:`fuse_conv_bn` becomes its original conv, BatchNorm, add and
    activation calls again. Shares the parameters and buffers; the state_dict
    keys are the original model's."""
    if not isinstance(model, fx.GraphModule):
        raise TypeError(f"unfuse_conv_bn: expected a GraphModule from fuse_conv_bn, got {type(model).__name__}")
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    modules = dict(model.named_modules())
    restored = 0
    for node in model.graph.nodes:
        target = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(target, ConvOnRecipe):
            kwargs = {k: fx.map_arg(v, lambda n: env[n]) for k, v in node.kwargs.items() if k != "input_recipe"}
            env[node] = graph.call_module(target.conv_name, (env[node.args[0]],), kwargs)
            continue
        if not isinstance(target, FusedChain):
            source = node.args[0] if node.op == "call_function" and node.target is operator.getitem else None
            if isinstance(source, fx.Node) and source.op == "call_module" and isinstance(
                    modules.get(source.target), FusedChain):
                # (output, recipe) of a block exporting its recipe: the
                # output is the block's; the recipe goes (users drop it).
                if node.args[1] == 0:
                    env[node] = env[source]
                continue
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        roles = {_INPUT: env[node.args[0]]}
        if len(node.args) > 1:
            roles[_RESIDUAL] = env[node.args[1]]
        if "output_size" in node.kwargs:
            roles[_OUTPUT_SIZE] = fx.map_arg(node.kwargs["output_size"], lambda n: env[n])
        prev = None
        for op, step_target, args, kwargs in target.steps:
            def fill(a):
                if a == _PREV:
                    return prev
                return roles.get(a, a) if isinstance(a, str) else a
            prev = graph.create_node(op, step_target, tuple(fill(a) for a in args),
                                     {k: fill(v) for k, v in kwargs.items()})
        env[node] = prev
        restored += 1
    if not restored:
        raise ValueError("unfuse_conv_bn: the model has no FusedChain block (was it made by fuse_conv_bn?)")
    out = fx.GraphModule(model, graph, type(model).__name__)
    out.recompile()
    return out
