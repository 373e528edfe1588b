"""tl.cross_validate: fold plans, out-of-fold predictions, records, per-fold gene selection, methods compared."""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import sthisto
from sthisto._errors import InputError, KeyExistsError, MissingKeyError
from sthisto.models import ExpressionModel
from sthisto.tl._cross_validate import plan_folds

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """A few hundred parameters: enough to learn something from 16 px patches in a few epochs."""

    input_keys = ("patches",)

    def __init__(self, n_genes, hidden=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, hidden, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(hidden, n_genes)

    def forward(self, patches):
        return {"prediction": self.head(self.features(patches.float() / 255.0).flatten(1))}


class TinyCV(ExpressionModel):
    name = "tiny_cv"
    input_kind = "pixels"
    network_class = TinyNet
    batching = "spots"
    data_defaults = {"patch_size_px": 16, "patch_size_um": 100.0}
    training_defaults = {"lr": 1e-2, "max_epochs": 2, "batch_size": 32}


class TinyCVWide(TinyCV):
    name = "tiny_cv_wide"
    training_defaults = {"lr": 5e-3, "max_epochs": 2, "batch_size": 16}


FAST = {"progress": False, "evaluate_params": {"leiden_connectivities": "gauss", "kmeans_n_init": 2}}


@pytest.fixture(scope="module")
def data():
    return sthisto.datasets.synthetic(n_sections=3, n_patients=2, n_spots=50, n_genes=8, seed=1)


def _fresh(data):
    adata = data.copy()
    adata.uns.pop("sthisto", None)
    return adata


def test_fold_plans(data):
    sections = plan_folds(data, "section")
    assert [f.name for f in sections] == ["S01", "S02", "S03"]
    libraries = data.obs["library_id"].astype(str).to_numpy()
    for fold in sections:
        assert set(libraries[fold.test]) == {fold.name} and fold.name not in set(libraries[fold.train])
        assert len(fold.train) + len(fold.test) == data.n_obs
    patients = plan_folds(data, "patient")
    patient = data.obs["patient"].astype(str).to_numpy()
    for fold in patients:
        assert set(patient[fold.test]) == {fold.name} and fold.name not in set(patient[fold.train])
    spots = plan_folds(data, "spots", 0.3, seed=4)
    for fold in spots:
        rows = np.flatnonzero(libraries == fold.name)
        assert len(np.intersect1d(fold.train, fold.test)) == 0
        assert set(fold.train) | set(fold.test) == set(rows)
        assert len(fold.test) == round(0.3 * len(rows))
    again = plan_folds(data, "spots", 0.3, seed=4)
    assert all((a.test == b.test).all() for a, b in zip(spots, again))
    assert [f.name for f in plan_folds(data, "section", ["S02"])] == ["S02"]
    with pytest.raises(MissingKeyError, match="S09"):
        plan_folds(data, "section", ["S09"])
    with pytest.raises(InputError, match="fraction"):
        plan_folds(data, "spots", ["S01"])
    no_patient = data.copy()
    del no_patient.obs["patient"]
    with pytest.raises(MissingKeyError, match="patient"):
        plan_folds(no_patient, "patient")


def test_section_split_writes_out_of_fold_predictions(data):
    adata = _fresh(data)
    table = sthisto.tl.cross_validate(
        adata, TinyCV, split="section", labels_key="label", seed=3, store_weights=True, **FAST
    )
    key = "cv_tiny_cv"
    assert adata.layers[key].shape == adata.shape and np.isfinite(adata.layers[key]).all()
    assert adata.var[f"{key}_predicted"].all()
    assert list(adata.obs[f"{key}_fold"].astype(str)) == list(adata.obs["library_id"].astype(str))
    entry = adata.uns["sthisto"]["cross_validate"][key]
    assert entry["split"] == "section" and entry["gene_selection"] == "given"
    assert set(entry["models"]) == {"S01", "S02", "S03"}

    # each fold's stored model reproduces the out-of-fold predictions of its test section exactly
    from safetensors.torch import load

    for number, fold in enumerate(["S01", "S02", "S03"]):
        stored = entry["models"][fold]
        model = TinyCV.from_manifest(json.loads(str(stored["manifest"])))  # not registered: rebuild by class
        model.load_state_tensors(load(np.asarray(stored["weights"], dtype=np.uint8).tobytes()))
        rows = np.flatnonzero(adata.obs["library_id"] == fold)
        np.testing.assert_allclose(model.predict(adata, rows), adata.layers[key][rows], rtol=1e-6, atol=1e-6)
        assert fold not in model.trained_on["libraries"]
        assert entry["folds"][fold]["seed"] == 3 + number
        assert len(json.loads(entry["folds"][fold]["history"])["train_loss"]) == 2

    # the table is tl.evaluate on the out-of-fold layer, against the model's own target transform
    assert set(table["method"]) == {"tiny_cv"} and set(table["evaluated_on"]) == {"held_out"}
    sthisto.pp.normalize(adata, variant="log10_1e4", key_added="target")
    explicit = sthisto.tl.evaluate(
        adata, predicted=key, observed="target", labels_key="label", key_added="explicit", **FAST["evaluate_params"]
    )
    np.testing.assert_allclose(table["value"].to_numpy(), explicit["value"].to_numpy(), atol=1e-6, equal_nan=True)
    assert {"ari_kmeans", "ari_leiden"} <= set(table["metric"])
    assert adata.uns["sthisto"]["evaluate"][key]["protocol"]["split"] == "section"
    pd.testing.assert_frame_equal(sthisto.tl.get_metrics(adata, key), table)


def test_refusals_leave_adata_unchanged(data):
    adata = _fresh(data)
    before = (adata.obs.copy(), dict(adata.layers), dict(adata.uns))
    for kwargs, error, match in [
        ({"split": "rows"}, InputError, "split"),
        ({"folds": ["S99"]}, MissingKeyError, "S99"),
        ({"genes": ["NOPE"]}, MissingKeyError, "not in adata.var_names"),
        ({"genes": "hvg:x"}, InputError, "gene rule"),
        ({"train_mask": ["S01"]}, InputError, "cross_validate"),
        ({"not_a_param": 1}, InputError, "not_a_param"),
        ({"devices": ["cpu"], "device": "cpu"}, InputError, "devices"),
        ({"layer": "missing"}, MissingKeyError, "layer"),
        ({"n_jobs": 0}, InputError, "n_jobs"),
    ]:
        with pytest.raises(error, match=match):
            sthisto.tl.cross_validate(adata, TinyCV, **kwargs, **FAST)
    pd.testing.assert_frame_equal(adata.obs, before[0])
    assert dict(adata.layers) == before[1] and adata.uns.keys() == before[2].keys()
    with pytest.raises(InputError, match="nope"):
        sthisto.tl.cross_validate(adata, TinyCV, progress=False, evaluate_params={"nope": 1})
    adata.obs["cv_tiny_cv_fold"] = "taken"
    with pytest.raises(KeyExistsError):
        sthisto.tl.cross_validate(adata, TinyCV, **FAST)
    assert "cv_tiny_cv" not in adata.layers


def test_spots_split_with_per_fold_genes_and_reference(data):
    adata = _fresh(data)
    seen = []

    def top_variance(train_view):
        seen.append(train_view.n_obs)
        counts = np.asarray(train_view.X.todense())
        order = np.argsort(-counts.var(axis=0))[:4]
        return list(train_view.var_names[np.sort(order)])

    table = sthisto.tl.cross_validate(
        adata, TinyCV, split="spots", folds=0.4, genes=top_variance, key_added="sp", **FAST
    )
    entry = adata.uns["sthisto"]["cross_validate"]["sp"]
    assert entry["gene_selection"] == "per_fold_training_data"
    libraries = adata.obs["library_id"].astype(str).to_numpy()
    fold = adata.obs["sp_fold"].astype(object).to_numpy()
    layer = adata.layers["sp"]
    layer = layer.toarray() if hasattr(layer, "toarray") else layer
    for name in ("S01", "S02", "S03"):
        section = libraries == name
        test = section & (fold == name)
        train = section & pd.isna(fold)
        assert test.sum() == round(0.4 * section.sum())
        # genes were chosen on the training spots only: recompute the rule on them
        counts = np.asarray(adata.X[train].todense())
        expected = sorted(adata.var_names[np.argsort(-counts.var(axis=0))[:4]])
        assert sorted(entry["folds"][name]["genes"]) == expected
        columns = adata.var_names.get_indexer(expected)
        assert np.isfinite(layer[np.ix_(test, columns)]).all()
        assert np.isnan(layer[train][:, columns]).all()  # training spots carry no out-of-fold prediction
    assert seen == [int((libraries == n).sum() - round(0.4 * (libraries == n).sum())) for n in ("S01", "S02", "S03")]
    held = table[table["evaluated_on"] == "held_out"]
    reference = table[table["evaluated_on"] == "training_reference"]
    assert len(held) and len(reference)
    n_test = held[(held["metric"] == "n_spots") & (held["scope"] == "group")]["value"].sum()
    assert n_test == sum(round(0.4 * (libraries == n).sum()) for n in ("S01", "S02", "S03"))
    n_train = reference[(reference["metric"] == "n_spots") & (reference["scope"] == "group")]["value"].sum()
    assert n_train == adata.n_obs - n_test


def test_rule_based_genes_use_training_spots_only(data):
    adata = _fresh(data)
    sthisto.tl.cross_validate(adata, TinyCV, split="patient", genes="hvg:4", key_added="hv", **FAST)
    entry = adata.uns["sthisto"]["cross_validate"]["hv"]
    for fold, info in entry["folds"].items():
        train = adata[adata.obs["patient"].astype(str) != fold].copy()
        sthisto.pp.select_genes(train, flavor="seurat", n_top_genes=4, key_added="expected")
        assert sorted(info["genes"]) == sorted(train.var_names[train.var["expected"]])
    assert entry["genes_rule"].startswith("hvg:4")


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("sthisto")]


