"""Pieces shared by the third-party conversions: torchnorm subclasses of a
library's norm class, and the RMSNorm family's forward and recognition."""
import inspect
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import functional as F
from ..nn.convert import _BACK, NotConvertible, retyped

_HALF = (torch.float16, torch.bfloat16)
_SUBCLASSES: Dict[Tuple[type, str], type] = {}


def torchnorm_subclass(base: type, kind: str, forward: Callable, **attributes) -> type:
    """A subclass of the library's class ``base`` whose forward is torchnorm's
    (one per ``(base, kind)``). Keeping the library's class as a base keeps
    its ``isinstance`` checks (weight init, fp32 module lists), attributes,
    repr and state_dict; ``attributes`` become class attributes, so a
    converted module's ``__dict__`` is the original's. Its way back is the
    module retyped to ``base``."""
    key = (base, kind)
    if key not in _SUBCLASSES:
        namespace = dict(attributes, forward=forward, __module__=__name__.rsplit(".", 1)[0],
                         __doc__=f"{base.__name__} running torchnorm's kernels ({kind}); "
                                 "torchnorm.convert(model, back=True) turns it back.")
        cls = type(base.__name__, (base,), namespace)
        _BACK[cls] = lambda module, base=base: retyped(module, base)
        _SUBCLASSES[key] = cls
    return _SUBCLASSES[key]


def swap_to(module: torch.nn.Module, kind: str, forward: Callable, **attributes) -> torch.nn.Module:
    """``module`` retyped to its torchnorm subclass (parameters shared)."""
    return retyped(module, torchnorm_subclass(type(module), kind, forward, **attributes))


def activation_of(module: Optional[torch.nn.Module]) -> Optional[Tuple[str, float]]:
    """(name, negative_slope) of an activation module torchnorm's kernels
    fuse, ``("none", 0.01)`` for None/Identity, None for any other."""
    from ..fx._graph import _activation_of_module

    if module is None:
        return "none", 0.01
    return _activation_of_module(module)


# ---------------------------------------------------------------------------
# The RMSNorm family: weight * x / sqrt(mean(x**2) + eps) over the last
# dimension, where libraries differ in the attribute that holds eps, whether
# the scale is weight or 1 + weight (Gemma), an optional bias (diffusers), and
# the dtype of the result when input and weight dtypes differ.
# ---------------------------------------------------------------------------

EPS_ATTRIBUTES = ("variance_epsilon", "eps", "epsilon")


def rms_norm_forward(self, hidden_states: Tensor, residual: Optional[Tensor] = None):
    """Forward of a converted RMSNorm-family module, with class attributes
    ``_tn_eps`` (the eps attribute's name), ``_tn_offset`` (0 or 1: the scale
    is ``offset + weight``) and ``_tn_promote`` (the result has the promoted
    dtype of input and weight, as Llama's ``weight * x.to(dtype)``; else the
    input's). With ``residual``: ``(norm(x + residual), x + residual)`` from
    one pass (see :func:`torchnorm.functional.rms_norm`)."""
    x = hidden_states
    weight, bias = self._parameters.get("weight"), self._parameters.get("bias")
    out_dtype = x.dtype
    if weight is not None:
        if self._tn_promote:
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
        if self._tn_offset:
            # Gemma scales by 1 + weight in float32 (or wider).
            weight = weight.float() + 1.0 if weight.dtype in _HALF else weight + 1.0
        if weight.dtype != x.dtype and not (weight.dtype == torch.float32 and x.dtype in _HALF):
            # Mixed dtypes the kernel does not take: compute in the wider one.
            wide = torch.promote_types(x.dtype, weight.dtype)
            x, weight = x.to(wide), weight.to(wide)
            residual = None if residual is None else residual.to(wide)
    eps = getattr(self, self._tn_eps)
    result = F.rms_norm(x, [x.shape[-1]], weight, eps, residual)
    out, total = (result, None) if residual is None else result
    if bias is not None:
        out = out + bias
    out = out if out.dtype == out_dtype else out.to(out_dtype)
    return out if residual is None else (out, total.to(hidden_states.dtype))


