"""Readers and writers: her2st, Space Ranger, SpatialData, images, saved models."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {},
)
