"""The one training loop (Lightning) shared by every method."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {},
)
