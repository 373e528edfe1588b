"""Preprocessing: gene selection, normalisation, spatial graphs, stain normalisation, patches, embeddings."""

from .._lazy import lazy_exports

_exported_getattr, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "PatchSpec": "._patches",
        "PatchDataset": "._patches",
        "select_genes": "._genes",
        "normalize": "._normalize",
        "normalize_counts": "._normalize",
        "size_factors": "._normalize",
        "spatial_graph": "._graph",
        "knn_edge_index": "._graph",
        "stain_normalize": "._stain",
        "embed": "._embed",
        "tissue_mask": "._tissue",
        "tile": "._tile",
        "pool": "._pool",
    },
)


def __getattr__(name: str):
    if name == "histosge_features":
        # Moved with its method (preprocessing must not import the methods); the old name still
        # works for a deprecation period, resolved by name so that no pp module imports models.
        import importlib
        import warnings

        warnings.warn(
            "sthisto.pp.histosge_features moved to sthisto.models.histosge_features; "
            "the old name will be removed in a future release.",
            FutureWarning,
            stacklevel=2,
        )
        return importlib.import_module("sthisto.models.histosge").histosge_features
    return _exported_getattr(name)