def test_a_var_selection_made_on_all_spots_is_warned_about_and_recorded(data, caplog):
    adata = _fresh(data)
    sthisto.pp.select_genes(adata, flavor="seurat", n_top_genes=4)  # a rule, run on every spot
    with caplog.at_level(logging.WARNING, logger="sthisto"):
        sthisto.tl.cross_validate(adata, TinyCV, split="patient", key_added="all", **FAST)  # genes=None
    messages = [m for m in _warnings(caplog) if "including test folds" in m]
    assert len(messages) == 1
    assert "var['sthisto_selected']" in messages[0] and "genes='seurat:4'" in messages[0]
    entry = adata.uns["sthisto"]["cross_validate"]["all"]
    assert entry["gene_selection"] == "selected_on_all_spots"
    assert entry["gene_selection_note"].startswith("selected on all spots, including test folds")
    protocol = adata.uns["sthisto"]["evaluate"]["all"]["protocol"]
    assert protocol["gene_selection"] == "selected_on_all_spots"
    assert "including test folds" in protocol["gene_selection_note"]
    assert sorted(entry["genes"]) == sorted(adata.var_names[adata.var["sthisto_selected"]])

    # the same column named explicitly, and scanpy's highly_variable with its uns['hvg'] record
    adata.var["highly_variable"] = adata.var["sthisto_selected"].to_numpy()
    adata.uns["hvg"] = {"flavor": "seurat"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sthisto"):
        sthisto.tl.cross_validate(adata, TinyCV, split="patient", genes="highly_variable", key_added="hv", **FAST)
    assert any("scanpy.pp.highly_variable_genes" in m for m in _warnings(caplog))


def test_given_lists_and_per_fold_rules_stay_silent(data, caplog):
    adata = _fresh(data)
    sthisto.pp.select_genes(adata, genes=list(adata.var_names[:4]))  # a given list: no data looked at
    with caplog.at_level(logging.WARNING, logger="sthisto"):
        sthisto.tl.cross_validate(adata, TinyCV, split="patient", key_added="given", **FAST)
        sthisto.tl.cross_validate(adata, TinyCV, split="patient", genes="hvg:4", key_added="rule", **FAST)
    assert not [m for m in _warnings(caplog) if "test folds" in m]
    assert adata.uns["sthisto"]["cross_validate"]["given"]["gene_selection"] == "given"
    assert adata.uns["sthisto"]["cross_validate"]["given"]["gene_selection_note"] == ""
    assert adata.uns["sthisto"]["cross_validate"]["rule"]["gene_selection"] == "per_fold_training_data"


def test_methods_compared_on_identical_folds(data):
    adata = _fresh(data)
    table = sthisto.tl.cross_validate(adata, [TinyCV, TinyCVWide], split="section", folds=["S01", "S03"], **FAST)
    assert set(table["method"]) == {"tiny_cv", "tiny_cv_wide"}
    store = adata.uns["sthisto"]["cross_validate"]
    assert list(store["cv"]["keys"]) == ["cv_tiny_cv", "cv_tiny_cv_wide"]
    pd.testing.assert_frame_equal(store["cv"]["table"], table)
    for key in ("cv_tiny_cv", "cv_tiny_cv_wide"):
        assert set(store[key]["models"]) == {"S01", "S03"}
        assert "weights" not in store[key]["models"]["S01"]  # the default keeps records without weights
        layer = adata.layers[key]
        s02 = (adata.obs["library_id"] == "S02").to_numpy()
        assert np.isnan(layer[s02]).all() and np.isfinite(layer[~s02]).all()
    assert not np.allclose(adata.layers["cv_tiny_cv"][~s02], adata.layers["cv_tiny_cv_wide"][~s02])
    # evaluate sees only the tested sections
    assert set(table.loc[table["scope"] == "group", "group"]) == {"S01", "S03"}
    ax = sthisto.pl.metrics_heatmap(adata, "cv", show=False)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["tiny_cv", "tiny_cv_wide"]
    import matplotlib.pyplot as plt

    plt.close("all")


def test_validation_inside_folds_comes_from_training_data(data):
    adata = _fresh(data)
    sthisto.tl.cross_validate(adata, TinyCV, split="section", folds=["S02"], validation=0.3, **FAST)
    trained_on = json.loads(adata.uns["sthisto"]["cross_validate"]["cv_tiny_cv"]["folds"]["S02"]["trained_on"])
    assert trained_on["libraries"] == ["S01", "S03"] and trained_on["n_validation_spots"] > 0


def test_results_survive_h5ad(data, tmp_path):
    adata = _fresh(data)
    table = sthisto.tl.cross_validate(adata, TinyCV, split="section", folds=["S01"], **FAST)
    adata.write_h5ad(tmp_path / "cv.h5ad")
    back = ad.read_h5ad(tmp_path / "cv.h5ad")
    pd.testing.assert_frame_equal(sthisto.tl.get_metrics(back, "cv_tiny_cv"), table)
    again = sthisto.tl.evaluate(back, predicted="cv_tiny_cv", key_added="again", **FAST["evaluate_params"])
    held = table[table["evaluated_on"] == "held_out"]
    np.testing.assert_allclose(again["value"].to_numpy(), held["value"].to_numpy(), atol=1e-6, equal_nan=True)


def _registered(candidates):
    available = set(sthisto.models.list_models())
    return [name for name in candidates if name in available]


@pytest.mark.parametrize(
    "method",
    [pytest.param(m) for m in _registered(["ridge"])]
    + [
        pytest.param(m, marks=pytest.mark.slow)
        for m in _registered(["thitogene_tiny", "hggef_tiny", "histospace_tiny"])[:1]
    ]
    or [pytest.param(TinyCV)],
)
def test_registered_methods(data, method):
    adata = _fresh(data)
    table = sthisto.tl.cross_validate(adata, method, split="patient", max_epochs=1, **FAST)
    pearson = table.query("scope == 'overall' and metric == 'pearson_gene_mean'")["value"].iloc[0]
    assert np.isfinite(pearson)
    key = next(k for k in adata.layers if k.startswith("cv_"))
    assert np.isfinite(np.asarray(adata.layers[key])).all()


@pytest.mark.slow
def test_parallel_folds_match_sequential(data):
    """Two spawned workers (Lightning inside each) give the same out-of-fold predictions.

    Equal to float rounding: a fresh worker process and a parent that already ran other
    computations may order float reductions differently (seen: 2e-7 after other tests ran).
    """
    adata = _fresh(data)
    sthisto.tl.cross_validate(adata, TinyCV, split="patient", key_added="seq", **FAST)
    sthisto.tl.cross_validate(adata, TinyCV, split="patient", key_added="par", n_jobs=2, devices=["cpu", "cpu"], **FAST)
    np.testing.assert_allclose(adata.layers["seq"], adata.layers["par"], rtol=1e-5, atol=1e-6)
    folds = adata.uns["sthisto"]["cross_validate"]["par"]["folds"]
    assert {info["device"] for info in folds.values()} == {"cpu"}
