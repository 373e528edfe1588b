"""sthisto.pp.tissue_mask and sthisto.pp.tile on a synthetic whole slide written as a pyramidal TIFF."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
from scipy.spatial import cKDTree

import sthisto
from sthisto._errors import InputError, KeyExistsError
from sthisto.datasets import synthetic_he_image
from sthisto.io._image import _write_pyramidal_tiff
from sthisto.pp._tile import footprint_fraction, lattice

SHAPE = (1000, 1200)
MPP = 2.0
TISSUE = {"seed": 11, "tissue_center_um": (1000.0, 1150.0), "tissue_radius_um": 700.0}
GLASS = 255


def draw(origin, shape, mpp):
    return synthetic_he_image(shape, origin=origin, microns_per_pixel=mpp, **TISSUE)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = _write_pyramidal_tiff(tmp_path_factory.mktemp("slide") / "wsi.ome.tif", SHAPE, draw, microns_per_pixel=MPP)
    _, labels = synthetic_he_image(SHAPE, microns_per_pixel=MPP, return_labels=True, **TISSUE)
    return {"path": path, "labels": labels}


@pytest.fixture
def masked(slide):
    adata = sthisto.io.read_image(slide["path"], library_id="wsi")
    sthisto.pp.tissue_mask(adata)
    return adata


def test_tissue_mask_matches_the_drawn_tissue(slide, masked):
    entry = masked.uns["spatial"]["wsi"]
    mask = entry["images"]["tissue_mask"]
    scale = entry["scalefactors"]["tissue_tissue_mask_scalef"]
    assert mask.dtype == bool and mask.ndim == 2 and mask.shape[1] == pytest.approx(SHAPE[1] * scale, abs=1)
    # Ground truth sampled at the mask's pixel centres; white fat looks like glass at low resolution.
    ys = np.minimum(((np.arange(mask.shape[0]) + 0.5) / scale).astype(int), SHAPE[0] - 1)
    xs = np.minimum(((np.arange(mask.shape[1]) + 0.5) / scale).astype(int), SHAPE[1] - 1)
    labels = slide["labels"][np.ix_(ys, xs)]
    stained = (labels != GLASS) & (labels != 3)
    assert mask[stained].mean() > 0.95
    assert mask[labels == GLASS].mean() < 0.02
    record = masked.uns["sthisto"]["tissue_mask"]["tissue_mask"]
    assert record["method"] == "otsu" and 0 < record["libraries"]["wsi"]["tissue_fraction"] < 1
    before = copy.deepcopy(mask)
    with pytest.raises(KeyExistsError, match="overwrite=True"):
        sthisto.pp.tissue_mask(masked, method="od")
    np.testing.assert_array_equal(masked.uns["spatial"]["wsi"]["images"]["tissue_mask"], before)
    sthisto.pp.tissue_mask(masked, method="od", key_added="od_mask")
    od = masked.uns["spatial"]["wsi"]["images"]["od_mask"]
    assert (od == mask).mean() > 0.95


def test_hex_tiling_covers_the_tissue_and_not_the_glass(slide, masked):
    spots = sthisto.pp.tile(masked, spacing_um=100, diameter_um=55, grid="hex")
    assert spots.n_vars == 0 and spots.n_obs > 50
    assert masked.n_obs == 0  # the input is untouched
    xy = spots.obsm["spatial"]
    assert (xy >= 0).all() and (xy[:, 0] < SHAPE[1]).all() and (xy[:, 1] < SHAPE[0]).all()
    labels = slide["labels"]
    # Every pseudo-spot sits on tissue ...
    on_tissue = labels[xy[:, 1].astype(int), xy[:, 0].astype(int)] != GLASS
    assert on_tissue.mean() > 0.97
    # ... and every grid position whose footprint is (non-fat) tissue in the drawing got one.
    rows, cols, centres = lattice(*SHAPE, 100 / MPP, "hex")
    stained = (labels != GLASS) & (labels != 3)
    truth = footprint_fraction(stained, 1.0, centres, 55 / MPP / 2)
    expected = centres[truth >= 0.99]
    distance, _ = cKDTree(xy).query(expected)
    assert (distance < 1e-6).mean() > 0.97
    glass = centres[footprint_fraction(labels == GLASS, 1.0, centres, 55 / MPP / 2) >= 0.99]
    distance, _ = cKDTree(xy).query(glass)
    assert (distance > 1e-6).all()


def test_hex_grid_follows_the_visium_convention(masked):
    spots = sthisto.pp.tile(masked, spacing_um=100, diameter_um=55, grid="hex")
    obs = spots.obs
    assert obs["array_row"].dtype == np.int64 and obs["array_col"].min() >= 0 and obs["array_row"].min() == 0
    assert ((obs["array_row"] + obs["array_col"]) % 2 == 0).all()
    assert set(obs["spot_id"]) == {f"{c}x{r}" for r, c in zip(obs["array_row"], obs["array_col"], strict=True)}
    xy = spots.obsm["spatial"]
    tree = cKDTree(xy)
    distance, _ = tree.query(xy, k=2)
    assert distance[:, 1].min() == pytest.approx(50.0) and np.median(distance[:, 1]) == pytest.approx(50.0)
    neighbours = np.array([len(n) - 1 for n in tree.query_ball_point(xy, r=50.5)])
    assert neighbours.max() == 6
    # Grid units: array_col counts half spacings along x, array_row counts rows √3/2 apart.
    slope_x = np.polyfit(obs["array_col"], xy[:, 0], 1)[0]
    slope_y = np.polyfit(obs["array_row"], xy[:, 1], 1)[0]
    assert slope_x == pytest.approx(25.0) and slope_y == pytest.approx(50 * np.sqrt(3) / 2)
    entry = spots.uns["spatial"]["wsi"]
    assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(27.5)
    assert entry["scalefactors"]["spot_spacing_um"] == 100.0
    assert entry["metadata"]["pseudo_spots"] == "tile"
    source_images = masked.uns["spatial"]["wsi"]["images"]
    assert entry["images"]["fullres"] is source_images["fullres"]  # shared, not copied
    assert spots.uns["sthisto"]["tile"]["tile"]["libraries"]["wsi"]["n_spots"] == spots.n_obs
    own = sthisto.pp.tile(masked, spacing_um=100, copy_images=True)
    assert own.uns["spatial"]["wsi"]["images"]["hires"] is not source_images["hires"]
    with pytest.warns(FutureWarning, match="copy_images="):  # the old spelling, for one release
        old = sthisto.pp.tile(masked, spacing_um=100, copy=True)
    assert old.uns["spatial"]["wsi"]["images"]["hires"] is not source_images["hires"]
    # The slide's provenance travels with its pseudo-spots; re-tiling them needs a new key.
    assert {"read_image", "tissue_mask", "tile"} <= set(spots.uns["sthisto"])
    with pytest.raises(KeyExistsError, match="key_added"):
        sthisto.pp.tile(spots, spacing_um=200)
    again = sthisto.pp.tile(spots, spacing_um=200, key_added="coarse")
    assert set(again.uns["sthisto"]["tile"]) == {"tile", "coarse"}


def test_square_grid_and_whole_image(masked):
    square = sthisto.pp.tile(masked, spacing_um=200, diameter_um=100, grid="square")
    xy = square.obsm["spatial"]
    distance, _ = cKDTree(xy).query(xy, k=2)
    assert distance[:, 1].min() == pytest.approx(100.0) and np.median(distance[:, 1]) == pytest.approx(100.0)
    assert np.polyfit(square.obs["array_col"], xy[:, 0], 1)[0] == pytest.approx(100.0)
    everything = sthisto.pp.tile(masked, spacing_um=200, diameter_um=100, grid="square", tissue_only=False)
    assert everything.n_obs == len(lattice(*SHAPE, 100.0, "square")[0]) > square.n_obs
    sdata = sthisto.pp.tile(masked, spacing_um=200, diameter_um=100, grid="square", as_spatialdata=True)
    assert len(sdata.shapes["wsi_spots"]) == square.n_obs
    assert sdata.shapes["wsi_spots"]["radius"].iloc[0] == pytest.approx(25.0)


def test_tiling_a_measured_section_without_a_mask():
    adata = sthisto.datasets.synthetic(n_sections=1, n_spots=40, n_genes=4, geometry="visium", seed=2)
    spots = sthisto.pp.tile(adata, spacing_um=100, diameter_um=55)  # detects tissue on the fly
    assert "tissue_mask" not in adata.uns["spatial"]["S01"]["images"]
    assert spots.n_obs > 0.6 * adata.n_obs
    assert spots.obs["library_id"].astype(str).eq("S01").all()


def test_a_slide_without_tissue_is_a_clear_error(tmp_path, caplog):
    blank = _write_pyramidal_tiff(
        tmp_path / "blank.tif", (300, 400), lambda o, s, m: np.full((*s, 3), 246, np.uint8), microns_per_pixel=1.0
    )
    adata = sthisto.io.read_image(blank)
    with caplog.at_level(logging.WARNING, logger="sthisto"):
        sthisto.pp.tissue_mask(adata)
    assert "no tissue found" in caplog.text
    assert not adata.uns["spatial"]["blank"]["images"]["tissue_mask"].any()
    with pytest.raises(InputError, match="no tissue found"):
        sthisto.pp.tile(adata)
    fresh = sthisto.io.read_image(blank)
    with pytest.raises(InputError, match="no tissue found"):
        sthisto.pp.tile(fresh)
    assert set(fresh.uns["spatial"]["blank"]["images"]) == {"fullres", "hires", "lowres"}


def test_bad_arguments_are_refused(masked):
    with pytest.raises(InputError, match="grid="):
        sthisto.pp.tile(masked, grid="triangle")
    with pytest.raises(InputError, match="spacing_um"):
        sthisto.pp.tile(masked, spacing_um=0)
    with pytest.raises(InputError, match="min_tissue_fraction"):
        sthisto.pp.tile(masked, min_tissue_fraction=2)
    with pytest.raises(InputError, match="method="):
        sthisto.pp.tissue_mask(masked, method="magic", key_added="m2")
