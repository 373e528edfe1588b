"""Image encoders for embeddings: timm models, local checkpoints, hub ids, handcrafted features."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {},
)
