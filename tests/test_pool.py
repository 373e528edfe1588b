"""sthisto.pp.pool: Visium-HD-like bins and Xenium-like transcripts summed into pseudo-spots."""

from __future__ import annotations

import numpy as np
import pytest

import sthisto
from sthisto._errors import InputError, MissingKeyError


def _brute_force(points_px, centres_px, size_px, grid):
    """Membership of each point in each footprint, by direct geometry (no lattice code)."""
    offset = points_px[None, :, :] - centres_px[:, None, :]
    if grid == "hex":
        return (offset**2).sum(axis=-1) <= (size_px / 2) ** 2
    return (np.abs(offset) <= size_px / 2).all(axis=-1)


@pytest.mark.parametrize(("grid", "size_um"), [("hex", 55.0), ("square", 100.0)])
def test_pooled_bins_equal_the_sum_of_bins_in_each_footprint(grid, size_um):
    bins = sthisto.datasets.synthetic_bins(extent_um=420, bin_um=8, n_genes=6, seed=1)
    before = bins.X.copy()
    spots = sthisto.pp.pool(bins, size_um=size_um, grid=grid)
    np.testing.assert_array_equal(bins.X.toarray(), before.toarray())  # input untouched
    mpp = bins.uns["spatial"]["HD01"]["scalefactors"]["microns_per_pixel"]
    member = _brute_force(bins.obsm["spatial"], spots.obsm["spatial"], size_um / mpp, grid)
    assert (member.sum(axis=0) <= 1).all()  # no bin in two footprints
    np.testing.assert_array_equal(spots.X.toarray(), member.astype(np.float32) @ bins.X.toarray())
    np.testing.assert_array_equal(spots.obs["n_bins"].to_numpy(), member.sum(axis=1))
    assert spots.n_obs > 4 and (spots.obs["n_bins"] >= 1).all()
    area = np.pi * size_um**2 / 4 if grid == "hex" else size_um**2
    np.testing.assert_allclose(spots.obs["area_covered"], spots.obs["n_bins"] * 64 / area)
    if grid == "square":
        # Contiguous squares of 100 µm hold 12 × 12 bins of 8 µm whole, or 13 where edges align.
        # (Squares cut by the edge of the capture area hold fewer, and say so in area_covered.)
        centre_um = spots.obsm["spatial"] * mpp
        whole = ((centre_um >= 50) & (centre_um <= 416 - 50)).all(axis=1)
        assert whole.sum() >= 4
        assert set(spots.obs["n_bins"][whole]) <= {144, 156, 169}
        assert (spots.obs["area_covered"][~whole] < 0.95).all()
    else:
        # Visium convention: array_row + array_col even, neighbours 100 µm apart.
        assert ((spots.obs["array_row"] + spots.obs["array_col"]) % 2 == 0).all()
        from scipy.spatial import cKDTree

        distance, _ = cKDTree(spots.obsm["spatial"]).query(spots.obsm["spatial"], k=2)
        np.testing.assert_allclose(np.median(distance[:, 1]) * mpp, 100.0)
    sf = spots.uns["spatial"]["HD01"]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(size_um / mpp)
    assert spots.uns["spatial"]["HD01"]["metadata"]["pseudo_spots"] == "pool"
    record = spots.uns["sthisto"]["pool"]["pool"]
    assert record["libraries"]["HD01"]["n_inputs"] == bins.n_obs
    assert record["libraries"]["HD01"]["n_pooled"] == int(member.sum())


def test_pooled_transcripts_count_molecules_per_gene():
    molecules = sthisto.datasets.synthetic_transcripts(extent_um=300, n_genes=5, density=0.02, seed=2)
    spots = sthisto.pp.pool(molecules, size_um=55, grid="hex", library_id="X1")
    assert list(spots.var_names) == list(molecules["feature_name"].cat.categories)
    xy = molecules[["x_location", "y_location"]].to_numpy()
    member = _brute_force(xy, spots.obsm["spatial"], 55.0, "hex")  # 1 µm per "pixel" without image
    onehot = np.eye(5)[molecules["feature_name"].cat.codes.to_numpy()]
    np.testing.assert_array_equal(spots.X.toarray(), member.astype(float) @ onehot)
    assert spots.obs["n_bins"].sum() == member.sum()
    assert spots.obs["area_covered"].isna().all()
    assert spots.uns["spatial"]["X1"]["metadata"]["has_image"] is False


