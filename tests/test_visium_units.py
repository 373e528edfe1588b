"""Physical units of Visium data: µm/px from the 100 µm spot grid, checked against the 65 µm definition.

Space Ranger's ``spot_diameter_fullres`` is the pixel diameter of a theoretical 65 µm spot, not
of the 55 µm capture spot. These tests write synthetic Visium sections in Space Ranger's layout
(whose true µm/px is known) and read them back.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

import sthisto
from sthisto._constants import ScaleFactors, Uns
from sthisto._errors import InputError


@pytest.fixture(scope="module")
def section():
    return sthisto.datasets.synthetic(
        n_sections=1, n_spots=60, n_genes=5, geometry="visium", microns_per_pixel=1.6, seed=3
    )


def _write_spaceranger(adata, folder, *, scalefactors=None, rows=None):
    """``adata``'s single library as a Space Ranger ≥ 2.0 ``outs/`` folder (matrix folder, no images)."""
    library = adata.obs["library_id"].cat.categories[0]
    rows = np.arange(adata.n_obs) if rows is None else np.asarray(rows)
    sub = adata[rows]
    barcodes = [f"BC{i:05d}-1" for i in range(sub.n_obs)]
    matrix = folder / "filtered_feature_bc_matrix"
    (folder / "spatial").mkdir(parents=True)
    matrix.mkdir()
    scipy.io.mmwrite(matrix / "matrix.mtx", sp.csr_matrix(sub.X).T.astype(np.int64))
    pd.DataFrame({"id": sub.var_names, "name": sub.var_names, "type": "Gene Expression"}).to_csv(
        matrix / "features.tsv", sep="\t", header=False, index=False
    )
    pd.Series(barcodes).to_csv(matrix / "barcodes.tsv", sep="\t", header=False, index=False)
    xy = sub.obsm["spatial"]
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": sub.obs["array_row"].to_numpy(),
            "array_col": sub.obs["array_col"].to_numpy(),
            "pxl_row_in_fullres": xy[:, 1],
            "pxl_col_in_fullres": xy[:, 0],
        }
    ).to_csv(folder / "spatial" / "tissue_positions.csv", index=False)
    factors = adata.uns[Uns.SPATIAL][library][Uns.SCALEFACTORS]
    written = {ScaleFactors.SPOT_DIAMETER: float(factors[ScaleFactors.SPOT_DIAMETER])}
    written.update(scalefactors or {})
    written = {k: v for k, v in written.items() if v is not None}
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(written))
    return folder


def _read(folder, **kwargs):
    return sthisto.io.read_visium(folder, counts_file="filtered_feature_bc_matrix", **kwargs)


def _scale(adata):
    return adata.uns[Uns.SPATIAL][adata.obs["library_id"].cat.categories[0]][Uns.SCALEFACTORS]


def test_synthetic_visium_declares_the_spot_diameter_as_space_ranger_does(section):
    factors = _scale(section)
    mpp = factors[ScaleFactors.MICRONS_PER_PIXEL]
    # The 65 µm definition, and Space Ranger's ratio of that diameter to the 100 µm pitch.
    assert factors[ScaleFactors.SPOT_DIAMETER] * mpp == pytest.approx(65.0)
    from scipy.spatial import cKDTree

    xy = section.obsm["spatial"]
    pitch_px = np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])
    assert factors[ScaleFactors.SPOT_DIAMETER] / pitch_px == pytest.approx(0.65)


def test_read_visium_measures_microns_per_pixel_on_the_spot_grid(section, tmp_path, caplog):
    folder = _write_spaceranger(section, tmp_path / "s" / "outs")
    with caplog.at_level(logging.WARNING, logger="sthisto"):
        adata = _read(folder)
    factors = _scale(adata)
    assert factors[ScaleFactors.MICRONS_PER_PIXEL] == pytest.approx(1.6, rel=1e-9)
    assert factors[ScaleFactors.SPOT_DIAMETER] == pytest.approx(_scale(section)[ScaleFactors.SPOT_DIAMETER])
    assert adata.uns["sthisto"]["io"]["read_visium"]["microns_per_pixel_source"].startswith("spot grid")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # A patch of 100 µm is 100 µm of this image: 62.5 px at 1.6 µm/px.
    from sthisto.pp._patches import PatchSpec

    assert PatchSpec(size_px=16, size_um=100.0).crop_side(factors[ScaleFactors.MICRONS_PER_PIXEL]) == 62


