"""Spot graphs: sthisto.pp.spatial_graph (squidpy, per library) and knn_edge_index (the methods')."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sthisto
from sthisto._errors import InputError, KeyExistsError, MissingKeyError
from sthisto.pp import knn_edge_index


def make_sections(shapes=((6, 5), (4, 7)), seed=0, jitter=0.0):
    """Sections on square ST-like grids (same array coordinates in every section), with pixels."""
    rng = np.random.default_rng(seed)
    obs, coords, spatial = [], [], {}
    for s, (n_rows, n_cols) in enumerate(shapes):
        row, col = np.divmod(np.arange(n_rows * n_cols), n_cols)
        name = f"S{s}"
        obs.append(
            pd.DataFrame(
                {"library_id": name, "array_row": row, "array_col": col},
                index=[f"{name}_{c}x{r}" for c, r in zip(col, row)],
            )
        )
        pixels = np.stack([col * 290.0 + 400, row * 290.0 + 300], axis=1) + rng.normal(0, jitter, (len(row), 2))
        coords.append(pixels)
        spatial[name] = {
            "images": {"hires": rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)},
            "scalefactors": {"tissue_hires_scalef": 0.01, "microns_per_pixel": 0.69},
        }
    obs = pd.concat(obs)
    obs["library_id"] = pd.Categorical(obs["library_id"])
    adata = ad.AnnData(np.ones((len(obs), 3), dtype=np.float32), obs=obs)
    adata.obsm["spatial"] = np.concatenate(coords)
    adata.uns["spatial"] = spatial
    return adata


def _neighbours(edge_index, target):
    return edge_index[0, edge_index[1] == target].tolist()


def _adjacency(edge_index, n):
    """Row = target, column = source: squidpy's orientation (row i lists i's neighbours)."""
    return sp.csr_matrix((np.ones(edge_index.shape[1]), (edge_index[1], edge_index[0])), shape=(n, n))


# --------------------------------------------------------------------------- knn_edge_index


def test_knn_on_a_3x3_grid_by_hand():
    grid = np.array([(x, y) for y in range(3) for x in range(3)])  # index = 3 * y + x
    edges = knn_edge_index(grid, n_neighbors=4)
    assert edges.dtype == np.int64 and edges.shape == (2, 36)
    assert not (edges[0] == edges[1]).any()
    assert np.bincount(edges[1], minlength=9).tolist() == [4] * 9
    # Corner (0,0): two at distance 1, one at √2, then (2,0) and (0,2) tie at 2 → lower index 2.
    assert _neighbours(edges, 0) == [1, 3, 4, 2]
    assert _neighbours(edges, 4) == [1, 3, 5, 7]  # centre: the four at distance 1
    assert _neighbours(edges, 1) == [0, 2, 4, 3]  # edge: 0, 2, 4 at 1; 3 and 5 tie at √2 → 3


def test_knn_pruned_like_hggef():
    grid = np.array([(x, y) for y in range(5) for x in range(5)])
    edges = knn_edge_index(grid, n_neighbors=8, max_distance=2)
    # Centre (2,2) keeps its 8 nearest (distances 1 and √2); corner (0,0) keeps (1,0), (0,1),
    # (1,1), (2,0), (0,2) and loses (2,1), (1,2) at √5.
    assert sorted(_neighbours(edges, 12)) == [6, 7, 8, 11, 13, 16, 17, 18]
    assert sorted(_neighbours(edges, 0)) == [1, 2, 5, 6, 10]
    lengths = np.linalg.norm(grid[edges[0]] - grid[edges[1]], axis=1)
    assert lengths.max() <= 2


def test_knn_ties_beyond_the_first_candidates_are_broken_by_index():
    # 12 points at distance exactly 5 from the origin, in scrambled order: more tied
    # candidates than the first tree query returns, so the exhaustive tie path runs.
    ring = [(3, 4), (-5, 0), (4, -3), (0, 5), (-3, -4), (5, 0), (-4, 3), (3, -4), (0, -5), (-3, 4), (4, 3), (-4, -3)]
    coords = np.array([(0, 0), *ring], dtype=float)
    edges = knn_edge_index(coords, n_neighbors=3)
    assert _neighbours(edges, 0) == [1, 2, 3]
    again = knn_edge_index(coords[::-1].copy(), n_neighbors=3)  # reversed order
    assert _neighbours(again, 12) == [0, 1, 2]  # still the lowest indices of the new order
    np.testing.assert_array_equal(edges, knn_edge_index(coords, n_neighbors=3))


def test_knn_equals_squidpy_without_ties_and_groups_never_join():
    adata = make_sections(jitter=9.0)  # jittered pixels: no ties
    coords = adata.obsm["spatial"]
    libraries = adata.obs["library_id"].to_numpy()
    edges = knn_edge_index(coords, n_neighbors=6, groups=libraries)
    assert (libraries[edges[0]] == libraries[edges[1]]).all()
    sthisto.pp.spatial_graph(adata, method="knn", coordinates="pixel", n_neighbors=6)
    squidpy_adjacency = adata.obsp["spatial_connectivities"]
    assert (_adjacency(edges, adata.n_obs) != squidpy_adjacency).nnz == 0
    # The same graph, section by section, with local indices.
    first = (libraries == "S0").nonzero()[0]
    local = knn_edge_index(coords[first], n_neighbors=6)
    np.testing.assert_array_equal(first[local], edges[:, np.isin(edges[1], first)])


def test_knn_small_sections_and_bad_input():
    assert knn_edge_index(np.zeros((1, 2)), n_neighbors=4).shape == (2, 0)
    edges = knn_edge_index(np.array([[0, 0], [1, 0], [5, 0]]), n_neighbors=4)
    assert sorted(map(tuple, edges.T.tolist())) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    with pytest.raises(InputError, match="n_neighbors"):
        knn_edge_index(np.zeros((4, 2)), n_neighbors=0)
    with pytest.raises(InputError, match="NaN"):
        knn_edge_index(np.array([[0, 0], [np.nan, 1]]), n_neighbors=1)
    with pytest.raises(InputError, match="groups"):
        knn_edge_index(np.zeros((4, 2)), n_neighbors=1, groups=[0, 1])


# --------------------------------------------------------------------------- spatial_graph


def test_spatial_graph_is_per_library_and_leaves_keys_alone():
    adata = make_sections()
    obsm_before, obs_before = set(adata.obsm), adata.obs.copy()
    sthisto.pp.spatial_graph(adata, method="knn", n_neighbors=4)
    conn, dist = adata.obsp["spatial_connectivities"], adata.obsp["spatial_distances"]
    libraries = adata.obs["library_id"].to_numpy()
    rows, cols = conn.nonzero()
    # Both sections share array coordinates, yet no edge joins them.
    assert len(rows) == 4 * adata.n_obs and (libraries[rows] == libraries[cols]).all()
    assert set(adata.obsm) == obsm_before
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    params = adata.uns["spatial_neighbors"]
    assert params["connectivities_key"] == "spatial_connectivities"
    assert params["params"]["n_neighbors"] == 4 and params["params"]["coord_type"] == "generic"
    assert adata.uns["sthisto"]["spatial_graph"]["spatial"]["coordinates"] == "array"
    grid = adata.obs[["array_col", "array_row"]].to_numpy(float)
    np.testing.assert_allclose(dist[rows, cols].A1, np.linalg.norm(grid[rows] - grid[cols], axis=1))
    ours = knn_edge_index(grid, n_neighbors=4, groups=libraries)
    ours_lengths = np.linalg.norm(grid[ours[0]] - grid[ours[1]], axis=1)
    # squidpy breaks distance ties its own way; the neighbour distances agree spot by spot.
    for spot in range(adata.n_obs):
        np.testing.assert_allclose(np.sort(dist[spot].data), np.sort(ours_lengths[ours[1] == spot]))


def test_grid_radius_and_pruned_knn():
    adata = make_sections()
    sthisto.pp.spatial_graph(adata, method="grid", n_neighbors=4, key_added="grid")
    degree = np.asarray(adata.obsp["grid_connectivities"].sum(1)).ravel()
    interior = (
        (adata.obs["array_row"] > 0)
        & (adata.obs["array_col"] > 0)
        & (adata.obs["array_row"] < adata.obs.groupby("library_id", observed=True)["array_row"].transform("max"))
        & (adata.obs["array_col"] < adata.obs.groupby("library_id", observed=True)["array_col"].transform("max"))
    ).to_numpy()
    assert (degree[interior] == 4).all() and (degree[~interior] < 4).all()
    sthisto.pp.spatial_graph(adata, method="radius", radius=1.5, key_added="ring")
    assert adata.obsp["ring_distances"].max() <= 1.5
    assert (np.asarray(adata.obsp["ring_connectivities"].sum(1)).ravel()[interior] == 8).all()
    sthisto.pp.spatial_graph(adata, method="knn", n_neighbors=8, max_distance=1.0, key_added="pruned")
    pruned = adata.obsp["pruned_connectivities"]
    assert (pruned != adata.obsp["grid_connectivities"]).nnz == 0
    assert adata.obsp["pruned_distances"].max() == 1.0


def test_spatial_graph_refuses_bad_calls_without_changing_anything():
    adata = make_sections()
    sthisto.pp.spatial_graph(adata, n_neighbors=4)
    before = adata.copy()
    calls = [
        ({"n_neighbors": 4}, KeyExistsError, "overwrite=True"),
        ({"method": "delaunay", "key_added": "x"}, InputError, "unknown method"),
        ({"coordinates": "hex", "key_added": "x"}, InputError, "coordinates="),
        ({"method": "radius", "key_added": "x"}, InputError, "positive radius"),
        ({"radius": 2.0, "key_added": "x"}, InputError, "only used with method='radius'"),
        ({"method": "grid", "max_distance": 2.0, "key_added": "x"}, InputError, "max_distance"),
        ({"n_neighbors": 28, "key_added": "x"}, InputError, r"libraries \['S1'\] have only \[28\] spots"),
    ]
    for kwargs, error, message in calls:
        with pytest.raises(error, match=message):
            sthisto.pp.spatial_graph(adata, **kwargs)
    no_grid = adata.copy()
    del no_grid.obs["array_col"]
    with pytest.raises(MissingKeyError, match="array_col"):
        sthisto.pp.spatial_graph(no_grid, key_added="x")
    assert set(adata.obsp) == set(before.obsp) and set(adata.uns) == set(before.uns)
    assert (adata.obsp["spatial_connectivities"] != before.obsp["spatial_connectivities"]).nnz == 0
    new = sthisto.pp.spatial_graph(adata, n_neighbors=2, overwrite=True, copy=True)
    assert new.obsp["spatial_connectivities"].nnz == 2 * adata.n_obs
    assert adata.obsp["spatial_connectivities"].nnz == 4 * adata.n_obs


@pytest.mark.real_data
def test_real_her2st_grid(her2st_dir):
    """her2st array coordinates: the HGGEF graph (k=8, ≤ 2 units) on a real section."""
    spots = pd.read_csv(her2st_dir / "ST-spotfiles" / "C1_selection.tsv", sep="\t")
    grid = spots[["x", "y"]].to_numpy(float)
    edges = knn_edge_index(grid, n_neighbors=8, max_distance=2)
    lengths = np.linalg.norm(grid[edges[0]] - grid[edges[1]], axis=1)
    assert lengths.max() <= 2 and not (edges[0] == edges[1]).any()
    # Spots well inside the tissue have all 8 neighbours within distance √2.
    full = np.bincount(edges[1], minlength=len(grid)) == 8
    assert full.mean() > 0.5


# --------------------------------------------------------------------------- squidpy versions


@pytest.mark.parametrize(
    ("method", "kwargs", "new_name", "legacy"),
    [
        ("knn", {"n_neighbors": 4}, "spatial_neighbors_knn", {"coord_type": "generic", "n_neighs": 4}),
        ("grid", {"n_neighbors": 4}, "spatial_neighbors_grid", {"coord_type": "grid", "n_neighs": 4}),
        ("radius", {"radius": 1.5}, "spatial_neighbors_radius", {"coord_type": "generic", "radius": 1.5}),
    ],
)
def test_spatial_graph_uses_squidpys_per_kind_functions_where_they_exist(monkeypatch, method, kwargs, new_name, legacy):
    import squidpy

    reference = make_sections()
    sthisto.pp.spatial_graph(reference, method=method, **kwargs)
    assert reference.uns["sthisto"]["spatial_graph"]["spatial"]["squidpy_function"] == (
        "squidpy.gr.spatial_neighbors" if not hasattr(squidpy.gr, new_name) else f"squidpy.gr.{new_name}"
    )

    calls = []
    original = squidpy.gr.spatial_neighbors

    def per_kind(adata, **options):  # stands in for the newer squidpy's function
        calls.append(options)
        extra = {key: options.pop(key) for key in ("n_neighs", "radius") if key in options}
        assert extra == {k: v for k, v in legacy.items() if k != "coord_type"}
        return original(adata, coord_type=legacy["coord_type"], **extra, **options)

    monkeypatch.setattr(squidpy.gr, new_name, per_kind, raising=False)
    adata = make_sections()
    sthisto.pp.spatial_graph(adata, method=method, **kwargs)
    assert len(calls) == 1 and calls[0]["library_key"] == "library_id"
    assert adata.uns["sthisto"]["spatial_graph"]["spatial"]["squidpy_function"] == f"squidpy.gr.{new_name}"
    for key in ("spatial_connectivities", "spatial_distances"):
        assert (adata.obsp[key] != reference.obsp[key]).nnz == 0


def test_spatial_graph_falls_back_to_the_single_squidpy_function(monkeypatch):
    import squidpy

    for name in ("spatial_neighbors_knn", "spatial_neighbors_grid", "spatial_neighbors_radius"):
        monkeypatch.delattr(squidpy.gr, name, raising=False)
    adata = make_sections()
    sthisto.pp.spatial_graph(adata, n_neighbors=4)
    assert adata.uns["sthisto"]["spatial_graph"]["spatial"]["squidpy_function"] == "squidpy.gr.spatial_neighbors"
    assert adata.obsp["spatial_connectivities"].sum(axis=1).A1.tolist() == [4] * adata.n_obs
