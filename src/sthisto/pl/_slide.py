"""``pl.slide_map``: predicted gene maps over a whole slide, at a chosen resolution level."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._constants import Images, Metadata, ScaleFactors, Uns
from .._errors import InputError, MissingKeyError
from ..pp._patches import library_ids
from ._utils import (
    choose_library,
    default_diameter,
    draw_spots,
    finish,
    frame_axes,
    layer_values,
    show_or_return,
    spots_in_frame,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def slide_map(
    adata: AnnData,
    genes: str | Sequence[str],
    *,
    library_id: str | None = None,
    layer: str = "X",
    level: str | int | None = Images.HIRES,
    cmap: str = "magma",
    vmin: float | None = None,
    vmax: float | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
    alpha: float = 0.85,
    spot_scale: float = 1.0,
    ncols: int = 3,
    panel_size: float = 4.0,
    ax: Axes | Sequence[Axes] | None = None,
    save: str | Path | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> tuple[Figure, list[Axes]] | Figure | None:
    """Maps of predicted genes over a whole slide, drawn on one level of its image.

    Parameters
    ----------
    adata
        Predictions with spot positions: the AnnData returned by :func:`sthisto.tl.predict`
        on pseudo-spots (:func:`sthisto.pp.tile`), by :func:`sthisto.tl.superresolve`, or any
        AnnData with ``obsm['spatial']`` and ``uns['spatial']``.
    genes
        One gene or a list (one panel each).
    library_id
        Slide to draw (required when ``adata`` holds several).
    layer
        Values to draw: ``"X"`` (default) or a layer name.
    level
        Background and frame: an image key (``"hires"``, ``"lowres"``, ...) of
        ``uns['spatial'][library_id]['images']``, an integer pyramid level of the slide's TIFF
        (read block-averaged to at most 2000 px, never whole at full resolution), or ``None``
        (spots only, in full-resolution pixels).
    cmap
        Colour map.
    vmin, vmax
        Colour range; default per gene: the ``percentiles`` of its values.
    percentiles
        Lower and upper percentiles of the default colour range (robust to outlying spots).
    alpha
        Opacity of the spots over the image.
    spot_scale
        Multiplier of the spot diameter (``spot_diameter_fullres``, else 0.8 × the spacing).
    ncols
        Panels per row.
    panel_size
        Inches per panel.
    ax
        Axes to draw on: one per gene (a single axes for one gene); the figure is then theirs.
    save
        Write the figure to this file (format from the extension).
    dpi
        Resolution when saving.
    show
        Show the figure with ``plt.show()`` and return ``None`` (scanpy's convention). By
        default ``True`` when this call made the figure and ``False`` when it drew into a given
        ``ax``. ``False`` returns ``(fig, axes)``.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` (not shown) instead.

    Returns
    -------
    ``None`` when the figure is shown (see ``show``; ``return_fig=True`` gives the figure).
    Otherwise ``(fig, axes)``: the figure and the list of panel axes (one per gene).

    Examples
    --------
    >>> predicted = sthisto.tl.predict(sthisto.pp.tile(slide), "model_dir", copy=True)
    >>> fig, axes = sthisto.pl.slide_map(predicted, ["ERBB2", "CD74"], level="hires", show=False)
    """
    own_figure = ax is None
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        raise InputError("genes=[] is empty; pass at least one gene name.")
    if len(percentiles) != 2 or not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise InputError(f"percentiles={percentiles!r} must be (low, high) with 0 <= low < high <= 100.")
    if isinstance(ncols, bool) or not isinstance(ncols, (int, np.integer)) or ncols < 1:
        raise InputError(f"ncols={ncols!r} must be a positive integer.")
    library = choose_library(adata, library_id)
    image, scale = _background(adata, library, level)
    rows = np.flatnonzero(library_ids(adata) == library)
    xy = spots_in_frame(adata, rows, scale)
    values = {
        gene: layer_values(adata, layer, rows, gene, what="layer" if layer != "X" else "AnnData") for gene in genes
    }
    diameter = adata.uns.get(Uns.SPATIAL, {}).get(library, {}).get(Uns.SCALEFACTORS, {}).get(ScaleFactors.SPOT_DIAMETER)
    diameter = float(diameter) * scale if diameter else default_diameter(xy)
    diameter *= float(spot_scale)

    if ax is None:
        n_cols = min(int(ncols), len(genes))
        n_rows = math.ceil(len(genes) / n_cols)
        fig, grid = plt.subplots(n_rows, n_cols, figsize=(panel_size * n_cols, panel_size * n_rows), squeeze=False)
        axes = list(grid.ravel())
        for extra in axes[len(genes) :]:
            extra.set_visible(False)
        axes = axes[: len(genes)]
    else:
        axes = [ax] if not isinstance(ax, (list, tuple, np.ndarray)) else list(np.ravel(ax))
        if len(axes) != len(genes):
            raise InputError(f"ax has {len(axes)} axes for {len(genes)} genes; pass one axes per gene.")
        fig = axes[0].figure
    margin = diameter
    for panel, gene in zip(axes, genes, strict=True):
        gene_values = values[gene]
        finite = gene_values[np.isfinite(gene_values)]
        low = vmin if vmin is not None else (float(np.percentile(finite, percentiles[0])) if finite.size else 0.0)
        high = vmax if vmax is not None else (float(np.percentile(finite, percentiles[1])) if finite.size else 1.0)
        norm = Normalize(vmin=low, vmax=high if high > low else low + 1e-9)
        frame_axes(panel, image, xy, margin=margin)
        collection = draw_spots(panel, xy, diameter=diameter, values=gene_values, cmap=cmap, norm=norm)
        collection.set_alpha(alpha)
        panel.set_title(gene)
        fig.colorbar(collection, ax=panel, fraction=0.046, pad=0.02)
    finish(fig, save, dpi)
    return show_or_return(fig, (fig, axes), show=show, return_fig=return_fig, own_figure=own_figure)


def _background(adata, library: str, level) -> tuple[np.ndarray | None, float]:
    """Image to draw and its pixels per full-resolution pixel."""
    entry = adata.uns.get(Uns.SPATIAL, {}).get(library, {})
    if level is None:
        return None, 1.0
    if isinstance(level, (int, np.integer)) and not isinstance(level, bool):
        from ..pp._tissue import _pyramid_level

        image, scale, _ = _pyramid_level(entry.get(Uns.METADATA, {}), int(level), library)
        return image, scale
    if not isinstance(level, str):
        raise InputError(f"level={level!r} must be an image key, a pyramid level number, or None.")
    images = entry.get(Uns.IMAGES, {})
    if level not in images:
        hint = " or a pyramid level number" if Metadata.PYRAMID_LEVELS in entry.get(Uns.METADATA, {}) else ""
        raise MissingKeyError(
            f"library {library!r} has no image {level!r} (it has {sorted(images)}); pass level= one of those{hint}, "
            f"or None to draw spots only."
        )
    if level == Images.FULLRES:
        raise InputError(
            "level='fullres' would draw the whole slide at full resolution; use 'hires' or a pyramid level."
        )
    scale = entry.get(Uns.SCALEFACTORS, {}).get(ScaleFactors.for_image(level))
    if scale is None:
        raise MissingKeyError(
            f"image {level!r} of library {library!r} has no scale factor {ScaleFactors.for_image(level)!r}."
        )
    image = np.asarray(images[level])
    if image.ndim == 2:  # a mask: draw it in grey
        image = np.where(image, 0.8, 1.0)[..., None].repeat(3, axis=-1)
    return image, float(scale)
