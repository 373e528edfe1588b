"""sthisto.io.read_visium on Space Ranger 1.x, 2.x-style and Visium HD outputs."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

import sthisto
from sthisto._errors import InputError, MissingKeyError
from sthisto.pp._patches import PatchDataset, PatchSpec

pytestmark = pytest.mark.real_data

COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _positions_v1(folder) -> pd.DataFrame:
    table = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None, names=COLUMNS)
    return table.set_index("barcode")


def _check_against_positions(adata, positions, library_id):
    positions = positions.loc[adata.obs_names]
    np.testing.assert_array_equal(
        adata.obsm["spatial"], positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    )
    np.testing.assert_array_equal(adata.obs["array_row"], positions["array_row"])
    np.testing.assert_array_equal(adata.obs["array_col"], positions["array_col"])
    np.testing.assert_array_equal(adata.obs["in_tissue"], positions["in_tissue"])
    assert adata.obs["library_id"].astype(str).unique().tolist() == [library_id]
    assert adata.obs["spot_id"].tolist() == adata.obs_names.tolist()


def _spots_land_inside(adata, library_id, key):
    entry = adata.uns["spatial"][library_id]
    image = entry["images"][key]
    xy = adata.obsm["spatial"] * entry["scalefactors"][f"tissue_{key}_scalef"]
    assert (xy >= 0).all() and (xy[:, 0] < image.shape[1]).all() and (xy[:, 1] < image.shape[0]).all()
    return image, np.rint(xy).astype(int)


def test_spaceranger_1x(visium_dir):
    folder = visium_dir / "spaceranger-1.0.0"
    adata = sthisto.io.read_visium(folder, library_id="heart")
    assert adata.shape == (100, 100)
    assert adata.X.dtype == np.float32 and "gene_ids" in adata.var
    _check_against_positions(adata, _positions_v1(folder), "heart")
    factors = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    entry = adata.uns["spatial"]["heart"]
    scalefactors = entry["scalefactors"]
    for key, value in factors.items():
        assert scalefactors[key] == pytest.approx(value)
    # µm/px from the 100 µm pitch (median nearest-neighbour distance of all positions; the fixture's
    # pixels are whole numbers, hence 1%), and Space Ranger's diameter is that of a 65 µm spot.
    xy = _positions_v1(folder)[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=float)
    pitch_px = np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])
    mpp = scalefactors["microns_per_pixel"]
    assert mpp == pytest.approx(100.0 / pitch_px, rel=0.01)
    assert mpp == pytest.approx(0.7252, abs=1e-4)  # not 55 / spot_diameter_fullres = 0.615
    assert factors["spot_diameter_fullres"] * mpp == pytest.approx(65.0, rel=0.01)
    assert adata.uns["sthisto"]["io"]["read_visium"]["microns_per_pixel_source"].startswith("spot grid")
    assert scalefactors["spot_spacing_um"] == 100
    assert entry["metadata"] == {"has_image": True, "source": "spaceranger"}
    for key, side in (("hires", 2000), ("lowres", 600)):
        image = entry["images"][key]
        assert image.shape == (side, side, 3) and image.dtype == np.uint8  # RGBA hires → RGB
    # The low-res image is a real section: spots (all in tissue here) are darker than the glass.
    lowres, xy = _spots_land_inside(adata, "heart", "lowres")
    _spots_land_inside(adata, "heart", "hires")
    assert lowres[xy[:, 1], xy[:, 0]].mean() < lowres[:40, :40].mean() - 15
    assert adata.uns["sthisto"]["io"]["read_visium"]["positions_file"] == "tissue_positions_list.csv"


def _as_spaceranger_2(source, target):
    """Space Ranger ≥ 2.0 layout: tissue_positions.csv with a header, same content."""
    (target / "spatial").mkdir(parents=True)
    shutil.copy(source / "filtered_feature_bc_matrix.h5", target)
    for name in ("scalefactors_json.json", "tissue_hires_image.png", "tissue_lowres_image.png"):
        shutil.copy(source / "spatial" / name, target / "spatial" / name)
    _positions_v1(source).reset_index().to_csv(target / "spatial" / "tissue_positions.csv", index=False)
    return target


def test_spaceranger_2x_layout_gives_the_same_object(visium_dir, tmp_path):
    source = visium_dir / "spaceranger-1.0.0"
    folder = _as_spaceranger_2(source, tmp_path / "sample" / "outs")
    v2 = sthisto.io.read_visium(folder)
    assert v2.obs["library_id"].cat.categories.tolist() == ["sample"]  # outs/ → its parent's name
    v1 = sthisto.io.read_visium(source, library_id="sample")
    _check_against_positions(v2, _positions_v1(source), "sample")
    np.testing.assert_array_equal(v2.X.toarray(), v1.X.toarray())
    assert v2.uns["spatial"]["sample"]["scalefactors"] == v1.uns["spatial"]["sample"]["scalefactors"]
    assert v2.uns["sthisto"]["io"]["read_visium"]["positions_file"] == "tissue_positions.csv"


def test_visium_h5_and_matrix_folder(visium_dir):
    """The fixture's h5 and matrix folder are different random subsets: check each on its own."""
    import scanpy as sc
    import scipy.io

    folder = visium_dir / "visiumio" / "10xVisium" / "section1" / "outs"
    from_h5 = sthisto.io.read_visium(folder, counts_file="raw_feature_bc_matrix.h5")
    assert from_h5.obs["library_id"].cat.categories.tolist() == ["section1"]
    _check_against_positions(from_h5, _positions_v1(folder), "section1")
    reference = sc.read_10x_h5(folder / "raw_feature_bc_matrix.h5")
    np.testing.assert_array_equal(from_h5.X.toarray(), reference[from_h5.obs_names].X.toarray())
    assert set(from_h5.obs["in_tissue"]) == {0, 1}
    _spots_land_inside(from_h5, "section1", "lowres")

    # Uncompressed v3 matrix folder (scanpy's reader insists on .gz files).
    from_mtx = sthisto.io.read_visium(folder, counts_file="raw_feature_bc_matrix")
    matrix = scipy.io.mmread(folder / "raw_feature_bc_matrix" / "matrix.mtx").toarray().T  # genes × barcodes
    features = pd.read_csv(folder / "raw_feature_bc_matrix" / "features.tsv", sep="\t", header=None)
    barcodes = pd.read_csv(folder / "raw_feature_bc_matrix" / "barcodes.tsv", sep="\t", header=None)[0]
    rows = barcodes.reset_index().set_index(0).loc[from_mtx.obs_names, "index"].to_numpy()
    np.testing.assert_array_equal(from_mtx.X.toarray(), matrix[rows])
    assert from_mtx.var_names.tolist() == features[1].tolist()
    assert from_mtx.var["gene_ids"].tolist() == features[0].tolist()
    _check_against_positions(from_mtx, _positions_v1(folder), "section1")


