"""graph_key=: the graph methods consume a spot graph the user built with squidpy (issue 16)."""

from __future__ import annotations

import json
import types
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import sthisto
from sthisto._errors import InputError, MissingKeyError
from sthisto.pp._user_graph import graph_matrix, section_edge_index

sq = pytest.importorskip("squidpy")


def _squidpy_graph(adata, key, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # squidpy's deprecation notices about its own API
        sq.gr.spatial_neighbors(adata, library_key="library_id", key_added=key, **kwargs)


@pytest.fixture(scope="module")
def cohort():
    adata = sthisto.datasets.synthetic(n_sections=2, n_spots=30, n_genes=6, seed=0)
    # On legacy ST's square grid squidpy's 4-neighbour grid graph is the papers' k = 4 graph
    # pruned to distance 1 (no diagonals at the tissue border): "the same graph".
    _squidpy_graph(adata, "grid", coord_type="grid", n_neighs=4)
    _squidpy_graph(adata, "knn8", coord_type="generic", n_neighs=8)  # another graph
    return adata


def test_obsp_edges_follow_knn_edge_index_layout(cohort):
    rows = np.flatnonzero(cohort.obs["library_id"] == "S01")
    positions = cohort.obs[["array_col", "array_row"]].to_numpy()[rows].astype(float)
    own = sthisto.pp.knn_edge_index(positions, n_neighbors=4, max_distance=1.0)
    user = section_edge_index(cohort, "grid_connectivities", rows)
    assert {tuple(e) for e in user.T} == {tuple(e) for e in own.T}
    assert (np.diff(user[1]) >= 0).all()  # sorted by target, as the internal graph


def test_thitogene_on_a_squidpy_graph_equals_its_own_graph_when_they_agree(cohort):
    adata = cohort.copy()
    model = sthisto.tl.train(
        adata,
        "thitogene_tiny",
        max_epochs=1,
        graph_key="grid_connectivities",
        progress=False,
        key_added="thitogene",
        device="cpu",
    )
    manifest = json.loads(adata.uns["sthisto"]["models"]["thitogene"]["manifest"])
    assert manifest["data_params"]["graph_key"] == "grid_connectivities"  # recorded with the model
    user = model.predict(adata)

    model.data_params.update(graph_key=None, graph_max_distance=1.0)  # the method builds its own
    np.testing.assert_allclose(model.predict(adata), user, rtol=1e-5, atol=1e-6)

    model.data_params["graph_key"] = "knn8_connectivities"
    assert np.abs(model.predict(adata) - user).max() > 1e-4  # another graph, another answer

    model.data_params["graph_key"] = "missing_connectivities"
    with pytest.raises(MissingKeyError, match="squidpy.gr.spatial_neighbors"):
        model.predict(adata)


def test_ridge_context_on_a_squidpy_graph(cohort):
    adata = cohort.copy()
    params = {"features_key": "synthetic_morphology", "n_components": 4, "store": False, "progress": False}
    own = sthisto.tl.train(adata, "ridge_context", **params).predict(adata)
    same = sthisto.tl.train(adata, "ridge_context", graph_key="grid_connectivities", **params)
    np.testing.assert_allclose(same.predict(adata), own, rtol=1e-6, atol=1e-8)
    other = sthisto.tl.train(adata, "ridge_context", graph_key="knn8_connectivities", **params)
    assert np.abs(other.predict(adata) - own).max() > 1e-4


def test_methods_without_a_graph_refuse_graph_key(cohort):
    with pytest.raises(InputError, match="does not accept"):
        sthisto.tl.train(cohort.copy(), "ridge", graph_key="grid_connectivities", store=False, progress=False)


def test_bad_graphs_are_refused_with_the_fix():
    stand_in = types.SimpleNamespace(n_obs=4, obsp={"g": sp.identity(3, format="csr")})
    with pytest.raises(InputError, match=r"shape \(3, 3\).*\(4, 4\)"):
        graph_matrix(stand_in, "g")
    with pytest.raises(MissingKeyError, match="graph_key=None"):
        graph_matrix(stand_in, "spatial_connectivities")
    ring = types.SimpleNamespace(n_obs=3, obsp={"g": sp.csr_matrix(np.array([[1, 2, 0], [2, 0, 0.5], [0, 0.5, 0]]))})
    assert sorted(zip(*graph_matrix(ring, "g").nonzero(), strict=True)) == [(0, 1), (1, 0), (1, 2), (2, 1)]
