"""Tools: list methods, train, predict, calibrate, super-resolve, cross-validate, evaluate."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "list_methods": "._train",
        "train": "._train",
        "predict": "._train",
        "predict_distributed": "._distributed",
        "superresolve": "._superresolve",
        "get_model": "._train",
        "pretrain_autoencoder": "..models.histospace",
        "evaluate": "._evaluate",
        "get_metrics": "._evaluate",
        "cross_validate": "._cross_validate",
        "calibrate": "._calibrate",
    },
)
