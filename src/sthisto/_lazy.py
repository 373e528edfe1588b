"""Lazy attribute export for sub-packages.

Each sub-package lists its public names and the private module defining them; the module is
imported on first access. This keeps ``import sthisto.tl`` cheap: torch and friends load only
when a function that needs them is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable, Callable, list[str]]:
    """Build ``__getattr__``, ``__dir__`` and ``__all__`` for a package.

    Parameters
    ----------
    package
        The package's ``__name__``.
    exports
        Public name → module (relative to the package, e.g. ``"._train"``) that defines it.
    """

    def __getattr__(name: str):
        try:
            module_name = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module_name, package), name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # later lookups bypass __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__, sorted(exports)
