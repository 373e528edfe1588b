"""The gene-mean predictor beside every metrics table (issue 14): each gene's training mean at every spot."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

import sthisto

FAST_EVAL = {"leiden_connectivities": "gauss", "kmeans_n_init": 2}


@pytest.fixture(scope="module")
def data():
    adata = sthisto.datasets.synthetic(n_sections=3, n_patients=3, n_spots=60, n_genes=8, seed=3)
    sthisto.pp.normalize(adata)
    layer = adata.layers["sthisto_target"]
    adata.layers["sthisto_target"] = np.asarray(layer.toarray() if hasattr(layer, "toarray") else layer)
    return adata


def _fresh(data):
    adata = data.copy()
    adata.uns.pop("sthisto", None)
    return adata


def _value(table, group, metric, column="gene_mean"):
    rows = table[(table["group"] == group) & (table["metric"] == metric)]
    assert len(rows) == 1, (group, metric)
    return float(rows[column].iloc[0])


def _spot_pearson(observed, profile):
    return np.mean([stats.pearsonr(row, profile)[0] for row in observed])


def test_evaluate_reports_the_training_mean_predictor(data):
    adata = _fresh(data)
    libraries = list(adata.obs["library_id"].cat.categories)
    train = adata.obs["library_id"].isin(libraries[:2]).to_numpy()
    model = sthisto.tl.train(adata, "ridge_tiny", train_mask=libraries[:2], layer="sthisto_target", seed=0)
    expected_mean = adata.layers["sthisto_target"][train].mean(axis=0)
    np.testing.assert_allclose(model.trained_on["target_mean"], expected_mean, rtol=1e-5)

    test = adata[~train].copy()
    sthisto.tl.predict(test, model, key_added="pred")
    table = sthisto.tl.evaluate(test, predicted="pred", **FAST_EVAL)
    assert list(table.columns).index("gene_mean") == list(table.columns).index("value") + 1
    observed = test.layers["sthisto_target"]
    group = libraries[2]
    assert _value(table, group, "pearson_spot_mean") == pytest.approx(_spot_pearson(observed, expected_mean), abs=1e-5)
    mse = np.mean((observed - expected_mean[None, :]) ** 2)
    assert _value(table, group, "mse") == pytest.approx(mse, rel=1e-5)
    # a constant per gene has no per-gene correlation: said, not hidden
    assert np.isnan(_value(table, group, "pearson_gene_mean"))
    assert _value(table, group, "n_genes_constant_predicted") == adata.n_vars
    # the model's own numbers are unchanged beside it
    assert _value(table, group, "n_genes_constant_predicted", "value") == 0
    assert "gene-mean predictor" in test.uns["sthisto"]["evaluate"]["pred"]["gene_mean"]


def test_cross_validate_uses_each_folds_own_training_mean(data):
    adata = _fresh(data)
    table = sthisto.tl.cross_validate(
        adata, "ridge_tiny", split="section", layer="sthisto_target", progress=False, evaluate_params=FAST_EVAL
    )
    libraries = adata.obs["library_id"].to_numpy()
    target = adata.layers["sthisto_target"]
    folds = adata.uns["sthisto"]["cross_validate"]["cv_ridge_tiny"]["folds"]
    for fold in adata.obs["library_id"].cat.categories:
        mean = np.asarray(json.loads(folds[fold]["trained_on"])["target_mean"])
        np.testing.assert_allclose(mean, target[libraries != fold].mean(axis=0), rtol=1e-5)
        expected = _spot_pearson(target[libraries == fold], mean)
        assert _value(table, fold, "pearson_spot_mean") == pytest.approx(expected, abs=1e-5)
    overall = table.query("scope == 'overall' and metric == 'pearson_spot_mean'")
    assert np.isfinite(overall["gene_mean"].iloc[0]) and np.isfinite(overall["value"].iloc[0])


def test_spots_split_reference_rows_carry_the_gene_mean_too(data):
    adata = _fresh(data)
    table = sthisto.tl.cross_validate(
        adata, "ridge_tiny", split="spots", layer="sthisto_target", progress=False, evaluate_params=FAST_EVAL
    )
    reference = table[(table["evaluated_on"] == "training_reference") & (table["metric"] == "pearson_spot_mean")]
    assert len(reference) and np.isfinite(reference["gene_mean"].to_numpy()).all()