def test_barcodes_without_position_are_dropped_with_a_warning(visium_dir, caplog):
    folder = visium_dir / "visiumio" / "10xVisium" / "section2" / "outs"
    with caplog.at_level(logging.WARNING, logger="sthisto"):
        adata = sthisto.io.read_visium(folder, counts_file="raw_feature_bc_matrix.h5")
    assert adata.n_obs == 49  # the fixture's matrix has one barcode its positions file lacks
    assert any("1 of 50 barcodes" in r.getMessage() for r in caplog.records)
    _check_against_positions(adata, _positions_v1(folder), "section2")


def test_visium_hd_bins(visium_dir):
    folder = visium_dir / "visiumio" / "binned_outputs" / "square_002um"
    adata = sthisto.io.read_visium(folder)
    positions = pd.read_parquet(folder / "spatial" / "tissue_positions.parquet").set_index("barcode")
    _check_against_positions(adata, positions, "visiumio_square_002um")
    factors = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    scalefactors = adata.uns["spatial"]["visiumio_square_002um"]["scalefactors"]
    assert scalefactors["microns_per_pixel"] == pytest.approx(factors["microns_per_pixel"])
    assert scalefactors["spot_spacing_um"] == 2.0
    # The bin side in pixels is the bin size over the pixel size.
    assert scalefactors["spot_diameter_fullres"] == pytest.approx(2.0 / factors["microns_per_pixel"], rel=1e-6)
    assert adata.uns["spatial"]["visiumio_square_002um"]["metadata"]["source"] == "spaceranger-hd"
    _spots_land_inside(adata, "visiumio_square_002um", "lowres")

    # From the folder holding binned_outputs/: the only bin size is chosen, or the one asked.
    same = sthisto.io.read_visium(visium_dir / "visiumio", bin_size=2)
    np.testing.assert_array_equal(same.obsm["spatial"], adata.obsm["spatial"])
    with pytest.raises(MissingKeyError, match=r"no 8 µm bins.*available: \[2\]"):
        sthisto.io.read_visium(visium_dir / "visiumio", bin_size=8)


