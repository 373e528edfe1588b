"""Where not to trust a prediction: value, spread and interval width maps; calibration; error vs spread."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Layers, Uns
from .._errors import InputError, MissingKeyError
from ..pp._patches import library_ids

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
from ._utils import (
    choose_library,
    default_diameter,
    draw_spots,
    finish,
    frame_axes,
    layer_values,
    library_geometry,
    show_or_return,
    spots_in_frame,
)


def _companion(adata, key: str, what: str) -> str:
    name = Layers.companion(key, what)
    if name not in adata.layers:
        raise MissingKeyError(
            f"layers[{name!r}] is missing. Write it with sthisto.tl.predict(adata, model, key_added={key!r}, "
            + ("uncertainty='ensemble')" if what == "std" else "interval=0.9) after sthisto.tl.calibrate(...)")
            + "."
        )
    return name


def uncertainty_maps(
    adata: AnnData,
    gene: str,
    *,
    key: str,
    library_id: str | None = None,
    img_key: str | None = "hires",
    cmap: str = "viridis",
    spread_cmap: str = "magma",
    spot_scale: float = 1.0,
    panel_size: float = 3.0,
    save: str | Path | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Predicted value, spread and interval width of one gene side by side over the H&E.

    Parameters
    ----------
    adata
        AnnData with ``layers[key]`` and at least one of ``layers[f"{key}_std"]`` or
        ``layers[f"{key}_lower"]`` / ``[f"{key}_upper"]`` (written by :func:`sthisto.tl.predict`).
    gene
        Gene to draw.
    key
        Prediction key (``key_added`` of :func:`sthisto.tl.predict`).
    library_id
        Section to draw (required when ``adata`` holds several).
    img_key
        Background image (``"hires"``); ``None`` draws spots only.
    cmap, spread_cmap
        Colour maps of the value panel and of the spread / width panels (each panel has its own
        colour bar: spread and width are not on the value's scale).
    spot_scale, panel_size
        Spot diameter multiplier; inches per panel.
    save, dpi
        Write the figure to this file.
    show
        Show the figure with ``plt.show()`` and return ``None`` (scanpy's convention). By
        default a figure this call made is shown; one drawn into a given ``ax`` is not.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` (not shown) instead.

    Returns
    -------
    ``None`` when the figure is shown (see ``show``); otherwise the
    :class:`matplotlib.figure.Figure` (value, then spread and/or width panels).

    Examples
    --------
    >>> sthisto.tl.predict(test, "ridge", uncertainty="ensemble", interval=0.9)
    >>> sthisto.pl.uncertainty_maps(test, "SYN_DEP_000", key="ridge")
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    if key not in adata.layers:
        raise MissingKeyError(
            f"layers[{key!r}] is missing; predict first with sthisto.tl.predict(..., key_added={key!r})."
        )
    has_std = Layers.companion(key, "std") in adata.layers
    has_interval = Layers.companion(key, "lower") in adata.layers and Layers.companion(key, "upper") in adata.layers
    if not (has_std or has_interval):
        _companion(adata, key, "std")  # raises, naming the fix
    library = choose_library(adata, library_id)
    image, scale, diameter = library_geometry(adata, library, img_key)
    rows = np.flatnonzero(library_ids(adata) == library)
    xy = spots_in_frame(adata, rows, scale)
    panels = [(f"{key}: {gene}", layer_values(adata, key, rows, gene), cmap)]
    if has_std:
        panels.append(("spread (std)", layer_values(adata, Layers.companion(key, "std"), rows, gene), spread_cmap))
    if has_interval:
        lower = layer_values(adata, Layers.companion(key, "lower"), rows, gene)
        upper = layer_values(adata, Layers.companion(key, "upper"), rows, gene)
        panels.append(("interval width", upper - lower, spread_cmap))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(panel_size * len(panels) + 0.6 * len(panels), panel_size), layout="constrained"
    )
    spot = diameter * scale if diameter is not None else default_diameter(xy)
    for ax, (title, values, colours) in zip(np.atleast_1d(axes), panels):
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = Normalize(vmin=low, vmax=high if high > low else low + 1e-9)
        collection = draw_spots(ax, xy, diameter=spot * spot_scale, values=values, cmap=colours, norm=norm)
        frame_axes(ax, image, xy, margin=spot)
        ax.set_title(title)
        fig.colorbar(collection, ax=ax, shrink=0.8, pad=0.01)
    finish(fig, save, dpi)
    return show_or_return(fig, fig, show=show, return_fig=return_fig, own_figure=True)


def calibration_curve(
    adata: AnnData,
    key: str,
    *,
    groups: bool = False,
    ax: Axes | None = None,
    save: str | Path | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Observed against nominal coverage of the intervals, from :func:`sthisto.tl.evaluate`.

    Parameters
    ----------
    adata
        AnnData holding ``uns['sthisto']['evaluate'][key]['calibration_curve']``.
    key
        The ``key_added`` of :func:`sthisto.tl.evaluate`.
    groups
        Also draw one faint line per group (section).
    ax
        Axes to draw into (default: a new figure).
    save, dpi
        Write the figure to this file.
    show
        Show the figure with ``plt.show()`` and return ``None`` (scanpy's convention). By
        default a figure this call made is shown; one drawn into a given ``ax`` is not.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` (not shown) instead.

    Returns
    -------
    ``None`` when the figure is shown (see ``show``); otherwise the
    :class:`matplotlib.figure.Figure`. Points on the diagonal are calibrated; below it the
    intervals are too narrow.
    """
    import matplotlib.pyplot as plt

    entry = adata.uns.get(Uns.STHISTO, {}).get("evaluate", {}).get(key)
    if entry is None or "calibration_curve" not in entry:
        raise MissingKeyError(
            f"no calibration curve under uns['sthisto']['evaluate'][{key!r}]. Predict with uncertainty= or "
            f"interval=, then run sthisto.tl.evaluate(adata, predicted=..., key_added={key!r})."
        )
    curve = pd.DataFrame(entry["calibration_curve"])
    own_figure = ax is None
    fig = ax.figure if ax is not None else plt.figure(figsize=(3.6, 3.4), layout="constrained")
    ax = ax if ax is not None else fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="ideal")
    if groups:
        for _, part in curve[curve["group"] != "overall"].groupby("group"):
            ax.plot(part["level"], part["observed"], color="tab:blue", alpha=0.3, linewidth=1)
    overall = curve[curve["group"] == "overall"]
    source = ", ".join(sorted(set(overall["source"].astype(str))))
    ax.plot(overall["level"], overall["observed"], marker="o", color="tab:blue", label=f"observed ({source})")
    ax.set_xlabel("nominal coverage")
    ax.set_ylabel("observed coverage")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize="small")
    finish(fig, save, dpi)
    return show_or_return(fig, fig, show=show, return_fig=return_fig, own_figure=own_figure)


