"""sthisto.tl.superresolve: offsets on hand-checkable square and hexagonal grids, image bounds,
real features at new positions, end to end with ridge_tiny and histosge_tiny."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

import sthisto
from sthisto._errors import InputError

torch.set_num_threads(1)
SQRT3 = math.sqrt(3)


def textured_image(height, width, seed=0):
    """Smooth random colour field: patches at different places look different."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(60, 230, size=(height // 20 + 2, width // 20 + 2, 3))
    image = np.kron(coarse, np.ones((20, 20, 1)))[:height, :width]
    return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


def grid_adata(cols, rows, xy, *, shape=(500, 500), spacing_um=200.0, mpp=2.0, seed=0):
    n = len(cols)
    obs = pd.DataFrame(
        {"library_id": pd.Categorical(["L"] * n), "array_row": np.asarray(rows), "array_col": np.asarray(cols)},
        index=[f"s{i}" for i in range(n)],
    )
    counts = np.random.default_rng(seed).poisson(5.0, size=(n, 4)).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=["g0", "g1", "g2", "g3"]))
    adata.obsm["spatial"] = np.asarray(xy, dtype=float)
    adata.uns["spatial"] = {
        "L": {
            "images": {"fullres": textured_image(*shape, seed=seed)},
            "scalefactors": {"microns_per_pixel": mpp, "spot_spacing_um": spacing_um, "spot_diameter_fullres": 50.0},
            "metadata": {"has_image": True},
        }
    }
    return adata


def square_grid(n=3, pitch=100.0, origin=150.0, **kwargs):
    rows, cols = np.divmod(np.arange(n * n), n)
    return grid_adata(cols, rows, np.column_stack([origin + pitch * cols, origin + pitch * rows]), **kwargs)


def hex_grid(n_rows=3, n_cols=6, pitch=100.0, origin=(100.0, 100.0), rotation=0.0, **kwargs):
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    keep = (rows + cols) % 2 == 0
    rows, cols = rows[keep], cols[keep]
    x, y = cols * pitch / 2, rows * pitch * SQRT3 / 2
    c, s = math.cos(rotation), math.sin(rotation)
    xy = np.column_stack([origin[0] + c * x - s * y, origin[1] + s * x + c * y])
    return grid_adata(cols, rows, xy, spacing_um=100.0, mpp=1.0, **kwargs)


def ridge(adata):
    return sthisto.tl.train(adata, "ridge_tiny", progress=False, store=False)


def as_set(points):
    return {(round(float(x), 6), round(float(y), 6)) for x, y in points}


