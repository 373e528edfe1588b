"""Method registry and networks: ``create``, ``list_models`` and one module per method."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {},
)
