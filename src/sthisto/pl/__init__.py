"""Plotting: gene maps over the H&E, metric distributions, training curves, domain maps, uncertainty."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "gene_maps": "._gene_maps",
        "metric_distribution": "._metrics",
        "metrics_heatmap": "._metrics",
        "training_curves": "._training",
        "domain_maps": "._domains",
        "slide_map": "._slide",
        "uncertainty_maps": "._uncertainty",
        "calibration_curve": "._uncertainty",
        "error_vs_spread": "._uncertainty",
    },
)
