"""Preprocessing: gene selection, normalisation, spatial graphs, stain normalisation, patches, embeddings."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
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
        "histosge_features": "._embed",
        "tissue_mask": "._tissue",
        "tile": "._tile",
        "pool": "._pool",
    },
)
