"""Make torchvision importable beside a CPU build of torch.

On CPU-only machines the only available torchvision wheel may be a CUDA build. Its compiled
operator library (``torchvision/_C.so``) then fails to load, and ``import torchvision`` — and
with it ``import timm`` — dies with ``RuntimeError: operator torchvision::nms does not exist``:
torchvision registers fake (meta) kernels for ``nms`` and ``qnms`` unconditionally, which needs
the operator schemas that ``_C.so`` would have defined.

:func:`ensure_torchvision` defines just those two schemas when, and only when, ``_C.so`` cannot
be loaded. Everything sthisto uses from torchvision/timm (model definitions, transforms) is
pure Python and works; torchvision's compiled detection operators keep raising their own clear
error. Where torchvision works, the function does nothing. Every sthisto module that imports
timm or torchvision goes through :func:`import_timm` / :func:`import_torchvision`, and the
training engine calls :func:`ensure_torchvision` before importing Lightning (whose torchmetrics
imports torchvision). ``import sthisto`` installs a finder that runs it on the first import of
torchvision by anyone, so a user's own ``import timm`` works too.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ._logging import HINT, logger

# Operators torchvision registers fake kernels for at import time, whatever its build.
_SCHEMAS_NEEDED_AT_IMPORT = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_fallback_library = None  # keeps the schema definitions alive for the process


def _native_ops_load(package_dir: Path) -> bool:
    import torch

    candidates = [p for p in package_dir.glob("_C*") if p.suffix in (".so", ".pyd", ".dll")]
    for path in candidates:
        try:
            torch.ops.load_library(str(path))
            return True
        except OSError:
            continue
    return False


def ensure_torchvision() -> bool:
    """Apply the compatibility step if torchvision's compiled operators cannot load.

    Returns
    -------
    True if the step was applied in this call, False if it was not needed (torchvision absent,
    already imported, already patched, or its operators load natively).
    """
    global _fallback_library
    # The finder `import sthisto` installs would re-enter this function from find_spec below.
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_TorchvisionImportHook"]
    if _fallback_library is not None or "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    if _native_ops_load(Path(spec.origin).parent):
        return False

    import torch

    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS_NEEDED_AT_IMPORT:
        library.define(schema)
    _fallback_library = library
    logger.log(
        HINT,
        "torchvision's compiled operators do not load beside this torch build (CPU torch with a "
        "CUDA torchvision wheel); defined their schemas so that torchvision and timm import. "
        "torchvision.ops detection kernels stay unavailable; sthisto does not use them.",
    )
    return True


def import_torchvision() -> ModuleType:
    """Import torchvision after applying :func:`ensure_torchvision`."""
    ensure_torchvision()
    import torchvision

    return torchvision


def import_timm() -> ModuleType:
    """Import timm after applying :func:`ensure_torchvision` (timm imports torchvision)."""
    ensure_torchvision()
    import timm

    return timm