def test_fullres_image_path_is_stored_and_patched(visium_dir, tmp_path):
    """A full-resolution image beside a Space Ranger output (frame 1/8 of the original)."""
    from PIL import Image

    source = visium_dir / "spaceranger-1.0.0"
    folder = tmp_path / "outs"
    (folder / "spatial").mkdir(parents=True)
    shutil.copy(source / "filtered_feature_bc_matrix.h5", folder)
    shrink = 8.0
    positions = _positions_v1(source).reset_index()
    positions[["pxl_row_in_fullres", "pxl_col_in_fullres"]] /= shrink
    positions.to_csv(folder / "spatial" / "tissue_positions.csv", index=False)
    factors = json.loads((source / "spatial" / "scalefactors_json.json").read_text())
    factors = {
        "spot_diameter_fullres": factors["spot_diameter_fullres"] / shrink,
        "fiducial_diameter_fullres": factors["fiducial_diameter_fullres"] / shrink,
        "tissue_lowres_scalef": factors["tissue_lowres_scalef"] * shrink,
    }
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))
    shutil.copy(source / "spatial" / "tissue_lowres_image.png", folder / "spatial")
    lowres = Image.open(source / "spatial" / "tissue_lowres_image.png").convert("RGB")
    side = round(lowres.width / factors["tissue_lowres_scalef"])
    fullres_file = tmp_path / "he.jpg"
    lowres.resize((side, side), Image.Resampling.BILINEAR).save(fullres_file, quality=95)

    adata = sthisto.io.read_visium(folder, fullres_image_path=fullres_file, library_id="s")
    metadata = adata.uns["spatial"]["s"]["metadata"]
    assert metadata["image_path"] == str(fullres_file.resolve()) and metadata["has_image"] is True
    mpp = adata.uns["spatial"]["s"]["scalefactors"]["microns_per_pixel"]
    full = sthisto.io.read_visium(source, load_images=False).uns["spatial"]["spaceranger-1.0.0"]["scalefactors"]
    assert mpp == pytest.approx(shrink * full["microns_per_pixel"])
    patches, clipped = PatchDataset(adata, spec=PatchSpec(size_px=16, size_um=55.0)).read_batch(range(adata.n_obs))
    assert not clipped.any()
    glass = np.asarray(Image.open(fullres_file))[:100, :100].mean()
    assert patches.float().mean() < glass - 15

    too_small = tmp_path / "small.jpg"
    lowres.save(too_small)
    with pytest.raises(InputError, match="lie outside"):
        sthisto.io.read_visium(folder, fullres_image_path=too_small)


def test_bad_folders_are_clear_errors(visium_dir, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        sthisto.io.read_visium(tmp_path / "missing")
    source = visium_dir / "spaceranger-1.0.0"
    folder = tmp_path / "outs"
    (folder / "spatial").mkdir(parents=True)
    shutil.copy(source / "filtered_feature_bc_matrix.h5", folder)
    shutil.copy(source / "spatial" / "scalefactors_json.json", folder / "spatial")
    with pytest.raises(InputError, match=r"no spot positions file.*tissue_positions\.parquet"):
        sthisto.io.read_visium(folder)
    shutil.copy(source / "spatial" / "tissue_positions_list.csv", folder / "spatial")
    with pytest.raises(InputError, match=r"counts_file= one of \['filtered_feature_bc_matrix.h5'\]"):
        sthisto.io.read_visium(folder, counts_file="raw_feature_bc_matrix.h5")
    (folder / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(InputError, match="scalefactors_json.json"):
        sthisto.io.read_visium(folder)
    with pytest.raises(InputError, match="fullres_image_path"):
        sthisto.io.read_visium(source, fullres_image_path=tmp_path / "none.tif")
