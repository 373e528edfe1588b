"""Domain maps: clusters of predicted expression next to the annotations."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Var
from .._errors import InputError, MissingKeyError
from ..pp._patches import library_ids
from ._utils import (
    category_colors,
    choose_library,
    default_diameter,
    draw_spots,
    finish,
    frame_axes,
    library_geometry,
    show_or_return,
    spots_in_frame,
)

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from anndata import AnnData
    from matplotlib.figure import Figure


def _match_clusters(labels: np.ndarray, clusters: np.ndarray) -> dict:
    """Name each cluster after the label it overlaps most (Hungarian matching; extra clusters keep numbers)."""
    from scipy.optimize import linear_sum_assignment

    label_names = list(pd.unique(labels))
    cluster_ids = list(pd.unique(clusters))
    overlap = np.array([[np.sum((labels == lab) & (clusters == c)) for lab in label_names] for c in cluster_ids])
    rows, cols = linear_sum_assignment(-overlap)
    names = {cluster_ids[r]: str(label_names[c]) for r, c in zip(rows, cols)}
    for c in cluster_ids:
        names.setdefault(c, f"cluster {c}")
    return names


def domain_maps(
    adata: AnnData,
    *,
    predicted: str,
    labels_key: str,
    library_id: str | None = None,
    method: str = "kmeans",
    genes: Sequence[str] | None = None,
    img_key: str | None = "hires",
    n_pcs: int = 50,
    kmeans_n_init: int = 20,
    n_neighbors: int = 15,
    leiden_resolution: float = 1.0,
    leiden_connectivities: str = "umap",
    seed: int = 0,
    palette: Sequence[Any] | Mapping[str, Any] | None = None,
    spot_scale: float = 1.0,
    panel_size: float = 4.0,
    save: str | Path | None = None,
    dpi: float | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Annotations beside clusters of the predicted expression, with their ARI.

    The clusters are computed exactly as :func:`sthisto.tl.evaluate` computes them for its
    ARI (same preprocessing, seed and parameters), so the title's ARI equals the table's.
    Clusters are coloured like the annotation they overlap most (Hungarian matching).

    Parameters
    ----------
    adata
        AnnData with predictions in ``layers[predicted]`` and annotations in ``obs[labels_key]``.
    predicted
        Layer of predictions.
    labels_key
        ``obs`` column of annotations; ``'undetermined'`` (any case) and missing labels are
        excluded from clustering and drawn grey.
    library_id
        Section to draw (required when ``adata`` holds several).
    method
        ``"kmeans"`` (k = number of labels) or ``"leiden"``.
    genes
        Genes to cluster on (default: those marked in ``var[f"{predicted}_predicted"]``).
    img_key
        Background image (``None``: spots only).
    n_pcs, kmeans_n_init, n_neighbors, leiden_resolution, leiden_connectivities, seed
        As in :func:`sthisto.tl.evaluate`.
    palette
        Label colours (list or ``{label: colour}``); default ``uns[f"{labels_key}_colors"]``
        when present, else tab10/tab20.
    spot_scale, panel_size
        Spot diameter multiplier; inches per panel.
    save, dpi
        Save the figure to this file.
    show
        Show the figure with ``plt.show()`` and return ``None`` (scanpy's convention). By
        default ``True`` when this call made the figure and ``False`` when it drew into a given
        ``ax``. ``False`` returns the figure.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` (not shown) instead.

    Returns
    -------
    ``None`` when the figure is shown (see ``show``; ``return_fig=True`` gives the figure).
    Otherwise the :class:`matplotlib.figure.Figure` (two axes: annotations, clusters).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from sklearn.metrics import adjusted_rand_score

    from ..tl._evaluate import ari_embedding, kmeans_clusters, labelled_spots, leiden_clusters

    if method not in ("kmeans", "leiden"):
        raise InputError(f"method={method!r}; use 'kmeans' or 'leiden'.")
    if predicted not in adata.layers:
        raise MissingKeyError(f"layers[{predicted!r}] is missing (layers: {sorted(adata.layers)}).")
    if labels_key not in adata.obs:
        raise MissingKeyError(f"labels_key={labels_key!r} is not an obs column.")
    library = choose_library(adata, library_id)
    image, scale, diameter = library_geometry(adata, library, img_key)
    rows = np.flatnonzero(library_ids(adata) == library)
    names = pd.Index(adata.var_names.astype(str))
    flag = Var.predicted(predicted)
    if genes is None:
        chosen = names[adata.var[flag].to_numpy(dtype=bool)] if flag in adata.var else names
    else:
        chosen = pd.Index([str(g) for g in genes])
        missing = chosen.difference(names)
        if len(missing):
            raise MissingKeyError(f"genes not in var_names: {list(missing[:5])}.")
    block = adata.layers[predicted][rows][:, names.get_indexer(chosen)]
    block = np.asarray(block.toarray() if hasattr(block, "toarray") else block, dtype=np.float64)
    has_prediction = ~np.isnan(block).all(axis=1)
    # As in evaluate: genes without a prediction in this section (per-fold gene sets) are left out.
    block = block[:, ~np.isnan(block[has_prediction]).all(axis=0)] if has_prediction.any() else block
    labels = adata.obs[labels_key].astype(object).to_numpy()[rows]
    keep = labelled_spots(labels) & has_prediction
    kept_labels = labels[keep].astype(str)
    n_labels = len(set(kept_labels))
    if n_labels < 2 or keep.sum() <= n_labels:
        raise InputError(
            f"library {library!r} has {int(keep.sum())} predicted spots with {n_labels} distinct labels; clustering "
            f"against annotations needs at least two labels and more spots than labels."
        )
    if np.isnan(block[keep]).any():
        raise InputError(f"layers[{predicted!r}] has NaN among predicted genes of labelled spots; cannot cluster.")
    embedding = ari_embedding(block[keep], n_pcs=n_pcs, seed=seed)
    if method == "kmeans":
        clusters = kmeans_clusters(embedding, n_labels, n_init=kmeans_n_init, seed=seed)
    else:
        clusters = leiden_clusters(
            embedding, n_neighbors=n_neighbors, resolution=leiden_resolution, connectivities=leiden_connectivities,
            seed=seed,
        )  # fmt: skip
    ari = adjusted_rand_score(kept_labels, clusters)
    cluster_names = _match_clusters(kept_labels, clusters)

    categories = (
        [str(c) for c in adata.obs[labels_key].cat.categories if str(c) in set(kept_labels)]
        if isinstance(adata.obs[labels_key].dtype, pd.CategoricalDtype)
        else sorted(set(kept_labels))
    )
    stored = adata.uns.get(f"{labels_key}_colors")
    if palette is None and stored is not None and isinstance(adata.obs[labels_key].dtype, pd.CategoricalDtype):
        all_categories = [str(c) for c in adata.obs[labels_key].cat.categories]
        palette = {c: stored[i] for i, c in enumerate(all_categories) if i < len(stored)}
    extra = sorted({n for n in cluster_names.values() if n not in categories})
    colors = category_colors(categories + extra, palette)

    xy = spots_in_frame(adata, rows, scale)
    spot = (diameter * scale if diameter is not None else default_diameter(xy)) * spot_scale
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel_size, panel_size + 0.6), layout="constrained")
    label_colors = [colors[str(lab)] if k else "lightgrey" for lab, k in zip(labels, keep)]
    cluster_of = np.full(len(rows), None, dtype=object)
    cluster_of[keep] = [cluster_names[c] for c in clusters]
    cluster_colors = [colors[c] if c is not None else "lightgrey" for c in cluster_of]
    for ax, face, title in (
        (axes[0], label_colors, f"annotation ({labels_key})"),
        (axes[1], cluster_colors, f"{method} of {predicted}\nARI = {ari:.3f}"),
    ):
        draw_spots(ax, xy, diameter=spot, colors=face)
        frame_axes(ax, image, xy, margin=spot)
        ax.set_title(title)
    handles = [Patch(facecolor=colors[c], label=c) for c in categories + extra]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), frameon=False, fontsize="small")
    finish(fig, save, dpi)
    return show_or_return(fig, fig, show=show, return_fig=return_fig, own_figure=True)
