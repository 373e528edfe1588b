"""sthisto.io.from_spatialdata / to_spatialdata: conversion, laziness, round trip, bad input."""

from __future__ import annotations

import copy
import threading

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sthisto
from sthisto._errors import InputError, MissingKeyError
from sthisto.pp._patches import PatchDataset, PatchSpec

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
spatialdata = pytest.importorskip("spatialdata")
from spatialdata.models import Image2DModel, ShapesModel, TableModel  # noqa: E402
from spatialdata.transformations import Identity, Scale, Translation  # noqa: E402
from spatialdata.transformations import Sequence as Chain  # noqa: E402


class BlockCounter:
    """Counts the image blocks dask computes, to prove nothing read the whole slide."""

    def __init__(self):
        self.blocks = 0
        self._lock = threading.Lock()

    def __call__(self, block):
        if block.size:  # dask probes the function with empty blocks to infer its output
            with self._lock:
                self.blocks += 1
        return block


def synthetic_section(n_side=6, pitch=40.0, margin=60, seed=0):
    """A small H&E-like image (pink disks on white glass) and counts at spot centres."""
    rng = np.random.default_rng(seed)
    size = int(2 * margin + (n_side - 1) * pitch)
    image = np.full((size, size + 20, 3), 245, dtype=np.uint8)
    grid = np.array([(i, j) for j in range(n_side) for i in range(n_side)])
    centres = margin + grid * pitch + 0.5
    yy, xx = np.mgrid[:size, : size + 20]
    for x, y in centres:
        disk = (xx - x) ** 2 + (yy - y) ** 2 < 15**2
        image[disk] = (180, 90, 160)
    counts = sp.csr_matrix(rng.poisson(3.0, size=(len(grid), 12)).astype(np.float32))
    obs = pd.DataFrame(
        {
            "library_id": pd.Categorical(["s1"] * len(grid)),
            "array_col": grid[:, 0],
            "array_row": grid[:, 1],
            "label": pd.Categorical(rng.choice(["tumour", "stroma"], len(grid))),
        },
        index=[f"spot{i}" for i in range(len(grid))],
    )
    adata = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(12)]))
    adata.obsm["spatial"] = centres
    adata.uns["spatial"] = {
        "s1": {
            "images": {"fullres": image},
            "scalefactors": {"microns_per_pixel": 2.5, "spot_diameter_fullres": 30.0, "spot_spacing_um": 100.0},
            "metadata": {"has_image": True, "source": "test"},
        }
    }
    return adata


def test_round_trip_synthetic():
    adata = synthetic_section()
    before = adata.copy()
    sdata = sthisto.io.to_spatialdata(adata)
    assert set(sdata.images) == {"s1_image"} and set(sdata.shapes) == {"s1_spots"}
    shapes = sdata.shapes["s1_spots"]
    np.testing.assert_allclose(shapes["radius"], 15.0)
    np.testing.assert_allclose(np.c_[shapes.geometry.x, shapes.geometry.y], adata.obsm["spatial"])

    back = sthisto.io.from_spatialdata(sdata)
    assert back.obs_names.equals(adata.obs_names)
    pd.testing.assert_frame_equal(back.obs, adata.obs)
    np.testing.assert_allclose(back.obsm["spatial"], adata.obsm["spatial"])
    np.testing.assert_array_equal(back.X.toarray(), adata.X.toarray())
    assert back.uns["spatial"]["s1"]["scalefactors"] == pytest.approx(adata.uns["spatial"]["s1"]["scalefactors"])
    fullres = back.uns["spatial"]["s1"]["images"]["fullres"]
    assert isinstance(fullres, da.Array) and fullres.shape == adata.uns["spatial"]["s1"]["images"]["fullres"].shape
    np.testing.assert_array_equal(fullres.compute(), adata.uns["spatial"]["s1"]["images"]["fullres"])
    # Patches agree whichever object they are cut from.
    spec = PatchSpec(size_px=24, size_um=60.0)
    original, _ = PatchDataset(adata, spec=spec).read_batch(range(adata.n_obs))
    converted, _ = PatchDataset(back, spec=spec).read_batch(range(back.n_obs))
    assert (original == converted).all()
    # The input object is left as it was.
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    assert adata.uns.keys() == before.uns.keys() and adata.obsm.keys() == before.obsm.keys()


