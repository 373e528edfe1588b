"""Helpers shared by the plots: spots over the H&E, colour scales, saving."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._constants import Images, Obsm, ScaleFactors, Uns
from .._errors import InputError, MissingKeyError
from ..pp._patches import library_ids, spot_coordinates


def choose_library(adata, library_id: str | None) -> str:
    """The library to draw: the one given, or the only one present."""
    libraries = pd.unique(library_ids(adata))
    if library_id is None:
        if len(libraries) != 1:
            raise InputError(
                f"adata holds {len(libraries)} sections ({sorted(map(str, libraries))[:10]}); pass library_id=... to "
                f"choose the one to draw."
            )
        return str(libraries[0])
    if str(library_id) not in set(map(str, libraries)):
        raise MissingKeyError(f"library_id={library_id!r} is not in obs['library_id'] ({sorted(map(str, libraries))}).")
    return str(library_id)


def library_geometry(adata, library_id: str, img_key: str | None) -> tuple[np.ndarray | None, float, float | None]:
    """``(image or None, scale from full-resolution pixels to the drawn frame, spot diameter in full-res px)``."""
    entry = adata.uns.get(Uns.SPATIAL, {}).get(library_id, {})
    scalefactors = entry.get(Uns.SCALEFACTORS, {})
    diameter = scalefactors.get(ScaleFactors.SPOT_DIAMETER)
    diameter = float(diameter) if diameter is not None and np.isfinite(diameter) and diameter > 0 else None
    if img_key is None:
        return None, 1.0, diameter
    images = entry.get(Uns.IMAGES, {})
    if img_key not in images:
        raise MissingKeyError(
            f"library {library_id!r} has no image {img_key!r} in uns['spatial'][{library_id!r}]['images'] "
            f"(it has {sorted(images)}); pass img_key=None to draw the spots without the H&E."
        )
    scale = 1.0 if img_key == Images.FULLRES else scalefactors.get(ScaleFactors.for_image(img_key))
    if scale is None:
        raise MissingKeyError(
            f"uns['spatial'][{library_id!r}]['scalefactors'] lacks {ScaleFactors.for_image(img_key)!r}, needed "
            f"to place spots on the {img_key!r} image."
        )
    return np.asarray(images[img_key]), float(scale), diameter


def layer_values(adata, layer: str, rows: np.ndarray, gene: str, *, what: str = "layer") -> np.ndarray:
    """Values of ``gene`` in ``layer`` (``"X"`` for ``X``) at ``rows`` as float64."""
    names = pd.Index(adata.var_names.astype(str))
    if gene not in names:
        raise MissingKeyError(f"gene {gene!r} is not in var_names of the {what} object.")
    if layer == "X":
        source = adata.X
    elif layer in adata.layers:
        source = adata.layers[layer]
    else:
        raise MissingKeyError(f"{what} {layer!r} is not in adata.layers ({sorted(adata.layers)}).")
    column = source[rows][:, names.get_loc(gene)]
    column = column.toarray() if sp.issparse(column) else np.asarray(column)
    return np.asarray(column, dtype=np.float64).ravel()


def draw_spots(
    ax,
    xy: np.ndarray,
    *,
    diameter: float,
    colors=None,
    values: np.ndarray | None = None,
    cmap=None,
    norm=None,
    missing_color: str = "lightgrey",
    edgecolor: str = "none",
    zorder: float = 2,
):
    """Circles of ``diameter`` data units at ``xy``, coloured by ``values`` (or ``colors``)."""
    from matplotlib.collections import EllipseCollection

    n = len(xy)
    sizes = np.full(n, float(diameter))
    collection = EllipseCollection(
        sizes, sizes, np.zeros(n), units="xy", offsets=xy, offset_transform=ax.transData, edgecolors=edgecolor,
        zorder=zorder,
    )  # fmt: skip
    if values is not None:
        import matplotlib as mpl

        colormap = mpl.colormaps[cmap] if isinstance(cmap, str) or cmap is None else cmap
        finite = np.isfinite(values)
        collection.set_array(np.ma.masked_invalid(np.where(finite, values, np.nan)))
        collection.set_cmap(colormap.with_extremes(bad=missing_color))
        collection.set_norm(norm)
    elif colors is not None:
        collection.set_facecolor(colors)
    ax.add_collection(collection)
    return collection


def frame_axes(ax, image: np.ndarray | None, xy: np.ndarray, *, margin: float) -> None:
    """Show the image and crop the view to the spots with a margin; no ticks."""
    if image is not None:
        ax.imshow(image, origin="upper", interpolation="nearest")
    if len(xy):
        low = xy.min(axis=0) - margin
        high = xy.max(axis=0) + margin
        ax.set_xlim(low[0], high[0])
        ax.set_ylim(high[1], low[1])  # image convention: y grows downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def spots_in_frame(adata, rows: np.ndarray, scale: float) -> np.ndarray:
    """Spot centres of ``rows`` in the drawn image's pixels."""
    if Obsm.SPATIAL not in adata.obsm:
        raise MissingKeyError("adata.obsm['spatial'] is missing; spot positions are needed to draw maps.")
    return spot_coordinates(adata)[rows] * scale


def default_diameter(xy: np.ndarray) -> float:
    """A spot diameter from the data: 0.8 of the median nearest-neighbour distance."""
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return 1.0
    distances, _ = cKDTree(xy).query(xy, k=2)
    return float(0.8 * np.median(distances[:, 1]))


def category_colors(categories, palette=None) -> dict:
    """A colour per category, from ``palette`` (list or dict) or matplotlib's tab10/tab20."""
    import matplotlib as mpl

    categories = list(categories)
    if isinstance(palette, dict):
        return {c: palette.get(c, "lightgrey") for c in categories}
    if palette is None:
        cmap = mpl.colormaps["tab10" if len(categories) <= 10 else "tab20"]
        palette = [cmap(i % cmap.N) for i in range(len(categories))]
    return {c: palette[i % len(palette)] for i, c in enumerate(categories)}


def finish(fig, save: str | Path | None, dpi: float | None) -> None:
    """Save the figure if asked."""
    if save is not None:
        path = Path(save)
        if path.suffix == "":
            raise InputError(f"save={str(save)!r} has no file extension; use e.g. 'maps.png' or 'maps.pdf'.")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")


def show_or_return(fig, drawn, *, show: bool | None, return_fig: bool, own_figure: bool):
    """End a plot the scanpy way: show it and return ``None``, or return what was drawn.

    ``show=None`` shows a figure the call made itself, not one drawn into the caller's ``ax``
    (the caller may still be filling it). Returning ``None`` after showing is what makes a
    notebook cell ending in a ``pl`` call display the figure once: the inline backend shows
    and closes it, and there is no returned Figure for IPython to display again.
    """
    if return_fig:
        return fig
    if show is None:
        show = own_figure
    if not show:
        return drawn
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        # Agg and other file backends have nothing to show; the figure stays open for plt.savefig.
        warnings.filterwarnings("ignore", message=".*non-interactive.*", category=UserWarning)
        plt.show()
    return None