def _probe_copy(module: torch.nn.Module, params: Dict[str, Tensor]) -> torch.nn.Module:
    # The module's class and attributes with other parameters, and no hooks.
    probe = type(module).__new__(type(module))
    probe.__dict__ = module.__dict__.copy()
    probe._parameters = dict(params)
    probe._buffers, probe._modules = {}, {}
    return probe


_PROBED: Dict[type, Tuple[str, float, bool]] = {}


def recognize_rms_norm(module: torch.nn.Module) -> Tuple[str, float, bool]:
    """(eps attribute, offset, promote) of a module whose forward computes
    ``(offset + weight) * x / sqrt(mean(x**2) + eps) (+ bias)`` over the last
    dimension, found by running its class's forward once on float64 probes
    (cached per class), so the conversion matches the library's code as
    installed, whatever copy of it the class is. Raises NotConvertible
    otherwise."""
    cls = type(module)
    if cls in _PROBED:
        return _PROBED[cls]
    if set(module._parameters) - {"weight", "bias"} or module._buffers or module._modules:
        raise NotConvertible("holds parameters, buffers or submodules other than weight and bias")
    weight = module._parameters.get("weight")
    if weight is not None and weight.dim() != 1:
        raise NotConvertible(f"weight has shape {tuple(weight.shape)}, not (hidden,)")
    eps_name = next((n for n in EPS_ATTRIBUTES if isinstance(getattr(module, n, None), float)), None)
    if eps_name is None:
        raise NotConvertible(f"has no float eps attribute (looked for {', '.join(EPS_ATTRIBUTES)})")
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    if len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise NotConvertible(f"forward takes {[p.name for p in params]}, not one input")
    hidden = weight.numel() if weight is not None else 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, hidden, generator=g, dtype=torch.float64) * 0.3  # mean square ~0.09: eps = 0.25 matters
    probe_params = {n: torch.nn.Parameter(torch.randn(hidden, generator=g, dtype=torch.float64), requires_grad=False)
                    for n, p in module._parameters.items() if p is not None}
    probe = _probe_copy(module, probe_params)
    setattr(probe, eps_name, 0.25)
    try:
        with torch.no_grad():
            out = cls.forward(probe, x)
    except Exception as error:  # noqa: BLE001 - any failure means "not this math"
        raise NotConvertible(f"its forward failed on a float64 probe ({error!r})") from None
    normalized = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 0.25)
    found = None
    for offset in ((0.0, 1.0) if weight is not None else (0.0,)):
        expected = normalized if weight is None else normalized * (offset + probe_params["weight"])
        if "bias" in probe_params:
            expected = expected + probe_params["bias"]
        # The libraries compute in float32: compare at float32's resolution.
        if isinstance(out, Tensor) and out.shape == x.shape and torch.allclose(out.double(), expected, 1e-5, 1e-6):
            found = offset
            break
    if found is None:
        raise NotConvertible("its forward does not compute (weight or 1 + weight) * x / sqrt(mean(x**2) + eps) "
                             "over the last dimension")
    promote = False
    if weight is not None:
        # Which dtype it returns for a bfloat16 input and a float32 weight.
        probe = _probe_copy(module, {n: p.float() for n, p in probe_params.items()})
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (torch warns of the mixed dtypes)
            promote = cls.forward(probe, x[:1].bfloat16()).dtype == torch.float32
    _PROBED[cls] = (eps_name, found, promote)
    return _PROBED[cls]


def convert_rms_norm(module: torch.nn.Module) -> torch.nn.Module:
    """The conversion of any RMSNorm-family module (see recognize_rms_norm)."""
    eps_name, offset, promote = recognize_rms_norm(module)
    kind = f"rms_norm eps={eps_name} offset={offset:g} promote={promote}"
    return swap_to(module, kind, rms_norm_forward, _tn_eps=eps_name, _tn_offset=offset, _tn_promote=promote,
                   _tn_residual=True)
