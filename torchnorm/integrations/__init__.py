"""Support for the models of transformers, diffusers and timm.

Importing this package registers :func:`torchnorm.convert`'s conversions of
those libraries' norm classes (by name: none of the libraries is imported).
"""
from . import diffusers, timm, transformers  # noqa: F401

__all__ = ["diffusers", "timm", "transformers"]
