"""HEST-Benchmark protocol: split CSVs, gene-list files and the ridge probe's fixed alpha."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import sthisto
from sthisto._errors import InputError, MissingKeyError
from sthisto.models.ridge import RidgeBaseline


def test_hest_alpha_rule_matches_the_published_probe():
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 30))
    Y = X[:, :4] @ rng.normal(size=(4, 5)) + 3.0 + rng.normal(scale=0.1, size=(80, 5))
    model = RidgeBaseline(n_components=16, alpha_rule="hest").fit(X, Y, groups=np.repeat([0, 1], 40))
    Z = PCA(n_components=16, svd_solver="full").fit_transform(StandardScaler().fit_transform(X))
    reference = Ridge(alpha=100 / (16 * 5), fit_intercept=False).fit(Z, Y)
    np.testing.assert_allclose(model.alpha_, np.full(5, 100 / 80))
    np.testing.assert_array_equal(model.intercept_, 0.0)
    assert model.cv_scheme_ == "hest-fixed"
    np.testing.assert_allclose(model.predict(X), reference.predict(Z), rtol=1e-6, atol=1e-8)
    # The cross-validated default fits an intercept and so differs.
    assert not np.allclose(RidgeBaseline(n_components=16).fit(X, Y).predict(X), model.predict(X))
    rebuilt = RidgeBaseline.from_state(model.get_state())
    assert rebuilt.alpha_rule == "hest"
    np.testing.assert_array_equal(rebuilt.predict(X), model.predict(X))
    with pytest.raises(InputError, match="alpha_rule"):
        RidgeBaseline(alpha_rule="fixed")


def _write_splits(folder, folds):
    folder.mkdir()
    for k, (train, test) in enumerate(folds):
        for role, samples in (("train", train), ("test", test)):
            pd.DataFrame(
                {
                    "sample_id": samples,
                    "patches_path": [f"patches/{s}.h5" for s in samples],
                    "expr_path": [f"adata/{s}.h5ad" for s in samples],
                }  # fmt: skip
            ).to_csv(folder / f"{role}_{k}.csv", index=False)
    return folder


def test_cross_validate_reads_hest_split_files_and_gene_lists(tmp_path):
    adata = sthisto.datasets.synthetic(n_sections=3, n_patients=3, n_spots=30, n_genes=8, seed=1)
    splits = _write_splits(tmp_path / "splits", [(["S02", "S03"], ["S01"]), (["S01"], ["S03"])])
    genes = list(adata.var_names[:3])
    gene_file = tmp_path / "var_3genes.json"
    gene_file.write_text(json.dumps({"genes": genes}))
    table = sthisto.tl.cross_validate(
        adata, "ridge_tiny", split="patient", folds=splits, genes=str(gene_file), alpha_rule="hest", progress=False
    )
    record = adata.uns["sthisto"]["cross_validate"]["cv_ridge_tiny"]
    fold_column = adata.obs["cv_ridge_tiny_fold"].astype(object)
    assert set(fold_column[adata.obs["library_id"] == "S01"]) == {"fold0"}
    assert set(fold_column[adata.obs["library_id"] == "S03"]) == {"fold1"}
    assert fold_column[adata.obs["library_id"] == "S02"].isna().all()  # S02 is never tested
    predicted = adata.layers["cv_ridge_tiny"]
    predicted = predicted.toarray() if hasattr(predicted, "toarray") else np.asarray(predicted)
    columns = adata.var_names.isin(genes)
    assert np.isnan(predicted[(adata.obs["library_id"] == "S02").to_numpy()][:, columns]).all()
    assert np.isfinite(predicted[(adata.obs["library_id"] != "S02").to_numpy()][:, columns]).all()
    assert adata.var["cv_ridge_tiny_predicted"].tolist() == [g in genes for g in adata.var_names]
    assert list(record["genes"]) == genes
    libraries = set(table.loc[table["scope"] == "group", "group"].astype(str))
    assert libraries == {"S01", "S03"}
    assert "folds" in record and "split" in record


def test_hest_split_files_are_checked(tmp_path):
    adata = sthisto.datasets.synthetic(n_sections=2, n_patients=2, n_spots=20, n_genes=4, seed=2)
    unknown = _write_splits(tmp_path / "unknown", [(["S01"], ["NCBI9"])])
    with pytest.raises(MissingKeyError, match="NCBI9"):
        sthisto.tl.cross_validate(adata, "ridge_tiny", split="patient", folds=unknown, progress=False)
    both = _write_splits(tmp_path / "both", [(["S01", "S02"], ["S02"])])
    with pytest.raises(InputError, match="both"):
        sthisto.tl.cross_validate(adata, "ridge_tiny", split="patient", folds=both, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="train_<k>.csv"):
        sthisto.tl.cross_validate(adata, "ridge_tiny", split="patient", folds=tmp_path / "empty", progress=False)
    bad_list = tmp_path / "genes.json"
    bad_list.write_text(json.dumps({"names": ["a"]}))
    with pytest.raises(InputError, match="'genes' list"):
        sthisto.tl.cross_validate(adata, "ridge_tiny", split="patient", genes=bad_list, progress=False)
