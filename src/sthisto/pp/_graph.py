"""Spot graphs: squidpy's per-library neighbourhood graph in AnnData, and the methods' kNN edge index."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._anndata import check_record_writable, check_writable, maybe_copy, record, write
from .._constants import Obs, Obsm
from .._errors import InputError, MissingKeyError
from .._logging import logger
from .._validate import checked_input

if TYPE_CHECKING:
    from anndata import AnnData
    from numpy.typing import ArrayLike

_FUNCTION = "spatial_graph"
_METHODS = ("knn", "grid", "radius")
_COORDINATES = ("array", "pixel")
_TEMPORARY_KEY = "sthisto_graph_coordinates"
_EXTRA_CANDIDATES = 8
"""Neighbours queried beyond k, so that ties at the k-th distance are usually all seen at once."""
_DISTANCE_RTOL = 1e-9
"""Relative slack on ``max_distance`` so that float rounding never drops an edge at the limit."""


def knn_edge_index(
    coords: ArrayLike,
    *,
    n_neighbors: int,
    max_distance: float | None = None,
    groups: ArrayLike | None = None,
) -> np.ndarray:
    """Directed k-nearest-neighbour graph without self-loops, as THItoGene and HGGEF build it.

    For each spot ``i`` and each of its ``n_neighbors`` nearest spots ``j`` (Euclidean), the
    graph has the edge ``j → i``. Ties at equal distance are broken by the smaller index, so the
    graph is deterministic. Spots sharing a position are neighbours (at distance 0) but a spot
    is never its own neighbour.

    Parameters
    ----------
    coords
        ``(n_spots, 2)`` coordinates; the methods use integer array coordinates
        ``(array_col, array_row)``.
    n_neighbors
        k. THItoGene uses 4, HGGEF 8 (pruned to ``max_distance=2``). A section with
        ``n_spots ≤ k`` links every spot to all the others.
    max_distance
        Drop edges longer than this (in the units of ``coords``); ``None`` keeps all.
    groups
        Optional per-spot labels (e.g. ``obs['library_id']``): the graph is built within each
        group and indices refer to the whole ``coords``; no edge joins two groups.

    Returns
    -------
    int64 array ``(2, n_edges)``: row 0 the source (neighbour ``j``), row 1 the target ``i``;
    edges sorted by target, then by distance and index of the neighbour.

    Examples
    --------
    >>> edge_index = knn_edge_index(adata.obs[["array_col", "array_row"]].to_numpy(), n_neighbors=4)
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 1:
        raise InputError(f"coords have shape {coords.shape}; expected (n_spots, n_dims), e.g. (n_spots, 2).")
    if not np.isfinite(coords).all():
        bad = int((~np.isfinite(coords)).any(axis=1).sum())
        raise InputError(f"coords hold NaN or infinite values for {bad} spots; drop or fix those spots first.")
    if isinstance(n_neighbors, bool) or int(n_neighbors) != n_neighbors or n_neighbors < 1:
        raise InputError(f"n_neighbors={n_neighbors!r} must be a positive integer.")
    if max_distance is not None and not (np.isfinite(max_distance) and max_distance >= 0):
        raise InputError(f"max_distance={max_distance!r} must be a non-negative number or None.")
    if groups is None:
        return _knn_one(coords, int(n_neighbors), max_distance)
    groups = np.asarray(groups)
    if groups.shape[0] != coords.shape[0]:
        raise InputError(f"groups has {groups.shape[0]} labels for {coords.shape[0]} spots.")
    parts = []
    for group in pd.unique(groups):
        rows = np.flatnonzero(groups == group)
        parts.append(rows[_knn_one(coords[rows], int(n_neighbors), max_distance)])
    return np.concatenate(parts, axis=1) if parts else np.zeros((2, 0), dtype=np.int64)


