"""Observed vs predicted (vs super-resolved) gene maps over the H&E."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._errors import InputError
from ..pp._patches import library_ids
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

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure


def _panels(adata, layers) -> list[tuple[object, str, str]]:
    """``(AnnData, layer, default title)`` per column."""
    if isinstance(layers, (str, tuple)):
        layers = [layers]
    panels = []
    for item in layers:
        if isinstance(item, str):
            panels.append((adata, item, item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str):
            panels.append((item[0], item[1], f"{item[1]} (other spots)"))
        else:
            raise InputError(
                f"layers entries must be a layer name of adata ('X' for X) or a pair (other AnnData, layer) such as "
                f"the super-resolved spots; got {item!r}."
            )
    if not panels:
        raise InputError("layers=[] is empty; pass e.g. layers=['observed', 'predicted'].")
    return panels


def gene_maps(
    adata: AnnData,
    genes: str | Sequence[str],
    *,
    layers: Sequence,
    library_id: str | None = None,
    img_key: str | None = "hires",
    titles: Sequence[str] | None = None,
    cmap: str = "viridis",
    spot_scale: float = 1.0,
    missing_color: str = "lightgrey",
    panel_size: float = 3.0,
    save: str | Path | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Gene maps over the H&E: one row per gene, one column per layer, one colour scale per gene.

    Parameters
    ----------
    adata
        AnnData with ``obsm['spatial']`` and ``uns['spatial'][library_id]`` (scanpy convention).
    genes
        Gene name or names (rows).
    layers
        Columns: layer names of ``adata`` (``"X"`` for ``X``), e.g. ``["observed",
        "predicted"]``, and/or pairs ``(other_adata, layer)`` for another set of spots of the
        same section, such as the AnnData returned by :func:`sthisto.tl.superresolve`.
    library_id
        Section to draw (required when ``adata`` holds several).
    img_key
        Background image in ``uns['spatial'][library_id]['images']`` (``"hires"``), placed with
        its ``tissue_<img_key>_scalef``; ``None`` draws spots only, in full-resolution pixels.
    titles
        Column titles (default: the layer names).
    cmap
        Colour map. Each gene's colour range spans its values over all columns (min to max),
        so observed and predicted maps of a gene are directly comparable.
    spot_scale
        Multiplier of the spot diameter (``scalefactors['spot_diameter_fullres']``, else 0.8 of
        the median nearest-neighbour distance).
    missing_color
        Colour of spots without a value (NaN, e.g. not in a test fold).
    panel_size
        Inches per panel.
    save
        Write the figure to this file (format from the extension).
    dpi
        Resolution when saving.
    show
        Show the figure with ``plt.show()`` and return ``None`` (scanpy's convention). By
        default ``True`` when this call made the figure and ``False`` when it drew into a given
        ``ax``. ``False`` returns the figure.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` (not shown) instead.

    Returns
    -------
    ``None`` when the figure is shown (see ``show``; ``return_fig=True`` gives the figure).
    Otherwise the :class:`matplotlib.figure.Figure`; its axes are ``fig.axes`` (row-major, then one
    colour bar per gene).

    Examples
    --------
    >>> sthisto.pl.gene_maps(adata, ["ERBB2", "GNAS"], layers=["sthisto_target", "thitogene"], library_id="B1")
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        raise InputError("genes=[] is empty; pass at least one gene name.")
    panels = _panels(adata, layers)
    if titles is not None and len(titles) != len(panels):
        raise InputError(f"titles has {len(titles)} entries for {len(panels)} columns.")
    library = choose_library(adata, library_id)
    image, scale, diameter = library_geometry(adata, library, img_key)

    # Gather values first: every error is raised before a figure exists.
    columns = []
    for other, layer, _ in panels:
        if other is not adata:
            other_libraries = library_ids(other)
            rows = np.flatnonzero(other_libraries == library)
            if len(rows) == 0:
                raise InputError(f"the other AnnData of column {layer!r} has no spots of library {library!r}.")
        else:
            rows = np.flatnonzero(library_ids(adata) == library)
        xy = spots_in_frame(other, rows, scale)
        _, _, own_diameter = library_geometry(other, library, None) if other is not adata else (None, None, diameter)
        values = {g: layer_values(other, layer, rows, g) for g in genes}
        columns.append((xy, own_diameter, values))
    base_xy = columns[0][0]
    fig, axes = plt.subplots(
        len(genes),
        len(panels),
        figsize=(panel_size * len(panels) + 0.6, panel_size * len(genes)),
        squeeze=False,
        layout="constrained",
    )
    for row, gene in enumerate(genes):
        stacked = np.concatenate([values[gene] for _, _, values in columns])
        finite = stacked[np.isfinite(stacked)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if high <= low:
            high = low + 1e-9
        norm = Normalize(vmin=low, vmax=high)
        collection = None
        for column, ((xy, own_diameter, values), (_, _, title)) in enumerate(zip(columns, panels)):
            ax = axes[row, column]
            spot = own_diameter * scale if own_diameter is not None else default_diameter(xy)
            collection = draw_spots(
                ax,
                xy,
                diameter=spot * spot_scale,
                values=values[gene],
                cmap=cmap,
                norm=norm,
                missing_color=missing_color,
            )
            frame_axes(ax, image, base_xy, margin=spot)
            if row == 0:
                ax.set_title(titles[column] if titles is not None else title)
            if column == 0:
                ax.set_ylabel(gene)
        fig.colorbar(collection, ax=list(axes[row]), shrink=0.8, pad=0.01)
    finish(fig, save, dpi)
    return show_or_return(fig, fig, show=show, return_fig=return_fig, own_figure=True)
