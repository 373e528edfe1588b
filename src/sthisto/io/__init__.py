"""Readers and writers: her2st, HEST-1k, Space Ranger, SpatialData, images, saved models."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "load_model": "._model",
        "read_her2st": "._her2st",
        "read_hest": "._hest",
        "read_visium": "._visium",
        "from_spatialdata": "._spatialdata",
        "to_spatialdata": "._spatialdata",
        "read_image": "._image",
    },
)
