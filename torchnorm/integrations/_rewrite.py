"""Fusion inside layers that torch.fx cannot trace, by rewriting the
statements of the library's own forward (as installed) that a fused op
replaces, and nothing else:

- residual norm: ``x = r + x; r = x; x = self.N(x)`` (a pre-norm decoder
  layer's residual add and its post-attention norm) becomes
  ``x, r = add_norm(self.N, x, r)``: one pass computing the sum and its norm;
- norm + activation: ``x = self.N(x); x = self.A(x)`` (a ResNet block's
  GroupNorm + SiLU) becomes ``x = norm_act(self.N, self.A, x)``.

The helpers decide per call: a norm or activation torchnorm cannot fuse runs
as before. The rewritten forward is compiled in the library module's globals
(decorators included) and installed on a torchnorm subclass of the layer's
class (see :func:`._common.torchnorm_subclass`), so the layer keeps its
parameters, state_dict, isinstance checks; retyping it to its class undoes it.
"""
import ast
import inspect
import textwrap
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor

from .. import functional as F
from ..fx.norms import _GROUP_NORMS, _takes_residual, add_norm
from ..nn.convert import retyped
from ._common import activation_of, torchnorm_subclass


def fused_add_norm(norm: torch.nn.Module, x: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]:
    """``(norm(x + residual), x + residual)``: torchnorm's residual op when
    the norm takes one (converted first), else the add, then the norm."""
    if _takes_residual(norm):
        return add_norm(norm, x, residual)
    total = x + residual
    return norm(total), total


def fused_norm_act(norm: torch.nn.Module, act: torch.nn.Module, x: Tensor) -> Tensor:
    """``act(norm(x))``: one GroupNorm kernel with the activation fused when
    norm is a GroupNorm and act one torchnorm fuses, else as written."""
    found = activation_of(act) if type(norm) in _GROUP_NORMS and getattr(norm, "activation", None) is None else None
    if found is None or found[0] == "none":
        return act(norm(x))
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, found[0], found[1])


_HELPERS = {"__torchnorm_add_norm": fused_add_norm, "__torchnorm_norm_act": fused_norm_act}


def _name(node, ident=None) -> bool:
    return isinstance(node, ast.Name) and (ident is None or node.id == ident)