def error_vs_spread(
    adata: AnnData,
    key: str,
    *,
    observed: str | None = None,
    genes: Sequence[str] | None = None,
    n_bins: int = 10,
    ax: Axes | None = None,
    save: str | Path | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Mean absolute error per bin of predicted spread: a rising line means the spread is informative.

    Parameters
    ----------
    adata
        AnnData with ``layers[key]`` and ``layers[f"{key}_std"]``.
    key
        Prediction key.
    observed
        Layer of observed values on the prediction scale; default: the raw counts normalised as
        the model's targets (from the ``tl.predict`` / ``tl.cross_validate`` record).
    genes
        Genes to pool (default: the predicted ones).
    n_bins
        Quantile bins of the spread (over spot × gene values).
    ax, save, dpi
        Axes to draw into; write the figure to this file.
    show
        Show the figure with ``plt.show()`` and return ``None`` (scanpy's convention). By
        default a figure this call made is shown; one drawn into a given ``ax`` is not.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` (not shown) instead.

    Returns
    -------
    ``None`` when the figure is shown (see ``show``); otherwise the
    :class:`matplotlib.figure.Figure`.
    """
    import matplotlib.pyplot as plt

    from ..tl._evaluate import _evaluated_genes, _matrix, _observed_from_record, _provenance

    std_key = _companion(adata, key, "std")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
        raise InputError(f"n_bins={n_bins!r} must be an integer of at least 2.")
    chosen = _evaluated_genes(adata, key, genes)
    columns = pd.Index(adata.var_names.astype(str)).get_indexer(chosen)
    rows = np.arange(adata.n_obs)
    if observed is None:
        function, entry = _provenance(adata, key)
        if entry is None:
            raise MissingKeyError(f"no predict record for {key!r}; pass observed='<layer>'.")
        truth = _observed_from_record(adata, function, entry, chosen, rows)
    else:
        truth = _matrix(adata, observed, rows, columns, what="observed")
    error = np.abs(_matrix(adata, key, rows, columns, what="predicted") - truth).ravel()
    spread = _matrix(adata, std_key, rows, columns, what="spread").ravel()
    ok = np.isfinite(error) & np.isfinite(spread)
    error, spread = error[ok], spread[ok]
    edges = np.unique(np.quantile(spread, np.linspace(0, 1, n_bins + 1)))
    which = np.clip(np.searchsorted(edges, spread, side="right") - 1, 0, len(edges) - 2)
    centre = np.array([spread[which == b].mean() for b in range(len(edges) - 1) if (which == b).any()])
    mae = np.array([error[which == b].mean() for b in range(len(edges) - 1) if (which == b).any()])
    own_figure = ax is None
    fig = ax.figure if ax is not None else plt.figure(figsize=(3.6, 3.4), layout="constrained")
    ax = ax if ax is not None else fig.add_subplot()
    ax.plot(centre, mae, marker="o")
    ax.set_xlabel(f"predicted spread ({std_key})")
    ax.set_ylabel("mean |error|")
    finish(fig, save, dpi)
    return show_or_return(fig, fig, show=show, return_fig=return_fig, own_figure=own_figure)