def test_round_trip_through_zarr(tmp_path):
    """Expression-only library: shapes + table written to zarr and read back.

    (Image elements are left out: spatialdata 0.7.0 with ome-zarr 0.18 / zarr 3.1 fails to
    write any image in this environment, independently of sthisto.)
    """
    adata = synthetic_section()
    entry = adata.uns["spatial"]["s1"]
    del entry["images"]["fullres"]
    entry["metadata"]["has_image"] = False
    sdata = sthisto.io.to_spatialdata(adata)
    assert not sdata.images
    sdata.write(tmp_path / "s.zarr")
    back = sthisto.io.from_spatialdata(spatialdata.read_zarr(tmp_path / "s.zarr"))
    np.testing.assert_allclose(back.obsm["spatial"], adata.obsm["spatial"])
    np.testing.assert_array_equal(back.X.toarray(), adata.X.toarray())
    assert back.obs["label"].tolist() == adata.obs["label"].tolist()
    assert back.uns["spatial"]["s1"]["scalefactors"] == pytest.approx(entry["scalefactors"])
    assert back.uns["spatial"]["s1"]["metadata"]["has_image"] is False


def _lazy_sdata(counter, *, multiscale=False):
    """SpatialData with a chunked lazy image placed by a transformation (scale + shift)."""
    adata = synthetic_section()
    image = adata.uns["spatial"]["s1"]["images"]["fullres"]
    lazy = da.from_array(image, chunks=(64, 64, 3)).map_blocks(counter, dtype=np.uint8)
    element = Image2DModel.parse(
        lazy.transpose(2, 0, 1),
        dims=("c", "y", "x"),
        transformations={"global": Identity()},
        scale_factors=[2] if multiscale else None,
    )
    # Circles in micrometres: 2.5 µm per image pixel, origin shifted by 100 µm.
    micrometres = adata.obsm["spatial"] * 2.5 + 100.0
    shapes = ShapesModel.parse(
        micrometres,
        geometry=0,
        radius=np.full(adata.n_obs, 15.0 * 2.5),
        index=pd.RangeIndex(adata.n_obs),
        transformations={
            "global": Chain([Translation([-100.0, -100.0], axes=("x", "y")), Scale([0.4, 0.4], axes=("x", "y"))])
        },
    )
    table = adata.copy()
    del table.uns["spatial"]
    table.obs["region"] = pd.Categorical(["spots"] * adata.n_obs)
    table.obs["cell"] = np.arange(adata.n_obs)
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="cell")
    sdata = spatialdata.SpatialData(images={"he": element}, shapes={"spots": shapes}, tables={"table": table})
    return sdata, adata


@pytest.mark.parametrize("multiscale", [False, True])
def test_from_spatialdata_keeps_the_image_lazy_and_places_spots(multiscale):
    counter = BlockCounter()
    sdata, adata = _lazy_sdata(counter, multiscale=multiscale)
    assert counter.blocks == 0
    with pytest.raises(MissingKeyError, match="microns_per_pixel="):
        sthisto.io.from_spatialdata(sdata)
    back = sthisto.io.from_spatialdata(sdata, microns_per_pixel=2.5, spot_spacing_um=100.0)
    assert counter.blocks == 0  # nothing computed
    fullres = back.uns["spatial"]["s1"]["images"]["fullres"]
    assert isinstance(fullres, da.Array) and fullres.shape == (
        *adata.uns["spatial"]["s1"]["images"]["fullres"].shape[:2],
        3,
    )
    np.testing.assert_allclose(back.obsm["spatial"], adata.obsm["spatial"], atol=1e-9)
    scalefactors = back.uns["spatial"]["s1"]["scalefactors"]
    assert scalefactors["spot_diameter_fullres"] == pytest.approx(30.0)
    assert scalefactors["microns_per_pixel"] == 2.5 and scalefactors["spot_spacing_um"] == 100.0
    assert "region" not in back.obs and "cell" not in back.obs
    # One patch reads only the blocks it overlaps.
    PatchDataset(back, spec=PatchSpec(size_px=16, size_um=40.0)).read_batch([0])
    source_blocks = 5 * 6  # 320 × 340 px in 64-px chunks
    assert 0 < counter.blocks < source_blocks
    if not multiscale:  # (the pyramid builder merges level-0 chunks)
        assert counter.blocks <= 4


