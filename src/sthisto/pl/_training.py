"""Training curves from a model's history, a stored model record or a cross-validation record."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._constants import Uns
from .._errors import InputError, MissingKeyError

if TYPE_CHECKING:
    from typing import Any

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..models._protocol import ExpressionModel


def _as_history(value) -> dict[str, np.ndarray]:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Mapping):
        raise InputError(f"a training history is a mapping with 'epoch', 'train_loss', 'val_loss'; got {type(value)}.")
    return {k: np.asarray(v, dtype=float).ravel() for k, v in value.items()}


def _histories(source, key: str | None) -> dict[str, dict[str, np.ndarray]]:
    """Curves to draw: name → history."""
    if hasattr(source, "history") and not hasattr(source, "uns"):
        return {getattr(source, "name", "model") or "model": _as_history(source.history)}
    if isinstance(source, Mapping):
        return {"model": _as_history(source)}
    if not hasattr(source, "uns"):
        raise InputError("pass a trained model, a history mapping, or an AnnData together with key=...")
    store = source.uns.get(Uns.STHISTO, {})
    if key is None:
        raise InputError("pass key=... : a stored model (uns['sthisto']['models']) or a cross-validation key.")
    models = store.get(Uns.MODELS, {})
    folds = store.get("cross_validate", {}).get(key, {}).get("folds")
    if key in models:
        manifest = json.loads(str(models[key]["manifest"]))
        return {key: _as_history(manifest.get("history", {}))}
    if folds is not None:
        return {str(fold): _as_history(info["history"]) for fold, info in folds.items()}
    raise MissingKeyError(
        f"no stored model or cross-validation under {key!r} (models: {sorted(models)}, cross-validations: "
        f"{sorted(store.get('cross_validate', {}))})."
    )


def training_curves(
    source: ExpressionModel | Mapping[str, Any] | AnnData,
    key: str | None = None,
    *,
    log_scale: bool = False,
    ax: Axes | None = None,
    save: str | Path | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Training (solid) and validation (dashed) loss per epoch.

    Parameters
    ----------
    source
        A trained model (:class:`~sthisto.models.ExpressionModel`), its ``history`` mapping,
        or an AnnData with ``key`` naming a stored model (``uns['sthisto']['models']``) or a
        cross-validation (one curve per fold).
    key
        See ``source``.
    log_scale
        Logarithmic loss axis.
    ax
        Axes to draw into (default: a new figure).
    save, dpi
        Save the figure to this file.
    show
        Show the figure with ``plt.show()`` and return ``None`` (scanpy's convention). By
        default ``True`` when this call made the figure and ``False`` when it drew into a given
        ``ax``. ``False`` returns the axes.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` (not shown) instead.

    Returns
    -------
    ``None`` when the figure is shown (see ``show``; ``return_fig=True`` gives the figure).
    Otherwise the :class:`matplotlib.axes.Axes`. The epoch a model kept (lowest validation loss) is
    marked when validation was used.
    """
    own_figure = ax is None
    import matplotlib.pyplot as plt

    curves = _histories(source, key)
    if not any(len(h.get("train_loss", [])) for h in curves.values()):
        raise InputError(
            "no per-epoch training history to draw (closed-form methods such as ridge have none, and untrained "
            "models have none yet)."
        )
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.2), layout="constrained")
    cmap = plt.get_cmap("tab10")
    for number, (name, history) in enumerate(curves.items()):
        color = cmap(number % 10)
        epochs = history.get("epoch", np.arange(len(history.get("train_loss", []))))
        train = history.get("train_loss", np.array([]))
        val = history.get("val_loss", np.full(len(train), np.nan))
        label = name if len(curves) > 1 else "train"
        ax.plot(epochs[: len(train)], train, color=color, label=label)
        if np.isfinite(val).any():
            ax.plot(
                epochs[: len(val)],
                val,
                color=color,
                linestyle="--",
                label=f"{name} validation" if len(curves) > 1 else "validation",
            )
            best = int(np.nanargmin(val))
            ax.plot([epochs[best]], [val[best]], marker="o", color=color, markersize=4)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if log_scale:
        ax.set_yscale("log")
    ax.legend(frameon=False, fontsize="small")
    from ._utils import finish, show_or_return

    finish(ax.figure, save, dpi)
    return show_or_return(ax.figure, ax, show=show, return_fig=return_fig, own_figure=own_figure)
