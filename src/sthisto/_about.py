"""The package version, for code below the package root (manifests, model checks).

``sthisto/__init__.py`` is the top of the import layers; modules that record or compare the
version read it here instead, so no layer imports the package root.
"""

from __future__ import annotations

try:
    # Written by hatch-vcs when the package is built or installed (also editable installs).
    from ._version import __version__ as __version__
except ImportError:  # a source tree that was never installed: look the version up on first use
    pass


def _version_from_metadata() -> str:
    # importlib.metadata scans every installed distribution, which is slow; only a source tree
    # without _version.py gets here, and only when the version is asked for.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sthisto")
    except PackageNotFoundError:
        return "0.0.0"


def __getattr__(name: str):
    if name == "__version__":
        globals()["__version__"] = value = _version_from_metadata()
        return value
    raise AttributeError(f"module 'sthisto._about' has no attribute {name!r}")