@pytest.mark.real_data
def test_spatialdata_io_visium_reader_output(visium_dir):
    spatialdata_io = pytest.importorskip("spatialdata_io")
    folder = visium_dir / "spaceranger-1.0.0"
    sdata = spatialdata_io.visium(folder, dataset_id="heart", counts_file="filtered_feature_bc_matrix.h5")
    reference = sthisto.io.read_visium(folder, library_id="heart")
    hires_scale = reference.uns["spatial"]["heart"]["scalefactors"]["tissue_hires_scalef"]
    fullres_mpp = reference.uns["spatial"]["heart"]["scalefactors"]["microns_per_pixel"]
    with pytest.raises(MissingKeyError, match="microns_per_pixel"):
        sthisto.io.from_spatialdata(sdata)
    back = sthisto.io.from_spatialdata(sdata, microns_per_pixel=fullres_mpp / hires_scale, spot_spacing_um=100)
    # No full-resolution image in outs/: the largest image (hires) is the pixel frame.
    entry = back.uns["spatial"]["heart"]
    assert entry["images"]["fullres"].shape == (2000, 2000, 3)
    assert entry["images"]["lowres"].shape == (600, 600, 3)
    reference = reference[back.obs_names]
    np.testing.assert_allclose(back.obsm["spatial"], reference.obsm["spatial"] * hires_scale, rtol=1e-6)
    diameter = reference.uns["spatial"]["heart"]["scalefactors"]["spot_diameter_fullres"]
    assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(diameter * hires_scale)
    lowres_scale = reference.uns["spatial"]["heart"]["scalefactors"]["tissue_lowres_scalef"]
    assert entry["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(lowres_scale / hires_scale, rel=1e-5)
    np.testing.assert_array_equal(back.X.toarray(), reference.X.toarray())


@pytest.mark.real_data
def test_her2st_round_trip_keeps_the_jpeg_unread(her2st_dir):
    from sthisto import _images

    adata = sthisto.io.read_her2st(her2st_dir, sections=["C2", "C1"])
    before = copy.deepcopy(adata.uns["spatial"]["C2"]["scalefactors"])
    _images._decode_file.cache_clear()
    sdata = sthisto.io.to_spatialdata(adata)
    back = sthisto.io.from_spatialdata(sdata)
    assert _images._decode_file.cache_info().misses == 0  # the 9,000-px JPEG was never decoded
    from spatialdata import get_pyramid_levels

    assert get_pyramid_levels(sdata.images["C2_image"], n=0).shape == (3, 9911, 9274)  # chunked multiscale
    assert back.obs_names.equals(adata.obs_names)
    pd.testing.assert_frame_equal(back.obs, adata.obs)
    np.testing.assert_array_equal(back.obsm["spatial"], adata.obsm["spatial"])
    assert (back.X != adata.X).nnz == 0
    for lib in ("C1", "C2"):
        assert back.uns["spatial"][lib]["scalefactors"] == pytest.approx(adata.uns["spatial"][lib]["scalefactors"])
    assert back.uns["spatial"]["C1"]["metadata"]["has_image"] is False
    assert back.uns["spatial"]["C1"]["images"] == {}
    np.testing.assert_array_equal(
        back.uns["spatial"]["C2"]["images"]["hires"], adata.uns["spatial"]["C2"]["images"]["hires"]
    )
    assert adata.uns["spatial"]["C2"]["scalefactors"] == before
    # Records: the reader's travels with the table; the conversion's lands only on the result.
    assert set(back.uns["sthisto"]["io"]) == {"read_her2st", "from_spatialdata"}
    assert set(adata.uns["sthisto"]["io"]) == {"read_her2st"}
    assert set(sdata.tables["table"].uns["sthisto"]["io"]) == {"read_her2st"}
    assert back.uns["sthisto"]["io"]["from_spatialdata"]["image_key"] == {"C2": "C2_image", "C1": ""}


def _snapshot(sdata):
    table = sdata.tables["table"]
    return (
        sorted(sdata.images),
        sorted(sdata.shapes),
        sorted(sdata.tables),
        table.obs.copy(),
        copy.deepcopy(dict(table.uns["spatialdata_attrs"])) if "spatialdata_attrs" in table.uns else None,
    )


def _same(a, b):
    assert a[:3] == b[:3]
    pd.testing.assert_frame_equal(a[3], b[3])
    assert a[4] == b[4]


def test_missing_elements_are_listed():
    sdata, _ = _lazy_sdata(BlockCounter())
    before = _snapshot(sdata)
    with pytest.raises(MissingKeyError, match=r"no table 'expression'; its tables are \['table'\]"):
        sthisto.io.from_spatialdata(sdata, table_key="expression")
    with pytest.raises(MissingKeyError, match=r"no image 'hne'; its images are \['he'\]"):
        sthisto.io.from_spatialdata(sdata, image_key="hne", microns_per_pixel=2.5)
    with pytest.raises(MissingKeyError, match=r"no shapes element 'cells'; its shapes are \['spots'\]"):
        sthisto.io.from_spatialdata(sdata, shapes_key="cells", microns_per_pixel=2.5)
    with pytest.raises(InputError, match="expects a spatialdata.SpatialData"):
        sthisto.io.from_spatialdata(synthetic_section())
    _same(before, _snapshot(sdata))


def test_table_not_annotating_the_shapes():
    sdata, _ = _lazy_sdata(BlockCounter())
    # A second shapes element the table does not annotate.
    sdata.shapes["other"] = ShapesModel.parse(
        np.array([[10.0, 10.0]]), geometry=0, radius=np.array([5.0]), transformations={"global": Identity()}
    )
    before = _snapshot(sdata)
    with pytest.raises(InputError, match=r"does not annotate shapes 'other'; it annotates \['spots'\]"):
        sthisto.io.from_spatialdata(sdata, shapes_key="other", microns_per_pixel=2.5)
    _same(before, _snapshot(sdata))

    # A table annotating an element that is not a shapes element.
    table = sdata.tables["table"].copy()
    table.obs["region"] = pd.Categorical(["he"] * table.n_obs)
    table.uns["spatialdata_attrs"] = {"region": "he", "region_key": "region", "instance_key": "cell"}
    sdata.tables["table"] = table
    before = _snapshot(sdata)
    with pytest.raises(InputError, match=r"annotates \['he'\], none of which is a shapes element"):
        sthisto.io.from_spatialdata(sdata, microns_per_pixel=2.5)
    _same(before, _snapshot(sdata))

    # A table that annotates nothing.
    plain = synthetic_section()
    del plain.uns["spatial"]
    unlinked = spatialdata.SpatialData(images={"he": sdata.images["he"]}, tables={"table": plain})
    with pytest.raises(InputError, match="annotates no element.*TableModel.parse"):
        sthisto.io.from_spatialdata(unlinked)


def test_instances_missing_from_shapes():
    sdata, _ = _lazy_sdata(BlockCounter())
    table = sdata.tables["table"]
    table.obs["cell"] = table.obs["cell"] + 1000
    with pytest.raises(InputError, match="point to instances absent from shapes 'spots'"):
        sthisto.io.from_spatialdata(sdata, microns_per_pixel=2.5)


def test_to_spatialdata_refuses_bad_input_and_leaves_it_unchanged():
    adata = synthetic_section()
    adata.obs["region"] = "x"
    before = adata.obs.copy()
    with pytest.raises(InputError, match=r"already has column\(s\) \['region'\].*region_key="):
        sthisto.io.to_spatialdata(adata)
    pd.testing.assert_frame_equal(adata.obs, before)
    sdata = sthisto.io.to_spatialdata(adata, region_key="shapes_name")
    assert "shapes_name" in sdata.tables["table"].obs and "shapes_name" not in adata.obs

    adata = synthetic_section()
    del adata.uns["spatial"]["s1"]["scalefactors"]["spot_diameter_fullres"]
    with pytest.raises(MissingKeyError, match="spot_diameter_fullres"):
        sthisto.io.to_spatialdata(adata)
    with pytest.raises(MissingKeyError, match=r"\['s9'\] have no spots"):
        sthisto.io.to_spatialdata(synthetic_section(), library_ids=["s9"])
