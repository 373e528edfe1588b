"""Method registry and networks: ``create``, ``list_models`` and one module per method."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "create": "._registry",
        "list_models": "._registry",
        "register_method": "._registry",
        "ExpressionModel": "._protocol",
        "HGGEFNet": ".hggef",
        "HisToSGENet": ".histosge",
        "histosge_features": ".histosge",
        "HistoSPACEAutoencoder": ".histospace",
        "HistoSPACERegressor": ".histospace",
        "RidgeBaseline": ".ridge",
        "THItoGeneNet": ".thitogene",
    },
)