def test_pooled_transcripts_on_an_image_train_and_predict():
    """Pixels of a registered image: pseudo-spots carry it, and a method trains on them."""
    molecules = sthisto.datasets.synthetic_transcripts(extent_um=400, n_genes=4, density=0.05, seed=3)
    image = sthisto.datasets.synthetic_he_image((200, 200), microns_per_pixel=2.0, seed=3)
    spots = sthisto.pp.pool(molecules, size_um=55, grid="hex", microns_per_pixel=2.0, image=image)
    assert spots.obsm["spatial"].max() < 200
    model = sthisto.tl.train(spots, "ridge", genes=list(spots.var_names), device="cpu", n_components=4)
    predicted = sthisto.tl.predict(spots, model, key_added="ridge_pool")
    assert predicted is None and spots.layers["ridge_pool"].shape == spots.shape


def test_pool_refuses_bad_geometry():
    bins = sthisto.datasets.synthetic_bins(extent_um=120, bin_um=8, n_genes=2)
    with pytest.raises(InputError, match="overlap"):
        sthisto.pp.pool(bins, size_um=55, spacing_um=50)
    with pytest.raises(InputError, match="grid="):
        sthisto.pp.pool(bins, grid="triangle")
    with pytest.raises(InputError, match="too coarse"):
        sthisto.pp.pool(bins, size_um=10)
    molecules = sthisto.datasets.synthetic_transcripts(extent_um=100, n_genes=2)
    with pytest.raises(InputError, match="he_x"):
        sthisto.pp.pool(molecules, x_key="he_x")


@pytest.mark.real_data
def test_pool_real_visium_hd_bins(visium_dir):
    """Space Ranger's 2 µm bins (VisiumIO fixture) pooled to 55 µm spots keep every count inside."""
    bins = sthisto.io.read_visium(visium_dir / "visiumio" / "binned_outputs" / "square_002um")
    spots = sthisto.pp.pool(bins, size_um=55, grid="hex")
    mpp = next(iter(bins.uns["spatial"].values()))["scalefactors"]["microns_per_pixel"]
    member = _brute_force(np.asarray(bins.obsm["spatial"]), spots.obsm["spatial"], 55 / mpp, "hex")
    np.testing.assert_allclose(spots.X.sum(), float((member.astype(np.float32) @ bins.X).sum()))
    np.testing.assert_array_equal(spots.obs["n_bins"].to_numpy(), member.sum(axis=1))


def test_pool_reads_transcripts_and_bins_from_spatialdata():
    spatialdata = pytest.importorskip("spatialdata")
    from spatialdata.models import PointsModel

    molecules = sthisto.datasets.synthetic_transcripts(extent_um=200, n_genes=3, density=0.02, seed=4)
    sdata = spatialdata.SpatialData(
        points={"transcripts": PointsModel.parse(molecules, coordinates={"x": "x_location", "y": "y_location"})}
    )
    from_sdata = sthisto.pp.pool(sdata, size_um=55, library_id="X1")
    from_frame = sthisto.pp.pool(molecules, size_um=55, library_id="X1")
    assert sorted(from_sdata.var_names) == sorted(from_frame.var_names)
    genes = list(from_frame.var_names)
    np.testing.assert_array_equal(from_sdata[:, genes].X.toarray(), from_frame.X.toarray())
    np.testing.assert_array_equal(from_sdata.obsm["spatial"], from_frame.obsm["spatial"])
    bins = sthisto.datasets.synthetic_bins(extent_um=200, bin_um=8, n_genes=3)
    from_table = sthisto.pp.pool(sthisto.io.to_spatialdata(bins), table_key="table")
    np.testing.assert_array_equal(from_table.X.toarray(), sthisto.pp.pool(bins).X.toarray())
    with pytest.raises(MissingKeyError, match="has no 'cells'"):
        sthisto.pp.pool(sdata, points_key="cells")
    with pytest.raises(InputError, match="SpatialData input only"):
        sthisto.pp.pool(molecules, points_key="transcripts")
