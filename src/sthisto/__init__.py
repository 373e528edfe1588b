"""sthisto: predict spatial gene expression from H&E histology.

Sub-packages load on first attribute access so that ``import sthisto`` stays fast and does
not import torch, Lightning, timm or torch-geometric.
"""

from __future__ import annotations

import importlib
import sys

try:
    # Written by hatch-vcs when the package is built or installed (also editable installs).
    from ._version import __version__
except ImportError:  # a source tree that was never installed: look the version up on first use
    pass


class _TorchvisionImportHook:
    """Apply sthisto's torchvision compatibility step when torchvision is first imported.

    A CUDA torchvision wheel beside CPU torch cannot be imported (``operator torchvision::nms
    does not exist``) until :func:`sthisto._compat.ensure_torchvision` has run; with this
    finder, a user's own ``import timm`` / ``import torchvision`` / ``import lightning`` after
    ``import sthisto`` works too. Installing it costs nothing: torch is imported only when
    torchvision is, and the finder then steps aside for the regular import.
    """

    def find_spec(self, fullname, path=None, target=None):  # importlib's meta-path finder protocol
        if fullname == "torchvision":
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            try:
                from ._compat import ensure_torchvision

                ensure_torchvision()
            except Exception:  # never break the user's import; torchvision then raises its own error
                pass
        return None


if "torchvision" not in sys.modules and not any(type(f).__name__ == "_TorchvisionImportHook" for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionImportHook())

_SUBMODULES = ("pp", "tl", "pl", "io", "datasets", "models", "encoders", "engine")

__all__ = ["__version__", "settings", *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "settings":
        from ._logging import settings

        return settings
    if name == "__version__":
        from ._about import __version__ as value

        globals()["__version__"] = value
        return value
    raise AttributeError(f"module 'sthisto' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
