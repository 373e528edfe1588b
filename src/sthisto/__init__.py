"""sthisto: predict spatial gene expression from H&E histology.

Sub-packages load on first attribute access so that ``import sthisto`` stays fast and does
not import torch, Lightning, timm or torch-geometric.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sthisto")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

_SUBMODULES = ("pp", "tl", "pl", "io", "datasets", "models", "encoders", "engine")

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'sthisto' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
