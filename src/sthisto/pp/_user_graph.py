"""A spot graph the user built (``graph_key=``), read from ``adata.obsp`` for the graph methods.

THItoGene and HGGEF build the papers' k-nearest-neighbour graph on the grid coordinates, and
``ridge_context`` its neighbour rings, unless ``graph_key`` names an ``obsp`` matrix, such as
the ``"spatial_connectivities"`` that ``squidpy.gr.spatial_neighbors`` or
:func:`sthisto.pp.spatial_graph` write. Only the matrix's pattern is used (which spots are
linked), not its weights: the papers' graph attention and neighbour means weigh neighbours by
themselves. Row ``i`` of the matrix lists the neighbours of spot ``i`` (squidpy's convention);
each non-zero ``[i, j]`` becomes the message edge ``j → i``. Self-loops are dropped, as in the
papers' graphs, and so are edges between sections, since each section is its own batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from .._errors import InputError, MissingKeyError

if TYPE_CHECKING:
    from anndata import AnnData


def graph_matrix(adata: AnnData, graph_key: str) -> sp.csr_matrix:
    """``adata.obsp[graph_key]`` as a boolean CSR pattern without self-loops, checked."""
    if not isinstance(graph_key, str) or not graph_key:
        raise InputError(f"graph_key={graph_key!r} must name a matrix in adata.obsp, e.g. 'spatial_connectivities'.")
    if graph_key not in adata.obsp:
        available = sorted(adata.obsp.keys())
        raise MissingKeyError(
            f"graph_key={graph_key!r} is not in adata.obsp (it holds {available or 'nothing'}). Build the graph "
            f"first, e.g. squidpy.gr.spatial_neighbors(adata) or sthisto.pp.spatial_graph(adata) (both write "
            f"'spatial_connectivities'), or pass graph_key=None to let the method build the paper's graph."
        )
    matrix = adata.obsp[graph_key]
    shape = getattr(matrix, "shape", None)
    if shape is None or len(shape) != 2 or shape != (adata.n_obs, adata.n_obs):
        raise InputError(
            f"adata.obsp[{graph_key!r}] has shape {shape}; a spot graph must be (n_obs, n_obs) = "
            f"({adata.n_obs}, {adata.n_obs}). Rebuild it on these spots (squidpy.gr.spatial_neighbors)."
        )
    entries = sp.coo_matrix(matrix)
    keep = (entries.row != entries.col) & (np.asarray(entries.data) != 0)
    rows, cols = entries.row[keep], entries.col[keep]
    return sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=shape)


def section_edge_index(adata: AnnData, graph_key: str, obs_index: np.ndarray) -> np.ndarray:
    """Edges ``(2, n_edges)`` among the spots ``obs_index`` (local indices), sorted by target then source.

    Row 0 is the source (the neighbour ``j``), row 1 the target ``i``: the layout of
    :func:`sthisto.pp.knn_edge_index`.
    """
    block = graph_matrix(adata, graph_key)[np.asarray(obs_index)][:, np.asarray(obs_index)].tocoo()
    order = np.lexsort((block.col, block.row))
    return np.stack([block.col[order], block.row[order]]).astype(np.int64)


def within_sections(adata: AnnData, graph_key: str, libraries: np.ndarray) -> sp.csr_matrix:
    """Symmetric adjacency of ``obsp[graph_key]`` with the edges between sections removed."""
    pattern = graph_matrix(adata, graph_key).tocoo()
    libraries = np.asarray(libraries)
    keep = libraries[pattern.row] == libraries[pattern.col]
    n = adata.n_obs
    adjacency = sp.csr_matrix((np.ones(int(keep.sum())), (pattern.row[keep], pattern.col[keep])), shape=(n, n))
    return ((adjacency + adjacency.T) > 0).tocsr()
