"""Ridge with spatial context: a spot's features beside the mean features of its neighbour rings.

Expression varies smoothly across a section, and what a spot's own patch misses (a gland's
edge, the stroma around a tumour nest) often shows in the patches around it. Multi-scale
methods exploit that with wider fields of view; this baseline does it the cheapest honest way:
for ring ``k = 1 .. context_rings`` of the spot graph (spots exactly ``k`` hops away) it
averages their features and appends the averages to the spot's own, then fits the same
standardise → PCA → per-gene ridge as :class:`~sthisto.models.ridge.Ridge`. Only image features
enter; no expression of any neighbour is used, so predicting a new section needs its image
alone.

The graph links, within each section, spots closer than ``context_radius`` times the section's
median nearest-neighbour distance (in ``obsm['spatial']``): with the default 1.2 that is the
four grid neighbours of legacy ST and the six of a Visium hexagon, whatever the pixel size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from .._errors import InputError
from ._registry import register_method
from .ridge import Ridge

_CANDIDATES = 12
"""Nearest spots examined per spot before the radius cut (more than any grid's first ring)."""


def neighbour_graph(coords: np.ndarray, libraries: np.ndarray, *, radius: float) -> sp.csr_matrix:
    """Symmetric spot adjacency: pairs in one library closer than ``radius`` × its median nearest-neighbour distance.

    Parameters
    ----------
    coords
        ``(n_spots, 2)`` spot centres.
    libraries
        Section of each spot; no edge joins two sections.
    radius
        Multiple of the section's median nearest-neighbour distance.

    Returns
    -------
    Boolean CSR ``(n_spots, n_spots)`` without self-loops.
    """
    from ..pp._graph import knn_edge_index

    n = len(coords)
    rows, cols = [], []
    for library in np.unique(libraries):
        members = np.flatnonzero(libraries == library)
        if len(members) < 2:
            continue
        edges = knn_edge_index(coords[members], n_neighbors=min(_CANDIDATES, len(members) - 1))
        lengths = np.linalg.norm(coords[members][edges[0]] - coords[members][edges[1]], axis=1)
        nearest = np.full(len(members), np.inf)
        np.minimum.at(nearest, edges[1], lengths)
        scale = float(np.median(nearest[np.isfinite(nearest)]))
        keep = lengths <= radius * scale * (1 + 1e-9)
        rows.append(members[edges[1][keep]])
        cols.append(members[edges[0][keep]])
    if not rows:
        return sp.csr_matrix((n, n), dtype=bool)
    r, c = np.concatenate(rows), np.concatenate(cols)
    adjacency = sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(n, n))
    return ((adjacency + adjacency.T) > 0).tocsr()


def ring_features(features: np.ndarray, adjacency: sp.csr_matrix, *, rings: int) -> np.ndarray:
    """Features of each spot followed by the mean features of each of its ``rings`` hop-rings.

    A spot with nobody at hop ``k`` (an isolated spot, a section's edge at a large ring) takes
    its own features for that ring, so it looks like a spot in uniform tissue rather than
    like an impossible all-zero neighbourhood.
    """
    n = features.shape[0]
    visited = sp.identity(n, dtype=np.float64, format="csr")
    frontier = visited
    hop = adjacency.astype(np.float64)
    blocks = [features]
    for _ in range(int(rings)):
        reached = ((frontier @ hop) > 0).astype(np.float64)
        ring = ((reached - visited) > 0).astype(np.float64).tocsr()
        counts = np.asarray(ring.sum(axis=1)).ravel()
        means = np.asarray(ring @ features) / np.maximum(counts, 1)[:, None]
        empty = counts == 0
        means[empty] = features[empty]
        blocks.append(means.astype(features.dtype))
        visited = ((visited + ring) > 0).astype(np.float64)
        frontier = ring
    return np.concatenate(blocks, axis=1)


@register_method
class RidgeContext(Ridge):
    """Ridge on the spot's features plus the mean features of its neighbour rings (spatial context).

    The same estimator, features, folds and API as :class:`~sthisto.models.ridge.Ridge`; the
    design matrix is ``[own | mean of ring 1 | ... | mean of ring context_rings]`` (see the
    module notes). A stronger comparator than plain ridge wherever expression is spatially
    smooth.

    Parameters (``tl.train(..., **params)``)
    -----------------------------------------
    context_rings
        Hop-rings of the spot graph whose mean features are appended (default 1).
    context_radius
        Neighbours are spots closer than this multiple of the section's median
        nearest-neighbour distance (default 1.2: the immediate grid ring).
    graph_key
        Use the spot graph in ``adata.obsp[graph_key]`` (e.g. ``"spatial_connectivities"``
        from ``squidpy.gr.spatial_neighbors``; symmetrised, within sections) instead of the one
        ``context_radius`` builds; a section to predict needs the same key.
    n_components, alphas, cv, standardize, encoder, features_key, target, ...
        As for ``ridge``.
    """

    name = "ridge_context"
    aliases = ()
    variants = {"tiny": {"n_components": 8}}
    reference = "ridge baseline (HEST-1k protocol) with neighbour-ring mean features, after multi-scale methods"
    data_defaults = {**Ridge.data_defaults, "context_rings": 1, "context_radius": 1.2, "graph_key": None}

    @classmethod
    def configure(cls, adata, *, genes, train_index, params: Mapping[str, Any]):
        """Check the context settings before any work, then configure as ridge."""
        _, data, _ = cls.split_params(params)
        rings = data.get("context_rings", cls.data_defaults["context_rings"])
        radius = data.get("context_radius", cls.data_defaults["context_radius"])
        if isinstance(rings, bool) or int(rings) != rings or rings < 1:
            raise InputError(f"context_rings={rings!r} must be a positive integer (1 = the immediate neighbours).")
        if not (np.isfinite(radius) and radius >= 1):
            raise InputError(
                f"context_radius={radius!r} must be a number >= 1 (a multiple of the nearest-neighbour distance); "
                f"1.2 takes the immediate grid ring."
            )
        return super().configure(adata, genes=genes, train_index=train_index, params=params)

    @classmethod
    def feature_matrix(cls, adata, data: Mapping[str, Any], frames: Mapping | None = None) -> np.ndarray:
        """Own features followed by the mean features of each neighbour ring, for every spot."""
        from ..pp._patches import library_ids, spot_coordinates

        own = super().feature_matrix(adata, data, frames)
        libraries = np.asarray(library_ids(adata))
        if data.get("graph_key") is not None:
            from ..pp._user_graph import within_sections

            adjacency = within_sections(adata, data["graph_key"], libraries)
        else:
            adjacency = neighbour_graph(spot_coordinates(adata)[:, :2], libraries, radius=float(data["context_radius"]))
        return ring_features(own, adjacency, rings=int(data["context_rings"]))