def _knn_one(coords: np.ndarray, n_neighbors: int, max_distance: float | None) -> np.ndarray:
    from scipy.spatial import cKDTree

    n = coords.shape[0]
    k = min(n_neighbors, n - 1)
    if k < n_neighbors and n > 0:
        logger.warning(
            "knn_edge_index: only %d spots, so each is linked to the %d others (n_neighbors=%d)", n, k, n_neighbors
        )
    if k < 1:
        return np.zeros((2, 0), dtype=np.int64)
    tree = cKDTree(coords)
    n_query = min(n, k + 1 + _EXTRA_CANDIDATES)
    _, candidates = tree.query(coords, k=n_query)
    candidates = candidates.reshape(n, n_query)
    neighbours, distances = _nearest_k(coords, np.arange(n), candidates, k)
    if n_query < n:
        # Ties at the k-th distance may reach past the queried candidates: gather every spot
        # within that distance and rank again.
        boundary = distances[:, -1] >= _last_distance(coords, candidates)
        for i in np.flatnonzero(boundary):
            within = np.asarray(tree.query_ball_point(coords[i], r=distances[i, -1] * (1 + _DISTANCE_RTOL) + 1e-12))
            neighbours[i], distances[i] = (a[0] for a in _nearest_k(coords, np.array([i]), within[None, :], k))
    targets = np.repeat(np.arange(n, dtype=np.int64), k)
    sources = neighbours.ravel().astype(np.int64)
    if max_distance is not None:
        keep = distances.ravel() <= max_distance * (1 + _DISTANCE_RTOL)
        sources, targets = sources[keep], targets[keep]
    return np.stack([sources, targets])


