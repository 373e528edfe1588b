"""ridge_context: the spot's features beside the mean features of its neighbour rings (issue 14)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import sthisto
from sthisto._errors import InputError
from sthisto.models.ridge_context import neighbour_graph, ring_features


def test_rings_are_hop_shells_of_the_grid_graph():
    # a 1 x 5 strip: spot 0's ring 1 is {1}, ring 2 is {2}; spot 2's ring 2 is {0, 4}
    coords = np.column_stack([np.arange(5) * 100.0, np.zeros(5)])
    adjacency = neighbour_graph(coords, np.zeros(5), radius=1.2)
    assert adjacency.nnz == 8 and not adjacency.diagonal().any()
    features = np.arange(5, dtype=np.float32)[:, None] ** 2  # 0, 1, 4, 9, 16
    out = ring_features(features, adjacency, rings=2)
    np.testing.assert_allclose(out[:, 0], features[:, 0])
    np.testing.assert_allclose(out[:, 1], [1, 2, 5, 10, 9])  # mean of the direct neighbours
    np.testing.assert_allclose(out[:, 2], [4, 9, 8, 1, 4])  # mean of the spots two hops away


def test_square_and_hexagonal_grids_take_their_first_ring_and_sections_stay_apart():
    square = np.array([(x, y) for x in range(5) for y in range(5)], dtype=float) * 37.0
    hexagon = np.array([(x + 0.5 * (y % 2), y * np.sqrt(3) / 2) for x in range(6) for y in range(6)]) * 55.0
    coords = np.vstack([square, hexagon])
    libraries = np.array(["sq"] * len(square) + ["hex"] * len(hexagon))
    adjacency = neighbour_graph(coords, libraries, radius=1.2)
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    assert degree[12] == 4  # centre of the square grid: no diagonals
    assert degree[len(square) + 14] == 6  # inner hexagon spot
    assert sp.triu(adjacency[: len(square)][:, len(square) :]).nnz == 0  # no edge joins two sections
    isolated = ring_features(np.ones((1, 3), np.float32) * 7, sp.csr_matrix((1, 1), dtype=bool), rings=1)
    np.testing.assert_allclose(isolated, 7.0)  # no neighbour: its own features, never zeros


def _smooth_cohort():
    """Two sections whose expression follows a smooth field that each spot's features see only noisily."""
    adata = sthisto.datasets.synthetic(n_sections=2, n_patients=1, n_spots=150, n_genes=4, seed=2)
    rng = np.random.default_rng(0)
    xy = adata.obsm["spatial"].astype(float)
    xy = (xy - xy.min(0)) / np.ptp(xy, axis=0)
    field = np.column_stack([np.sin(3 * xy[:, 0]), np.cos(3 * xy[:, 1]), np.sin(2 * (xy[:, 0] + xy[:, 1]))])
    adata.obsm["noisy"] = np.hstack([field + 1.5 * rng.normal(size=field.shape), rng.normal(size=(len(xy), 3))])
    target = field @ rng.normal(size=(3, adata.n_vars)) + 0.1 * rng.normal(size=(len(xy), adata.n_vars))
    adata.layers["target"] = target.astype(np.float32)
    return adata


def _held_out_pearson(adata, method, **params):
    libraries = list(adata.obs["library_id"].cat.categories)
    model = sthisto.tl.train(
        adata, method, train_mask=libraries[:1], layer="target", features_key="noisy", store=False, **params
    )
    test = adata[adata.obs["library_id"] == libraries[1]].copy()
    sthisto.tl.predict(test, model, key_added="p")
    table = sthisto.tl.evaluate(test, predicted="p", observed="target")
    return table.query("scope == 'overall' and metric == 'pearson_gene_mean'")["value"].iloc[0], model


def test_context_beats_plain_ridge_where_the_signal_is_spatially_smooth():
    adata = _smooth_cohort()
    plain, _ = _held_out_pearson(adata, "ridge_tiny")
    context, model = _held_out_pearson(adata, "ridge_context_tiny", context_rings=2)
    assert model.data_params["features_dim"] == 3 * adata.obsm["noisy"].shape[1]
    assert context > plain + 0.1, (plain, context)
    # the same folds through cross_validate: one more registered method beside ridge
    table = sthisto.tl.cross_validate(
        adata,
        ["ridge_tiny", "ridge_context_tiny"],
        split="section",
        layer="target",
        features_key="noisy",
        method_params={"ridge_context_tiny": {"context_rings": 2}},
        progress=False,
        evaluate_params={"leiden_connectivities": "gauss", "kmeans_n_init": 2},
    )
    overall = table.query("scope == 'overall' and metric == 'pearson_gene_mean'").set_index("method")["value"]
    assert overall["ridge_context_tiny"] > overall["ridge_tiny"] + 0.1, overall


def test_saved_context_model_predicts_identically_and_bad_settings_are_refused(tmp_path):
    adata = _smooth_cohort()
    _, model = _held_out_pearson(adata, "ridge_context_tiny")
    model.save(tmp_path / "m")
    again = sthisto.io.load_model(tmp_path / "m")
    np.testing.assert_array_equal(again.predict(adata), model.predict(adata))
    before = set(adata.obsm)
    for bad in ({"context_rings": 0}, {"context_radius": 0.5}):
        with pytest.raises(InputError, match="context_"):
            sthisto.tl.train(adata, "ridge_context", layer="target", features_key="noisy", **bad)
    assert set(adata.obsm) == before
    assert "models" not in adata.uns.get("sthisto", {})
