"""Tools: list methods, train, predict, super-resolve, cross-validate, evaluate."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {},
)
