"""Datasets: the synthetic H&E + expression generator and reference gene lists."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "her2st_785_genes": "._reference",
        "synthetic": "._synthetic",
        "synthetic_he_image": "._synthetic_image",
        "synthetic_bins": "._synthetic_hd",
        "synthetic_transcripts": "._synthetic_hd",
    },
)