def _assign(stmt) -> Tuple[str, ast.expr]:
    """(target, value) of ``name = value``, else (None, None)."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and _name(stmt.targets[0]):
        return stmt.targets[0].id, stmt.value
    return None, None


def _self_call(value, arg: str):
    """The attribute N of ``self.N(arg)``, else None."""
    if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and _name(value.func.value, "self")
            and len(value.args) == 1 and _name(value.args[0], arg) and not value.keywords):
        return value.func.attr
    return None


def _attr(name: str) -> ast.expr:
    return ast.Attribute(value=ast.Name("self", ast.Load()), attr=name, ctx=ast.Load())


def _residual_norm(stmts, i):
    x, add = _assign(stmts[i])
    if x is None or not (isinstance(add, ast.BinOp) and isinstance(add.op, ast.Add) and _name(add.left)
                         and _name(add.right) and x in (add.left.id, add.right.id)):
        return None
    r = add.right.id if add.left.id == x else add.left.id
    if r == x or i + 2 >= len(stmts):
        return None
    r2, value = _assign(stmts[i + 1])
    x2, call = _assign(stmts[i + 2])
    if r2 != r or not _name(value, x) or x2 != x:
        return None
    norm = _self_call(call, x)
    if norm is None:
        return None
    new = ast.Assign(targets=[ast.Tuple([ast.Name(x, ast.Store()), ast.Name(r, ast.Store())], ast.Store())],
                     value=ast.Call(ast.Name("__torchnorm_add_norm", ast.Load()),
                                    [_attr(norm), ast.Name(x, ast.Load()), ast.Name(r, ast.Load())], []))
    return 3, new


def _norm_act(stmts, i):
    x, call = _assign(stmts[i])
    norm = None if x is None else _self_call(call, x)
    if norm is None or i + 1 >= len(stmts):
        return None
    x2, call2 = _assign(stmts[i + 1])
    act = None if x2 != x else _self_call(call2, x)
    if act is None:
        return None
    new = ast.Assign(targets=[ast.Name(x, ast.Store())],
                     value=ast.Call(ast.Name("__torchnorm_norm_act", ast.Load()),
                                    [_attr(norm), _attr(act), ast.Name(x, ast.Load())], []))
    return 2, new


RULES: Dict[str, Callable] = {"residual_norm": _residual_norm, "norm_act": _norm_act}


def _rewrite_block(stmts: List[ast.stmt], rule: Callable) -> Tuple[List[ast.stmt], int]:
    out, count, i = [], 0, 0
    while i < len(stmts):
        found = rule(stmts, i)
        if found is not None:
            span, new = found
            out.append(ast.copy_location(new, stmts[i]))
            count, i = count + 1, i + span
            continue
        stmt = stmts[i]
        for field in ("body", "orelse"):  # inside if / for / with blocks too
            block = getattr(stmt, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                new_block, n = _rewrite_block(block, rule)
                setattr(stmt, field, new_block)
                count += n
        out.append(stmt)
        i += 1
    return out, count


_REWRITTEN: Dict[Tuple[type, str], Callable] = {}


def rewritten_forward(cls: type, rule: str) -> Callable:
    """cls.forward with the statements of ``rule`` replaced by the fused
    helpers' calls (cached). Raises ValueError, naming the class, when its
    forward has none of them or cannot be rewritten."""
    key = (cls, rule)
    if key in _REWRITTEN:
        return _REWRITTEN[key]
    plain = inspect.unwrap(cls.forward)
    try:
        lines, first = inspect.getsourcelines(cls.forward)
    except (OSError, TypeError) as error:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__}: its forward's source is not available ({error})")
    tree = ast.parse(textwrap.dedent("".join(lines)))
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef) or "super" in {n.id for n in ast.walk(fdef) if isinstance(n, ast.Name)}:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__}: its forward cannot be rewritten (not a plain "
                         "function, or it calls super())")
    fdef.body, count = _rewrite_block(fdef.body, RULES[rule])
    if not count:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__}: its forward is not recognized (no "
                         f"{rule.replace('_', ' ')} statements to fuse)")
    ast.increment_lineno(tree, first - 1)  # tracebacks point at the library's lines
    namespace = dict(plain.__globals__, **_HELPERS)
    exec(compile(ast.fix_missing_locations(tree), inspect.getsourcefile(plain) or "<torchnorm>", "exec"),
         namespace)
    _REWRITTEN[key] = namespace[fdef.name]
    return _REWRITTEN[key]


def check_rule(model: torch.nn.Module, select: Callable[[torch.nn.Module], bool], rule: str) -> Dict[type, Callable]:
    """The rewritten forward of each class of the modules ``select`` picks;
    raises ValueError, naming the class, for one that is not recognized."""
    return {type(m): rewritten_forward(type(m), rule) for m in model.modules() if select(m)}


def apply_rule(model: torch.nn.Module, select: Callable[[torch.nn.Module], bool], rule: str) -> List[str]:
    """Every module of ``model`` that ``select`` picks gets the forward
    rewritten by ``rule`` (in place); returns their names. Raises ValueError
    (naming the class) for a picked module whose forward is not recognized,
    before changing any."""
    picked = [(name, m) for name, m in model.named_modules() if select(m)]
    forwards = check_rule(model, select, rule)
    done = []
    for name, module in picked:
        new = retyped(module, torchnorm_subclass(type(module), f"fused {rule}", forwards[type(module)], _tn_rule=rule))
        _replace(model, name, module, new)
        done.append(name)
    return done


def remove_rule(model: torch.nn.Module, rule: str) -> List[str]:
    """Undoes :func:`apply_rule`: the modules back to their classes."""
    done = []
    for name, module in list(model.named_modules()):
        if type(module).__dict__.get("_tn_rule") == rule:
            _replace(model, name, module, retyped(module, type(module).__bases__[0]))
            done.append(name)
    return done


def _replace(model: torch.nn.Module, name: str, old: torch.nn.Module, new: torch.nn.Module) -> None:
    if not name:
        raise ValueError("the model itself is a layer to rewrite: apply to a model that contains it")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    assert parent._modules[child] is old
    parent._modules[child] = new
