"""pp.embed / tl.train / tl.predict / tl.superresolve take a SpatialData object (table_key / image_key)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import sthisto
from sthisto._errors import InputError


@pytest.fixture
def sdata():
    adata = sthisto.datasets.synthetic(n_sections=1, n_spots=40, n_genes=6, seed=8)
    return sthisto.io.to_spatialdata(adata, table_key="spots", chunk_size=256)


def test_results_land_in_the_spatialdata_table(sdata):
    genes = list(sdata.tables["spots"].var_names[:3])
    sthisto.pp.embed(sdata, encoder="handcrafted", patch_size_um=60.0, table_key="spots", image_key="S01_image")
    table = sdata.tables["spots"]
    assert "X_handcrafted" in table.obsm and table.obsm["X_handcrafted"].shape[0] == table.n_obs
    model = sthisto.tl.train(sdata, "ridge_tiny", genes=genes, features_key="X_handcrafted", device="cpu")
    assert "ridge_tiny" in table.uns["sthisto"]["models"]
    sthisto.tl.predict(sdata, "ridge_tiny", key_added="pred")
    assert table.layers["pred"].shape == table.shape
    assert table.var["pred_predicted"].tolist() == [g in genes for g in table.var_names]
    # Same numbers as on the AnnData.
    adata = sthisto.io.from_spatialdata(sdata)
    expected = model.predict(adata)
    predicted = table.layers["pred"]
    predicted = predicted.toarray() if hasattr(predicted, "toarray") else np.asarray(predicted)
    np.testing.assert_allclose(predicted[:, table.var_names.isin(genes)], expected, rtol=1e-5)


def test_new_spots_become_a_new_table_in_the_image_frame(sdata):
    from spatialdata.transformations import get_transformation

    genes = list(sdata.tables["spots"].var_names[:2])
    sthisto.tl.train(sdata, "ridge_tiny", genes=genes, device="cpu")
    fine = sthisto.tl.superresolve(sdata, "ridge_tiny", factor=4, key_added="fine")
    assert "fine" in sdata.tables and sdata.tables["fine"].n_obs == fine.n_obs
    shapes = sdata.tables["fine"].uns["spatialdata_attrs"]["region"]
    shapes = [shapes] if isinstance(shapes, str) else list(shapes)
    assert shapes == ["fine_S01_spots"]
    assert set(get_transformation(sdata.shapes["fine_S01_spots"], get_all=True)) == set(
        get_transformation(sdata.images["S01_image"], get_all=True)
    )


def test_anndata_calls_are_unchanged_and_table_key_needs_spatialdata():
    adata = sthisto.datasets.synthetic(n_sections=1, n_spots=20, n_genes=4, seed=1)
    with pytest.raises(InputError, match="SpatialData input only"):
        sthisto.pp.embed(adata, table_key="table")
    sthisto.pp.embed(adata=adata, encoder="handcrafted", patch_size_um=50.0)  # by keyword, as before
    assert "X_handcrafted" in adata.obsm
    for function in (sthisto.pp.embed, sthisto.tl.train, sthisto.tl.predict, sthisto.tl.superresolve):
        parameters = inspect.signature(function).parameters
        assert parameters["table_key"].kind is inspect.Parameter.KEYWORD_ONLY
        assert "table_key" in inspect.getdoc(function)


def test_copy_is_refused_for_spatialdata(sdata):
    with pytest.raises(InputError, match="copy=True"):
        sthisto.pp.embed(sdata, copy=True)
