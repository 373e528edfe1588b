"""Datasets: the synthetic H&E + expression generator and reference gene lists."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {},
)
