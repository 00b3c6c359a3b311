"""torchnorm: fast normalization kernels for PyTorch.

Importing the package loads ``torchnorm._C``, which registers the
``torch.ops.torchnorm.*`` operators with their CPU kernels, CUDA kernels (when
built with CUDA) and autograd (csrc/autograd/), then their fake (meta)
kernels from Python (_fake.py).
"""
import torch  # noqa: F401  (the extension needs torch's symbols loaded)

try:
    from . import _C  # noqa: F401
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "torchnorm._C is not built. Run `make build` (or `python setup.py build_ext --inplace`) "
        f"in the torchnorm checkout first. ({error})"
    ) from error

from . import _fake  # noqa: F401,E402  (fake kernels; autograd is registered in C++)
from . import _rebuild_ops  # noqa: F401,E402  (the conv ops that rebuild their input: Python custom ops)
from . import functional, fx, nn, reference  # noqa: E402
from .nn import convert  # noqa: E402
from .nn.weight_norm import weight_norm, weight_norm_init_  # noqa: E402
from .nn.convert import ConversionReport, NotConvertible, register_conversion  # noqa: E402
from . import integrations  # noqa: E402  (registers third-party conversions by name; imports no library)

__all__ = ["functional", "fx", "nn", "reference", "convert", "register_conversion", "NotConvertible",
           "ConversionReport", "integrations", "weight_norm", "weight_norm_init_"]
__version__ = "0.1.0"
