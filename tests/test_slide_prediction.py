"""Whole-slide prediction: streaming equals in-memory, neighbourhoods, position re-indexing,
distributed prediction (2 CPU processes), recovery of the dependent genes on a new slide, plots."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from torch import nn

import sthisto
from sthisto._errors import InputError
from sthisto.datasets import synthetic_he_image
from sthisto.engine._neighbourhoods import neighbourhoods
from sthisto.io._image import _write_pyramidal_tiff
from sthisto.models import ExpressionModel
from sthisto.models._registry import _METHODS, register_method
from sthisto.models.layers.position import GridPositionEmbedding
from sthisto.pp._patches import PatchDataset

matplotlib.use("Agg")
torch.set_num_threads(1)


class TinySpotNet(nn.Module):
    """Per-spot network on 16 px patches."""

    input_keys = ("patches",)

    def __init__(self, n_genes, hidden=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, hidden, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(hidden, n_genes)

    def forward(self, patches):
        return {"prediction": self.head(self.features(patches.float() / 255.0).flatten(1))}


class TinySpot(ExpressionModel):
    name = "tiny_slide_spot"
    input_kind = "pixels"
    network_class = TinySpotNet
    batching = "spots"
    data_defaults = {"patch_size_px": 16, "patch_size_um": 100.0}
    training_defaults = {"lr": 1e-2, "max_epochs": 1, "batch_size": 16}


class TinySectionNet(nn.Module):
    """Section-wide attention + graph messages + grid positions, like THItoGene/HGGEF in miniature."""

    input_keys = ("patches", "positions", "edge_index")

    def __init__(self, n_genes, n_positions=64, width=8):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, width, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.position = GridPositionEmbedding(n_positions, width, mode="add")
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.head = nn.Linear(2 * width, n_genes)

    def forward(self, patches, positions, edge_index):
        x = self.conv(patches.float() / 255.0).flatten(1) + self.position(positions)
        x = x + self.attention(x[None], x[None], x[None])[0][0]
        source, target = edge_index
        message = torch.zeros_like(x).index_add_(0, target, x[source])
        degree = torch.zeros(len(x)).index_add_(0, target, torch.ones(len(target))).clamp_(min=1)
        return {"prediction": self.head(torch.cat([x, message / degree[:, None]], 1))}


class TinySectionWide(ExpressionModel):
    name = "tiny_slide_section_wide"
    input_kind = "pixels"
    network_class = TinySectionNet
    section_wide = True
    uses_positions = True
    needs_graph = True
    batching = "section"
    data_defaults = {"patch_size_px": 16, "patch_size_um": 100.0, "graph_neighbors": 4, "graph_max_distance": None}
    training_defaults = {"lr": 1e-2, "max_epochs": 2}


for _cls in (TinySpot, TinySectionWide):
    if _cls.name not in _METHODS:
        register_method(_cls)


@pytest.fixture(scope="module")
def data():
    return sthisto.datasets.synthetic(n_sections=3, n_patients=1, n_spots=70, n_genes=15, geometry="visium", seed=4)


@pytest.fixture(scope="module")
def section_model(data):
    return sthisto.tl.train(data, TinySectionWide, progress=False, store=False)


@pytest.fixture(scope="module")
def new_slide(data, tmp_path_factory):
    """Section S03 redrawn tile by tile into a pyramidal TIFF: a slide the models never saw."""
    record = data.uns["sthisto"]["synthetic"]
    section = record["sections"]["S03"]
    mpp = float(record["microns_per_pixel"])

    def draw(origin, shape, level_mpp):
        return synthetic_he_image(
            shape,
            origin=origin,
            microns_per_pixel=level_mpp,
            seed=int(section["seed"]),
            style_seed=int(section["style_seed"]),
            tissue_center_um=tuple(section["tissue_center_um"]),
            tissue_radius_um=float(section["tissue_radius_um"]),
        )

    shape = tuple(int(v) for v in section["image_shape"])
    path = _write_pyramidal_tiff(tmp_path_factory.mktemp("new") / "S03.ome.tif", shape, draw, microns_per_pixel=mpp)
    return sthisto.io.read_image(path, library_id="new")


def test_per_spot_streaming_equals_in_memory_and_reads_one_batch_at_a_time(data, monkeypatch):
    model = sthisto.tl.train(data, TinySpot, progress=False, store=False)
    model.data_params["prediction_batch_spots"] = 16
    largest = []
    original = PatchDataset.read_batch

    def counting(self, items):
        items = list(items)
        largest.append(len(items))
        return original(self, items)

    monkeypatch.setattr(PatchDataset, "read_batch", counting)
    streamed = model.predict(data)
    assert max(largest) == 16 and sum(largest) == data.n_obs
    assert model.prediction_summary["mode"] == "spots" and model.prediction_summary["n_units"] == len(largest)
    monkeypatch.setattr(PatchDataset, "read_batch", original)
    # In memory: every patch of the data at once, then the network in the same batches.
    patches, _ = PatchDataset(data, spec=model.patch_spec).read_batch(range(data.n_obs))
    with torch.inference_mode():
        libraries = data.obs["library_id"].astype(str).to_numpy()
        expected = np.zeros_like(streamed)
        for library in np.unique(libraries):
            rows = np.flatnonzero(libraries == library)
            for start in range(0, len(rows), 16):
                part = rows[start : start + 16]
                expected[part] = model.network.eval()(patches[part])["prediction"].numpy()
    np.testing.assert_array_equal(streamed, expected)
    model.data_params["prediction_batch_spots"] = None
    np.testing.assert_allclose(model.predict(data), streamed, rtol=1e-5, atol=1e-6)


def test_section_wide_neighbourhoods(data, section_model):
    model = section_model
    whole = model.predict(data)
    assert model.prediction_summary["n_units"] == 3  # one unit per section by default
    section = model.sections(data, np.flatnonzero(data.obs["library_id"] == "S02"))[0]
    with torch.inference_mode():
        direct = model.network.eval()(**model.network_inputs(section.tensors))["prediction"].numpy()
    np.testing.assert_array_equal(whole[data.obs["library_id"].to_numpy() == "S02"], direct)
    try:
        model.data_params.update(prediction_chunk_spots=20, prediction_halo=100.0)
        np.testing.assert_array_equal(model.predict(data), whole)  # a halo covering the section: exact
        model.data_params["prediction_halo"] = 3.0
        parts = model.predict(data)
        summary = model.prediction_summary
    finally:
        model.data_params.update(prediction_chunk_spots=None, prediction_halo=3.0)
    assert summary["n_units"] >= 9 and summary["largest_unit_spots"] < 70
    assert np.corrcoef(parts.ravel(), whole.ravel())[0, 1] > 0.97
    # Cores partition the spots; contexts contain their cores.
    coords = data.obsm["spatial"][data.obs["library_id"].to_numpy() == "S01"]
    cut = neighbourhoods(coords, max_core=20, halo=2.0)
    cores = np.concatenate([core for core, _ in cut])
    assert sorted(cores.tolist()) == list(range(len(coords)))
    assert all(np.isin(core, context).all() and len(core) <= 20 for core, context in cut)


def test_positions_beyond_the_table_are_reindexed_for_pseudo_spots_only(data, section_model, new_slide):
    model = section_model
    table = model.data_params["n_positions"]
    spots = sthisto.pp.tile(new_slide, spacing_um=25, diameter_um=15)
    assert spots.obs["array_col"].max() >= table
    predicted = sthisto.tl.predict(spots, model, key_added="fine", copy=True)
    summary = model.prediction_summary
    assert summary["reindexed_libraries"] == ["new"] and summary["n_units"] > 1
    assert predicted.shape == (spots.n_obs, len(model.genes)) and np.isfinite(predicted.X).all()
    try:
        model.data_params["prediction_positions"] = "strict"
        with pytest.raises(InputError, match="position table"):
            sthisto.tl.predict(spots, model)
    finally:
        model.data_params["prediction_positions"] = "auto"
    shifted = data[data.obs["library_id"] == "S01"].copy()
    shifted.obs["array_col"] += table
    with pytest.raises(InputError, match="position table"):
        model.predict(shifted)  # measured data: strict unless the user opts in
    try:
        model.data_params["prediction_positions"] = "reindex"
        assert np.isfinite(model.predict(shifted)).all()
    finally:
        model.data_params["prediction_positions"] = "auto"


def test_a_trained_model_recovers_the_dependent_genes_on_a_new_slide(data, new_slide):
    training = data[data.obs["library_id"] != "S03"].copy()
    model = sthisto.tl.train(training, "ridge", n_components=16, progress=False)
    sthisto.pp.tissue_mask(new_slide)
    spots = sthisto.pp.tile(new_slide, spacing_um=100, diameter_um=55)
    predicted = sthisto.tl.predict(spots, model, key_added="ridge", copy=True)
    assert list(predicted.var_names) == list(data.var_names) and predicted.n_obs == spots.n_obs
    assert "spatial" in predicted.obsm and predicted.uns["spatial"]["new"]["images"]["fullres"] is not None
    assert predicted.uns["sthisto"]["predict"]["ridge"]["method"] == "ridge"
    assert "ridge" not in spots.obsm  # copy=True left the pseudo-spots as they were
    # In place (copy=False), var cannot grow: the same numbers land in obsm, one column per gene.
    assert sthisto.tl.predict(spots, model, key_added="ridge") is None
    table = spots.obsm["ridge"]
    assert list(table.columns) == list(model.genes) and list(table.index) == list(spots.obs_names)
    np.testing.assert_allclose(table.to_numpy(), np.asarray(predicted.X), rtol=1e-6)
    assert spots.uns["sthisto"]["predict"]["ridge"]["written_to"] == "obsm"
    # Ground truth: the generator's morphology term of each dependent gene at S03's measured spots.
    measured = data[data.obs["library_id"] == "S03"]
    from sthisto.datasets._synthetic import _standardise

    expected = _standardise(np.asarray(measured.obsm["synthetic_morphology"])) @ data.varm["synthetic_loadings"].T
    distance, nearest = cKDTree(predicted.obsm["spatial"]).query(measured.obsm["spatial"])
    close = distance < 50  # within half a spacing of a pseudo-spot
    dependent = np.flatnonzero(data.var["synthetic_dependent"].to_numpy())

    def mean_correlation(values):
        return np.nanmean([np.corrcoef(values[close, g], expected[close, g])[0, 1] for g in dependent])

    recovered = mean_correlation(predicted.X[nearest])
    shuffled = mean_correlation(predicted.X[np.random.default_rng(0).permutation(nearest)])
    assert recovered > 0.4 and recovered > shuffled + 0.3


def test_slide_map_draws_predictions_over_the_slide(data, new_slide, tmp_path):
    import matplotlib.pyplot as plt

    model = sthisto.tl.train(data, "ridge_tiny", progress=False, store=False)
    predicted = sthisto.tl.predict(sthisto.pp.tile(new_slide, spacing_um=100), model, copy=True)
    genes = list(predicted.var_names[:3])
    fig, axes = sthisto.pl.slide_map(predicted, genes, level="hires", save=tmp_path / "map.png", show=False)
    assert len(axes) == 3 and (tmp_path / "map.png").stat().st_size > 0
    fig2, ax = plt.subplots()
    _, drawn = sthisto.pl.slide_map(predicted, genes[0], level=1, ax=ax)
    assert drawn == [ax] and ax.images  # the pyramid level is drawn behind the spots
    with pytest.raises(InputError, match="one axes per gene"):
        sthisto.pl.slide_map(predicted, genes, ax=ax)
    plt.close("all")


DDP_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import numpy as np, torch, anndata as ad
torch.set_num_threads(1)
import sthisto
import test_slide_prediction  # registers the tiny section-wide method
adata = ad.read_h5ad({h5ad!r})
model = sthisto.tl.get_model(adata, "sw")
model.data_params["prediction_chunk_spots"] = 25
sthisto.tl.predict_distributed(adata, model, device="cpu", devices=2, strategy="ddp", key_added="ddp")
if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # every rank holds the gathered result; one writes it
    np.save({out!r}, adata.layers["ddp"])
    print(adata.uns["sthisto"]["predict"]["ddp"]["streaming"])
    print("process group open after the call:", torch.distributed.is_initialized())
"""