def test_rotated_and_flipped_arrays_give_the_same_scale(section, tmp_path):
    """The fit uses the grid's own axes: a slide rotated by 30° and mirrored has the same µm/px."""
    turned = section.copy()
    angle = np.deg2rad(30.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([-1.0, 1.0])
    xy = turned.obsm["spatial"] @ rotation.T
    turned.obsm["spatial"] = xy - xy.min(axis=0) + 50.0
    adata = _read(_write_spaceranger(turned, tmp_path / "outs"), library_id="t")
    assert _scale(adata)[ScaleFactors.MICRONS_PER_PIXEL] == pytest.approx(1.6, rel=1e-9)


def test_a_spot_diameter_that_disagrees_with_the_grid_warns(section, tmp_path, caplog):
    # The value the 55 µm reading of spot_diameter_fullres would have implied: 15% off.
    wrong = {ScaleFactors.SPOT_DIAMETER: 55.0 / 1.6}
    folder = _write_spaceranger(section, tmp_path / "outs", scalefactors=wrong)
    with caplog.at_level(logging.WARNING, logger="sthisto"):
        adata = _read(folder, library_id="w")
    assert _scale(adata)[ScaleFactors.MICRONS_PER_PIXEL] == pytest.approx(1.6, rel=1e-9)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 1
    assert "'w'" in messages[0] and "1.6 from the spot grid" in messages[0] and "65 µm spot" in messages[0]
    assert "+18%" in messages[0]  # 65 / 55 - 1

    caplog.clear()
    close = {ScaleFactors.SPOT_DIAMETER: 65.0 / 1.6 * 1.04}  # within the 5% tolerance
    folder = _write_spaceranger(section, tmp_path / "close" / "outs", scalefactors=close)
    with caplog.at_level(logging.WARNING, logger="sthisto"):
        _read(folder)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_given_microns_per_pixel_wins_but_is_checked(section, tmp_path, caplog):
    given = {ScaleFactors.MICRONS_PER_PIXEL: 2.0}
    folder = _write_spaceranger(section, tmp_path / "outs", scalefactors=given)
    with caplog.at_level(logging.WARNING, logger="sthisto"):
        adata = _read(folder, library_id="g")
    assert _scale(adata)[ScaleFactors.MICRONS_PER_PIXEL] == 2.0
    assert adata.uns["sthisto"]["io"]["read_visium"]["microns_per_pixel_source"] == "scalefactors_json.json"
    messages = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "1.6 from the spot grid" in messages and "1.6 from spot_diameter_fullres" in messages


def test_spots_on_one_line_fall_back_to_the_65_um_definition(section, tmp_path, caplog):
    row = section.obs["array_row"].to_numpy()
    line = np.flatnonzero(row == np.bincount(row).argmax())
    folder = _write_spaceranger(section, tmp_path / "outs", rows=line)
    with caplog.at_level(logging.WARNING, logger="sthisto"):
        adata = _read(folder, library_id="line")
    assert _scale(adata)[ScaleFactors.MICRONS_PER_PIXEL] == pytest.approx(1.6)
    assert adata.uns["sthisto"]["io"]["read_visium"]["microns_per_pixel_source"] == "spot_diameter_fullres (65 µm spot)"
    assert any("one line" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_no_grid_and_no_diameter_is_a_clear_error(section, tmp_path):
    row = section.obs["array_row"].to_numpy()
    line = np.flatnonzero(row == np.bincount(row).argmax())
    folder = _write_spaceranger(section, tmp_path / "outs", rows=line, scalefactors={ScaleFactors.SPOT_DIAMETER: None})
    with pytest.raises(InputError, match="physical scale is unknown.*Add 'microns_per_pixel'"):
        _read(folder)


def test_visium_hd_keeps_space_rangers_microns_per_pixel(section, tmp_path):
    """HD bins are a square grid whose pitch is the bin size: Space Ranger's µm/px is used as written."""
    folder = _write_spaceranger(section, tmp_path / "square_008um", scalefactors={ScaleFactors.MICRONS_PER_PIXEL: 0.5})
    adata = _read(folder)
    factors = _scale(adata)
    assert factors[ScaleFactors.MICRONS_PER_PIXEL] == 0.5 and factors[ScaleFactors.SPOT_SPACING_UM] == 8.0
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps({ScaleFactors.SPOT_DIAMETER: 16.0}))
    with pytest.raises(InputError, match="no 'microns_per_pixel'.*Visium HD"):
        _read(folder)


def test_superresolution_declares_its_grid_in_true_microns(section, tmp_path, caplog):
    """Space Ranger output → read_visium → superresolve: the measured pitch is 100 µm, the new grid 50 µm."""
    from PIL import Image

    library = section.obs["library_id"].cat.categories[0]
    image_file = tmp_path / "he.png"
    Image.fromarray(section.uns[Uns.SPATIAL][library]["images"]["fullres"]).save(image_file)
    folder = _write_spaceranger(section, tmp_path / "outs")
    adata = _read(folder, fullres_image_path=image_file, library_id="v")
    model = sthisto.tl.train(adata, "ridge_tiny", progress=False, store=False)
    with caplog.at_level(logging.WARNING, logger="sthisto"):
        fine = sthisto.tl.superresolve(adata, model, factor=4)
    summary = fine.uns["sthisto"]["superresolve"]["ridge_superresolved"]["libraries"]["v"]
    assert summary["grid"] == "hex"
    assert summary["R_um"] == pytest.approx(100.0, rel=1e-6)
    assert summary["new_spacing_um"] == pytest.approx(50.0, rel=1e-6)
    assert fine.uns[Uns.SPATIAL]["v"][Uns.SCALEFACTORS][ScaleFactors.SPOT_SPACING_UM] == pytest.approx(50.0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "centre distance" in r.getMessage()]