def test_square_grid_factor_4_and_8_positions():
    adata = square_grid()
    model = ridge(adata)
    parents = adata.obsm["spatial"]
    four = sthisto.tl.superresolve(adata, model, factor=4)
    expected = [p + d for p in parents for d in ((50, 0), (0, -50), (50, -50))]
    assert four.n_obs == 27 and as_set(four.obsm["spatial"]) == as_set(expected)
    # Declared grid of half the spacing: parents would sit on even nodes.
    fine = four.obs[["array_col", "array_row"]].to_numpy()
    np.testing.assert_allclose(fine * 50 + [150, 100], four.obsm["spatial"])
    assert four.uns["spatial"]["L"]["scalefactors"]["spot_spacing_um"] == pytest.approx(100.0)
    assert four.uns["spatial"]["L"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(25.0)
    assert set(four.obs["offset_index"]) == {1, 2, 3} and set(four.obs["parent_spot"]) == set(adata.obs_names)

    eight = sthisto.tl.superresolve(adata, model, factor=8, key_added="x8")
    offsets = ((50, 0), (25, -25), (-25, 25), (-50, 0), (0, -50))  # the paper's, y pointing down
    expected = as_set(p + d for p in parents for d in offsets)
    assert len(expected) == 45 - 6  # neighbours along a row share their half-way points
    assert eight.n_obs == 39 and as_set(eight.obsm["spatial"]) == expected
    fine = eight.obs[["array_col", "array_row"]].to_numpy()
    np.testing.assert_allclose(fine * 25 + [100, 100], eight.obsm["spatial"])  # quarter steps from (100, 100)
    summary = eight.uns["sthisto"]["superresolve"]["x8"]["libraries"]["L"]
    assert summary["n_candidates"] == 45 and summary["n_duplicates_merged"] == 6 and summary["grid"] == "square"
    assert summary["R_px"] == pytest.approx(100.0) and summary["new_spacing_um"] == pytest.approx(50.0)
    with_parents = sthisto.tl.superresolve(adata, model, factor=8, include_original=True)
    assert with_parents.n_obs == 48 and (with_parents.obs["offset_index"] == 0).sum() == 9


def test_offsets_scale_with_the_measured_spacing():
    adata = square_grid(pitch=80.0)
    adata.uns["spatial"]["L"]["scalefactors"]["spot_spacing_um"] = 160.0
    four = sthisto.tl.superresolve(adata, ridge(adata), factor=4)
    expected = [p + d for p in adata.obsm["spatial"] for d in ((40, 0), (0, -40), (40, -40))]
    assert as_set(four.obsm["spatial"]) == as_set(expected)


def test_hexagonal_grid_factor_4_and_refused_factor_8():
    adata = hex_grid()
    model = ridge(adata)
    four = sthisto.tl.superresolve(adata, model, factor=4)
    half = 50.0
    directions = [(math.cos(a), -math.sin(a)) for a in (0, math.pi / 3, 2 * math.pi / 3)]
    expected = as_set(p + half * np.array(d) for p in adata.obsm["spatial"] for d in directions)
    assert four.n_obs == 3 * adata.n_obs and as_set(four.obsm["spatial"]) == expected
    everything = np.vstack([adata.obsm["spatial"], four.obsm["spatial"]])
    distance, _ = cKDTree(everything).query(everything, k=2)
    np.testing.assert_allclose(distance[:, 1], half)  # a hexagonal grid of half the spacing
    fine = four.obs[["array_row", "array_col"]].to_numpy()
    assert ((fine.sum(axis=1)) % 2 == 0).all() and fine.min() == 0  # Visium convention
    assert four.uns["sthisto"]["superresolve"]["ridge_superresolved"]["libraries"]["L"]["grid"] == "hex"
    with pytest.raises(InputError, match="factor=4"):
        sthisto.tl.superresolve(adata, model, factor=8)
    with pytest.raises(InputError, match="factor="):
        sthisto.tl.superresolve(adata, model, factor=2)


def test_directions_follow_a_rotated_grid():
    adata = hex_grid(n_rows=4, n_cols=8, origin=(250.0, 60.0), rotation=math.radians(30), shape=(600, 600))
    four = sthisto.tl.superresolve(adata, ridge(adata), factor=4)
    parents = adata.obsm["spatial"]
    # Every new spot is the midpoint of two neighbouring measured spots (for interior edges).
    midpoints = as_set(
        (parents[i] + parents[j]) / 2 for i, j in cKDTree(parents).query_pairs(r=100.5) if np.isfinite(parents[i]).all()
    )
    assert midpoints <= as_set(four.obsm["spatial"])
    distance, _ = cKDTree(parents).query(four.obsm["spatial"])
    np.testing.assert_allclose(distance, 50.0)


def test_no_new_spot_outside_the_image():
    adata = square_grid(origin=120.0, shape=(400, 400))  # last column at x = 320: +50 px stays inside
    adata.obsm["spatial"][:, 0] += 40  # now at 360: its 0° and 45° neighbours would be at x = 410
    four = sthisto.tl.superresolve(adata, ridge(adata), factor=4)
    xy = four.obsm["spatial"]
    assert (xy >= 0).all() and (xy[:, 0] < 400).all() and (xy[:, 1] < 400).all()
    summary = four.uns["sthisto"]["superresolve"]["ridge_superresolved"]["libraries"]["L"]
    assert summary["n_outside_image"] == 6 and four.n_obs == 27 - 6


def test_features_at_new_positions_are_real():
    adata = square_grid(seed=3)
    model = ridge(adata)
    four = sthisto.tl.superresolve(adata, model, factor=4, batch_size=2)
    # Embedding the patches at the returned positions and applying the ridge gives the same numbers.
    check = ad.AnnData(obs=four.obs[["library_id", "array_row", "array_col"]].copy())
    check.obsm["spatial"] = four.obsm["spatial"]
    check.uns["spatial"] = adata.uns["spatial"]
    sthisto.pp.embed(check, encoder="handcrafted", progress=False)
    direct = model.estimator.predict(check.obsm["X_handcrafted"])
    np.testing.assert_allclose(four.X, direct, rtol=1e-4, atol=1e-5)
    sthisto.pp.embed(adata, encoder="handcrafted", progress=False, overwrite=True)
    parent_features = adata.obsm["X_handcrafted"][adata.obs_names.get_indexer(four.obs["parent_spot"])]
    assert not np.allclose(check.obsm["X_handcrafted"], parent_features)
    # Batches of parents do not change anything.
    whole = sthisto.tl.superresolve(adata, model, factor=4, batch_size=1000)
    np.testing.assert_array_equal(whole.X, four.X)


@pytest.fixture(scope="module")
def data():
    return sthisto.datasets.synthetic(n_sections=2, n_spots=45, n_genes=10, seed=5)


def test_end_to_end_with_ridge_and_histosge(data):
    adata = data.copy()
    for method, params in (("ridge_tiny", {}), ("histosge_tiny", {"encoder": "handcrafted", "max_epochs": 3})):
        model = sthisto.tl.train(adata, method, progress=False, key_added=method, **params)
        frames = {k: list(v) for k, v in model.extra.get("frames", {}).items()}
        fine = sthisto.tl.superresolve(adata, method, factor=8, library_id="S02")
        assert fine.n_obs > 3 * (adata.obs["library_id"] == "S02").sum()
        assert list(fine.var_names) == list(adata.var_names) and np.isfinite(fine.X).all()
        assert fine.obs["library_id"].astype(str).eq("S02").all()
        np.testing.assert_array_equal(fine.layers[f"{method}_superresolved"], fine.X)
        record = fine.uns["sthisto"]["superresolve"][f"{method}_superresolved"]
        assert record["method"] == model.name and record["model_key"] == method and record["factor"] == 8
        assert {k: list(v) for k, v in model.extra.get("frames", {}).items()} == frames  # training frames kept
        assert fine.X.std(axis=0).max() > 0  # not a constant map
        assert method in fine.uns["sthisto"]["models"]  # the source's records travel with the result
    assert "X_handcrafted" not in fine.obsm  # features of new spots are not carried into the result
    sdata = sthisto.tl.superresolve(adata, "ridge_tiny", factor=4, as_spatialdata=True)
    assert sum(len(shapes) for shapes in sdata.shapes.values()) == sdata.tables["table"].n_obs


class TinyGraphNet(torch.nn.Module):
    """Section-wide attention over spots plus mean messages along the kNN graph, and positions."""

    input_keys = ("patches", "positions", "edge_index")

    def __init__(self, n_genes, n_positions=64, width=6):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(3, width, 5, stride=4), torch.nn.AdaptiveAvgPool2d(1))
        self.position = torch.nn.Embedding(n_positions, width)
        self.attention = torch.nn.MultiheadAttention(width, 1, batch_first=True)
        self.head = torch.nn.Linear(2 * width, n_genes)

    def forward(self, patches, positions, edge_index):
        x = self.conv(patches.float() / 255).flatten(1) + self.position(positions).sum(1)
        x = x + self.attention(x[None], x[None], x[None])[0][0]
        message = torch.zeros_like(x).index_add_(0, edge_index[1], x[edge_index[0]])
        return {"prediction": self.head(torch.cat([x, message], 1))}


