"""Preprocessing: gene selection, normalisation, spatial graphs, stain normalisation, patches, embeddings."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "PatchSpec": "._patches",
        "PatchDataset": "._patches",
    },
)