def test_distributed_prediction_on_two_cpu_processes_equals_single_process(data, section_model, tmp_path):
    adata = data.copy()
    sthisto.tl._train.store_model(adata, section_model, key_added="sw")
    adata.write_h5ad(tmp_path / "data.h5ad")
    script = tmp_path / "predict_ddp.py"
    script.write_text(
        textwrap.dedent(
            DDP_SCRIPT.format(
                tests=str(Path(__file__).parent), h5ad=str(tmp_path / "data.h5ad"), out=str(tmp_path / "ddp.npy")
            )
        )
    )
    # An earlier in-process predict_distributed (devices=1) leaves Lightning's MASTER_ADDR/MASTER_PORT
    # in os.environ; a child inheriting them would rendezvous on that port instead of a free one.
    distributed = ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(distributed)}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"world_size": 2' in done.stdout
    # The group Lightning opened is closed: left open, its threads abort the process at exit.
    assert "process group open after the call: False" in done.stdout
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: CPU reductions repeat bit for bit at equal thread counts
    try:
        section_model.data_params["prediction_chunk_spots"] = 25
        single = section_model.predict(data)
    finally:
        section_model.data_params["prediction_chunk_spots"] = None
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(np.load(tmp_path / "ddp.npy"), single)


def test_in_process_distributed_prediction_closes_its_process_group_and_matches_predict(data, section_model):
    adata = data.copy()
    sthisto.tl._train.store_model(adata, section_model, key_added="sw")
    assert not torch.distributed.is_initialized()
    sthisto.tl.predict_distributed(adata, "sw", device="cpu", devices=1, key_added="one_rank")
    assert not torch.distributed.is_initialized()  # a second call would otherwise join the stale group
    sthisto.tl.predict_distributed(adata, "sw", device="cpu", devices=1, key_added="again")
    np.testing.assert_allclose(adata.layers["again"], adata.layers["one_rank"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(adata.layers["one_rank"], section_model.predict(data), rtol=1e-5, atol=1e-6)