class TinyGraph(sthisto.models.ExpressionModel):
    name = "tiny_superresolve_graph"
    network_class = TinyGraphNet
    section_wide = uses_positions = needs_graph = True
    data_defaults = {"patch_size_px": 16, "patch_size_um": 100.0, "graph_neighbors": 4, "graph_max_distance": None}
    training_defaults = {"lr": 1e-2, "max_epochs": 1}


def test_graph_methods_use_neighbourhoods(data):
    model = sthisto.tl.train(data, TinyGraph, progress=False, store=False)
    fine = sthisto.tl.superresolve(data, model, factor=4, batch_size=40)
    assert model.prediction_summary["mode"] == "neighbourhoods" and model.prediction_summary["n_units"] > 1
    assert np.isfinite(fine.X).all() and model.data_params["prediction_chunk_spots"] is None


def _clipped_by_hand(spots, side, shape):
    """Whether a ``side``-px patch centred on each spot (x, y) reaches past an image of ``shape``."""
    origin = np.rint(spots.obsm["spatial"] - side / 2.0)
    height, width = shape
    return (origin < 0).any(axis=1) | (origin[:, 0] + side > width) | (origin[:, 1] + side > height)


def test_new_spots_whose_patch_crosses_the_border_are_flagged():
    adata = square_grid(origin=60.0, shape=(400, 400))  # the first row's upward offsets land at y = 10
    # ridge_tiny reads handcrafted features of 112 µm: 56 px at 2 µm/px, so y = 10 reaches past the top edge.
    four = sthisto.tl.superresolve(adata, ridge(adata), factor=4)
    flag = four.obs["patch_clipped"].to_numpy()
    assert flag.dtype == bool
    np.testing.assert_array_equal(flag, _clipped_by_hand(four, 56, (400, 400)))
    assert flag.sum() == 6 and np.allclose(four.obsm["spatial"][flag, 1], 10.0)
    summary = four.uns["sthisto"]["superresolve"]["ridge_superresolved"]["libraries"]["L"]
    assert summary["n_patch_clipped"] == 6

    # A pixel method (section-wide, neighbourhood prediction) reads its own 100 µm patches: 50 px.
    model = sthisto.tl.train(adata, TinyGraph, progress=False, store=False)
    pixels = sthisto.tl.superresolve(adata, model, factor=4, include_original=True)
    expected = _clipped_by_hand(pixels, 50, (400, 400))
    np.testing.assert_array_equal(pixels.obs["patch_clipped"].to_numpy(), expected)
    assert expected.sum() == 6 and not expected[pixels.obs["offset_index"].to_numpy() == 0].any()