def _pair_distances(coords: np.ndarray, rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    # Computed here rather than taken from the tree so that equal geometric distances compare equal.
    return np.sqrt(((coords[candidates] - coords[rows][:, None, :]) ** 2).sum(axis=-1))


def _last_distance(coords: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    return _pair_distances(coords, np.arange(coords.shape[0]), candidates).max(axis=1)


def _nearest_k(coords: np.ndarray, rows: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    distances = _pair_distances(coords, rows, candidates)
    distances[candidates == rows[:, None]] = np.inf  # never one's own neighbour
    order = np.lexsort((candidates, distances), axis=-1)  # by distance, then by index
    return (
        np.take_along_axis(candidates, order, axis=-1)[:, :k],
        np.take_along_axis(distances, order, axis=-1)[:, :k],
    )


@checked_input
def spatial_graph(
    adata: AnnData,
    *,
    method: Literal["knn", "grid", "radius"] = "knn",
    coordinates: Literal["array", "pixel"] = "array",
    n_neighbors: int = 6,
    radius: float | None = None,
    max_distance: float | None = None,
    key_added: str = "spatial",
    copy: bool = False,
    overwrite: bool = False,
) -> AnnData | None:
    """Build each section's spot graph with squidpy, never linking spots of different sections.

    Wraps squidpy with ``library_key='library_id'``: its per-kind functions
    (``squidpy.gr.spatial_neighbors_knn`` / ``_grid`` / ``_radius``) where the installed
    squidpy has them (newer releases), else :func:`squidpy.gr.spatial_neighbors`. The object's
    own keys are left as they are apart from the outputs (squidpy runs on a temporary object
    holding the chosen coordinates).

    Parameters
    ----------
    adata
        AnnData with ``obs['library_id']`` (one section if absent) and the coordinates below.
    method
        ``"knn"``: each spot's ``n_neighbors`` nearest spots (squidpy ``coord_type="generic"``),
        optionally pruned to ``max_distance``. ``"grid"``: squidpy's grid graph
        (``coord_type="grid"``, ``n_neighbors`` 6 for hexagonal Visium, 4 for square legacy ST
        arrays). ``"radius"``: every spot within ``radius``.
    coordinates
        ``"array"``: integer grid coordinates ``obs[['array_col', 'array_row']]`` (the
        methods' choice; note that Visium's hexagonal array coordinates are not isotropic, so
        use ``"pixel"`` for a hexagonal ``"grid"`` graph). ``"pixel"``: ``obsm['spatial']``.
    n_neighbors
        Neighbours per spot for ``"knn"`` and ``"grid"``.
    radius
        Neighbourhood radius for ``"radius"``, in the coordinates' units.
    max_distance
        For ``"knn"``: drop edges longer than this.
    key_added
        Prefix of the outputs, as in squidpy.
    copy
        Return a modified copy instead of writing in place.
    overwrite
        Replace existing outputs of the same ``key_added``.

    Returns
    -------
    ``None``, or the modified copy if ``copy=True``. Writes, as squidpy does,

    - ``obsp[f"{key_added}_connectivities"]``: CSR, row ``i`` marks the neighbours of spot ``i``;
    - ``obsp[f"{key_added}_distances"]``: CSR distances of those pairs;
    - ``uns[f"{key_added}_neighbors"]``: squidpy's parameter record;

    and ``uns['sthisto']['spatial_graph'][key_added]`` with this call's parameters and the
    squidpy function used (``squidpy_function``).

    Examples
    --------
    >>> sthisto.pp.spatial_graph(adata, method="knn", n_neighbors=8, max_distance=2)
    """
    if method not in _METHODS:
        raise InputError(f"unknown method={method!r}; use one of {list(_METHODS)}.")
    if coordinates not in _COORDINATES:
        raise InputError(
            f"coordinates={coordinates!r}; use 'array' (obs array_col/array_row) or 'pixel' (obsm['spatial'])."
        )
    if isinstance(n_neighbors, bool) or int(n_neighbors) != n_neighbors or n_neighbors < 1:
        raise InputError(f"n_neighbors={n_neighbors!r} must be a positive integer.")
    if method == "radius":
        if radius is None or not (np.isfinite(radius) and radius > 0):
            raise InputError(f"method='radius' needs a positive radius=..., got {radius!r}.")
    elif radius is not None:
        raise InputError(f"radius={radius!r} is only used with method='radius'; for 'knn' use max_distance=.")
    if max_distance is not None:
        if method != "knn":
            raise InputError(f"max_distance is only used with method='knn' (got method={method!r}).")
        if not (np.isfinite(max_distance) and max_distance > 0):
            raise InputError(f"max_distance={max_distance!r} must be a positive number.")
    coords = _coordinates(adata, coordinates)
    libraries = _libraries(adata)
    if method in ("knn", "grid"):
        sizes = pd.Series(libraries).value_counts()
        small = sizes[sizes <= n_neighbors]
        if len(small):
            raise InputError(
                f"libraries {small.index.tolist()[:5]} have only {small.tolist()[:5]} spots, not more than "
                f"n_neighbors={n_neighbors}. Use a smaller n_neighbors or leave those libraries out."
            )
    conns_key, dists_key, neighbors_key = (
        f"{key_added}_connectivities",
        f"{key_added}_distances",
        f"{key_added}_neighbors",
    )
    check_writable(adata, "obsp", conns_key, overwrite=overwrite)
    check_writable(adata, "obsp", dists_key, overwrite=overwrite)
    check_writable(adata, "uns", neighbors_key, overwrite=overwrite)
    check_record_writable(adata, _FUNCTION, key_added, overwrite=overwrite)

    connectivities, distances, neighbors, squidpy_function = _squidpy_graph(
        coords, libraries, method, int(n_neighbors), radius, key_added
    )
    if max_distance is not None:
        connectivities, distances = _prune(coords, connectivities, distances, max_distance)

    adata = maybe_copy(adata, copy)
    write(adata, "obsp", conns_key, connectivities, overwrite=overwrite)
    write(adata, "obsp", dists_key, distances, overwrite=overwrite)
    write(adata, "uns", neighbors_key, neighbors, overwrite=overwrite)
    record(
        adata,
        _FUNCTION,
        key_added,
        {
            "method": method,
            "coordinates": coordinates,
            "n_neighbors": int(n_neighbors),
            "radius": radius,
            "max_distance": max_distance,
            "n_edges": int(connectivities.nnz),
            "squidpy_function": squidpy_function,
        },
        overwrite=overwrite,
    )
    return adata if copy else None


def _coordinates(adata, coordinates: str) -> np.ndarray:
    if coordinates == "array":
        absent = [c for c in (Obs.ARRAY_COL, Obs.ARRAY_ROW) if c not in adata.obs]
        if absent:
            raise MissingKeyError(
                f"adata.obs lacks {absent}: coordinates='array' uses the integer grid coordinates "
                f"obs['array_col'], obs['array_row']. Add them, or pass coordinates='pixel'."
            )
        coords = adata.obs[[Obs.ARRAY_COL, Obs.ARRAY_ROW]].to_numpy(dtype=np.float64)
        where = "obs[['array_col', 'array_row']]"
    else:
        if Obsm.SPATIAL not in adata.obsm:
            raise MissingKeyError("adata.obsm['spatial'] is missing; add spot centres or pass coordinates='array'.")
        coords = np.asarray(adata.obsm[Obsm.SPATIAL], dtype=np.float64)[:, :2]
        where = "obsm['spatial']"
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise InputError(
            f"{where} holds NaN or infinite values for {int(bad.sum())} spots (e.g. "
            f"{adata.obs_names[bad][:5].tolist()}); drop or fix those spots first."
        )
    return coords


def _libraries(adata) -> np.ndarray:
    if Obs.LIBRARY_ID not in adata.obs:
        logger.info("spatial_graph: obs['library_id'] is absent; all spots form one section")
        return np.full(adata.n_obs, "all", dtype=object)
    libraries = adata.obs[Obs.LIBRARY_ID]
    if libraries.isna().any():
        raise InputError(
            f"obs['library_id'] is missing for {int(libraries.isna().sum())} spots; every spot needs its section."
        )
    return libraries.astype(str).to_numpy()


def _squidpy_graph(coords, libraries, method, n_neighbors, radius, key_added):
    import warnings

    import anndata as ad

    with warnings.catch_warnings():
        # squidpy's import chain (spatialdata, xarray-schema, ome-zarr) warns about its own
        # dependencies' deprecations; nothing a sthisto user can act on.
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import squidpy
    obs = pd.DataFrame(
        {Obs.LIBRARY_ID: pd.Categorical(libraries, categories=pd.unique(libraries))},
        index=pd.RangeIndex(len(libraries)).astype(str),
    )
    temporary = ad.AnnData(obs=obs, obsm={_TEMPORARY_KEY: coords})
    name, options = _squidpy_call(squidpy.gr, method, n_neighbors, radius)
    getattr(squidpy.gr, name)(
        temporary, spatial_key=_TEMPORARY_KEY, library_key=Obs.LIBRARY_ID, key_added=key_added, **options
    )
    return (
        sp.csr_matrix(temporary.obsp[f"{key_added}_connectivities"]),
        sp.csr_matrix(temporary.obsp[f"{key_added}_distances"]),
        temporary.uns[f"{key_added}_neighbors"],
        f"squidpy.gr.{name}",
    )


# Newer squidpy builds each kind of graph with its own function and deprecates, then removes
# (1.9), the single gr.spatial_neighbors(coord_type=...) that 1.8 and earlier offer.
_SQUIDPY_PER_KIND = {
    "knn": "spatial_neighbors_knn",
    "grid": "spatial_neighbors_grid",
    "radius": "spatial_neighbors_radius",
}


def _squidpy_call(gr, method: str, n_neighbors: int, radius: float | None) -> tuple[str, dict]:
    """The squidpy function (name in ``squidpy.gr``) and its options for ``method``."""
    if hasattr(gr, _SQUIDPY_PER_KIND[method]):
        options = {"radius": float(radius)} if method == "radius" else {"n_neighs": n_neighbors}
        return _SQUIDPY_PER_KIND[method], options
    options = {
        "knn": {"coord_type": "generic", "n_neighs": n_neighbors},
        "grid": {"coord_type": "grid", "n_neighs": n_neighbors},
        "radius": {"coord_type": "generic", "radius": float(radius) if radius is not None else None},
    }[method]
    return "spatial_neighbors", options


def _prune(coords, connectivities, distances, max_distance):
    connectivities = connectivities.tocoo()
    length = np.sqrt(((coords[connectivities.row] - coords[connectivities.col]) ** 2).sum(axis=1))
    keep = length <= max_distance * (1 + _DISTANCE_RTOL)
    shape = connectivities.shape
    rows, cols = connectivities.row[keep], connectivities.col[keep]
    pruned_conn = sp.csr_matrix((connectivities.data[keep], (rows, cols)), shape=shape)
    kept = sp.csr_matrix((np.ones(keep.sum()), (rows, cols)), shape=shape)
    pruned_dist = sp.csr_matrix(distances.multiply(kept))
    pruned_dist.eliminate_zeros()
    return pruned_conn, pruned_dist
