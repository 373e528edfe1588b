"""tl.evaluate: every metric against scipy / scikit-learn / scikit-image, edge cases, provenance."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import sthisto
from sthisto._errors import InputError, KeyExistsError, MissingKeyError
from sthisto.tl._evaluate import (
    cluster_scores,
    group_metrics,
    kmeans_clusters,
    labelled_spots,
    leiden_clusters,
    pearson_columns,
    spearman_columns,
    ssim_columns,
)

TOL = 1e-6


def _pair(n_spots=49, n_genes=6, seed=0):
    rng = np.random.default_rng(seed)
    observed = rng.gamma(2.0, size=(n_spots, n_genes))
    predicted = 0.6 * observed + rng.normal(scale=0.7, size=observed.shape) + 0.5
    return observed, predicted


def _adata(n_per_section=(49, 36), n_genes=6, seed=0, labels=True):
    rng = np.random.default_rng(seed)
    n = sum(n_per_section)
    domains = rng.integers(0, 3, size=n)
    observed = rng.gamma(2.0, size=(n, n_genes))
    observed[np.arange(n), domains % n_genes] += 4.0  # each domain raises one gene: clusters to find
    predicted = 0.6 * observed + rng.normal(scale=0.7, size=observed.shape) + 0.5
    libraries = np.repeat([f"S{i}" for i in range(len(n_per_section))], n_per_section)
    obs = pd.DataFrame({"library_id": pd.Categorical(libraries)}, index=[f"spot{i}" for i in range(n)])
    if labels:
        names = np.array(["tumour", "stroma", "immune"], dtype=object)[domains]
        names[:4] = ["Undetermined", "undetermined", "UNDETERMINED", None]
        obs["label"] = names
    adata = ad.AnnData(
        X=np.zeros((n, n_genes), dtype=np.float32),
        obs=obs,
        var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]),
        layers={"observed": observed.astype(np.float64), "predicted": predicted.astype(np.float64)},
    )
    return adata


def _value(table, group, metric):
    rows = table[(table["group"] == group) & (table["metric"] == metric)]
    assert len(rows) == 1, (group, metric)
    return float(rows["value"].iloc[0])


# --- kernels -------------------------------------------------------------------------------------------
def test_pearson_and_spearman_match_scipy():
    observed, predicted = _pair()
    r = pearson_columns(observed, predicted)
    rho = spearman_columns(np.round(observed), np.round(predicted * 2))  # integer values: ties
    for j in range(observed.shape[1]):
        assert abs(r[j] - stats.pearsonr(observed[:, j], predicted[:, j])[0]) < TOL
        expected = stats.spearmanr(np.round(observed[:, j]), np.round(predicted[:, j] * 2))[0]
        assert abs(rho[j] - expected) < TOL


def test_ssim_matches_scikit_image_single_window():
    from skimage.metrics import structural_similarity

    observed, predicted = _pair(n_spots=49)
    predicted = np.abs(predicted)
    ours = ssim_columns(observed, predicted)
    for j in range(observed.shape[1]):
        # one 7 x 7 window over a 7 x 7 image = a global SSIM over all 49 values (order-free)
        x = (observed[:, j] / observed[:, j].max()).reshape(7, 7)
        y = (predicted[:, j] / predicted[:, j].max()).reshape(7, 7)
        expected = structural_similarity(
            x, y, win_size=7, data_range=1.0, use_sample_covariance=False, gaussian_weights=False, K1=0.01, K2=0.03
        )
        assert abs(ours[j] - expected) < TOL
    # spot order does not change a global SSIM
    order = np.random.default_rng(1).permutation(49)
    assert np.allclose(ssim_columns(observed[order], predicted[order]), ours, atol=1e-12)
    # identical maps have SSIM 1 whatever their scale (each vector is divided by its maximum)
    assert np.allclose(ssim_columns(observed, 3 * observed), 1.0)


def test_ssim_is_undefined_below_two_spots():
    observed, predicted = _pair(n_spots=1, n_genes=4)
    assert np.isnan(ssim_columns(np.abs(observed), np.abs(predicted) + 1.0)).all()
    assert np.isnan(ssim_columns(np.zeros((0, 3)), np.zeros((0, 3)))).all()
    assert np.isfinite(ssim_columns(*_pair(n_spots=2, n_genes=4))).all()


def test_ssim_scores_a_never_positive_prediction_as_the_zero_map():
    observed, _ = _pair(n_spots=40, n_genes=3)
    rng = np.random.default_rng(4)
    never_positive = np.column_stack([np.zeros(40), -rng.gamma(2.0, size=40), np.full(40, -1.0)])
    ours = ssim_columns(observed, never_positive)
    scaled = observed / observed.max(axis=0)
    c1, c2 = 0.01**2, 0.03**2
    expected = (c1 * c2) / ((scaled.mean(axis=0) ** 2 + c1) * (scaled.var(axis=0) + c2))
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    assert (ours < 0.01).all()
    # an observed map that is never positive has nothing to scale: undefined
    assert np.isnan(ssim_columns(np.zeros((40, 1)), observed[:, :1])).all()


def test_group_metrics_match_scipy_and_sklearn():
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    observed, predicted = _pair(n_spots=30, n_genes=5)
    genes = [f"G{j}" for j in range(5)]
    metrics, per_gene = group_metrics(observed, predicted, genes=genes)
    gene_r = [stats.pearsonr(observed[:, j], predicted[:, j])[0] for j in range(5)]
    spot_r = [stats.pearsonr(observed[i], predicted[i])[0] for i in range(30)]
    gene_rho = [stats.spearmanr(observed[:, j], predicted[:, j])[0] for j in range(5)]
    assert abs(metrics["pearson_gene_mean"] - np.mean(gene_r)) < TOL
    assert abs(metrics["pearson_gene_median"] - np.median(gene_r)) < TOL
    assert abs(metrics["spearman_gene_mean"] - np.mean(gene_rho)) < TOL
    assert abs(metrics["pearson_spot_mean"] - np.mean(spot_r)) < TOL
    assert abs(metrics["pearson_spot_median"] - np.median(spot_r)) < TOL
    assert abs(metrics["mse"] - mean_squared_error(observed, predicted)) < TOL
    assert abs(metrics["mae"] - mean_absolute_error(observed, predicted)) < TOL
    assert abs(metrics["rmse"] - np.sqrt(mean_squared_error(observed, predicted))) < TOL
    assert np.allclose(per_gene["pearson"], gene_r, atol=TOL)
    assert np.allclose(per_gene["mse"], ((predicted - observed) ** 2).mean(axis=0), atol=TOL)
    assert list(per_gene["gene"]) == genes


def test_cluster_scores_match_an_independent_sklearn_pipeline():
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.preprocessing import StandardScaler

    adata = _adata(n_per_section=(60,), n_genes=8)
    predicted = adata.layers["predicted"]
    labels = adata.obs["label"].to_numpy()
    scores = cluster_scores(predicted, labels, kmeans_n_init=5, leiden_connectivities="gauss", n_neighbors=10)

    keep = np.array([lab is not None and str(lab).lower() != "undetermined" for lab in labels])
    assert (keep == labelled_spots(labels)).all() and keep.sum() == 56
    scaled = StandardScaler().fit_transform(predicted[keep])
    embedding = PCA(n_components=8, svd_solver="full", random_state=0).fit_transform(scaled)
    k = len(set(labels[keep]))
    clusters = KMeans(n_clusters=k, init="k-means++", n_init=5, random_state=0).fit_predict(embedding)
    assert scores["n_labels"] == k == 3
    assert scores["n_spots_labelled"] == 56
    assert abs(scores["ari_kmeans"] - adjusted_rand_score(labels[keep].astype(str), clusters)) < TOL
    assert abs(scores["nmi_kmeans"] - normalized_mutual_info_score(labels[keep].astype(str), clusters)) < TOL
    assert scores["ari_kmeans"] > 0.2  # the labels follow the expression: clusters recover them in part
    assert np.isfinite(scores["ari_leiden"]) and scores["n_leiden_clusters"] >= 1


def test_leiden_runs_on_the_leidenalg_package(monkeypatch):
    import igraph
    import leidenalg

    calls = []
    real = leidenalg.find_partition
    monkeypatch.setattr(leidenalg, "find_partition", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(igraph.Graph, "community_leiden", lambda *a, **k: pytest.fail("igraph's own Leiden ran"))
    embedding = np.random.default_rng(0).normal(size=(40, 4))
    labels = leiden_clusters(embedding, n_neighbors=8, connectivities="gauss", seed=2)
    assert len(calls) == 1 and calls[0]["seed"] == 2 and calls[0]["n_iterations"] == -1
    assert labels.shape == (40,) and labels.min() == 0


def test_clustering_is_seeded():
    embedding = np.random.default_rng(0).normal(size=(40, 4))
    assert (kmeans_clusters(embedding, 3, n_init=3, seed=1) == kmeans_clusters(embedding, 3, n_init=3, seed=1)).all()
    first = leiden_clusters(embedding, n_neighbors=8, connectivities="gauss", seed=2)
    assert (first == leiden_clusters(embedding, n_neighbors=8, connectivities="gauss", seed=2)).all()
    with pytest.raises(InputError, match="connectivities"):
        leiden_clusters(embedding, connectivities="knn")


# --- evaluate on AnnData ---------------------------------------------------------------------------------
def test_evaluate_per_section_and_overall():
    adata = _adata()
    table = sthisto.tl.evaluate(adata, predicted="predicted", observed="observed")
    columns = ["predicted", "weights", "random_weights", "recipe", "group", "scope", "metric", "value", "gene_mean"]
    columns.append("genes")
    assert list(table.columns) == columns
    assert table["gene_mean"].isna().all()  # no predict record: the training mean is unknown
    assert set(table["recipe"]) == {"unknown"}
    assert set(table["weights"]) == {"unknown"}  # layers without a predict record: origin not known
    assert set(table.loc[table["metric"].isin(["pearson_gene_mean", "ssim_mean", "mse"]), "genes"]) == {"all 6"}
    assert set(table.loc[table["metric"] == "n_spots", "genes"]) == {""}
    sections = {"S0": slice(0, 49), "S1": slice(49, 85)}
    for group, rows in sections.items():
        x, y = adata.layers["observed"][rows], adata.layers["predicted"][rows]
        expected = np.mean([stats.pearsonr(x[:, j], y[:, j])[0] for j in range(6)])
        assert abs(_value(table, group, "pearson_gene_mean") - expected) < TOL
        assert _value(table, group, "n_spots") == x.shape[0]
    overall = np.mean([_value(table, g, "pearson_gene_mean") for g in sections])
    assert abs(_value(table, "overall", "pearson_gene_mean") - overall) < TOL
    assert _value(table, "overall", "n_spots") == 85
    assert _value(table, "overall", "n_genes") == 6
    assert _value(table, "overall", "n_groups") == 2

    entry = adata.uns["sthisto"]["evaluate"]["predicted"]
    assert entry["observed"] == "layers['observed']"
    assert "overall = unweighted mean over groups" in entry["aggregation"]
    assert entry["protocol"]["source"] == "unknown"
    assert set(entry["per_gene"]["group"]) == {"S0", "S1"} and len(entry["per_gene"]) == 12
    pd.testing.assert_frame_equal(sthisto.tl.get_metrics(adata, "predicted"), table)


def test_evaluate_by_none_and_gene_subset():
    adata = _adata()
    table = sthisto.tl.evaluate(adata, predicted="predicted", observed="observed", by=None, genes=["G1", "G3"])
    x, y = adata.layers["observed"][:, [1, 3]], adata.layers["predicted"][:, [1, 3]]
    expected = np.mean([stats.pearsonr(x[:, j], y[:, j])[0] for j in range(2)])
    assert abs(_value(table, "all", "pearson_gene_mean") - expected) < TOL
    assert _value(table, "all", "n_genes") == 2


def test_constant_genes_are_counted_not_silently_dropped():
    adata = _adata()
    adata.layers["observed"][:49, 0] = 2.0  # constant observed in S0
    adata.layers["predicted"][49:, 1] = -1.0  # constant (and negative) predicted in S1
    table = sthisto.tl.evaluate(adata, predicted="predicted", observed="observed")
    assert _value(table, "S0", "n_genes_constant_observed") == 1
    assert _value(table, "S0", "n_genes_pearson_undefined") == 1
    assert _value(table, "S1", "n_genes_constant_predicted") == 1
    # never positive: scored as the all-zero map, not dropped from SSIM
    assert _value(table, "S1", "n_genes_predicted_never_positive") == 1
    assert _value(table, "S1", "n_genes_ssim_undefined") == 0
    assert _value(table, "overall", "n_genes_pearson_undefined") == 2
    x, y = adata.layers["observed"][:49], adata.layers["predicted"][:49]
    expected = np.mean([stats.pearsonr(x[:, j], y[:, j])[0] for j in range(1, 6)])
    assert abs(_value(table, "S0", "pearson_gene_mean") - expected) < TOL
    per_gene = sthisto.tl.get_metrics(adata, "predicted", per_gene=True)
    row = per_gene[(per_gene["group"] == "S0") & (per_gene["gene"] == "G0")].iloc[0]
    assert np.isnan(row["pearson"]) and bool(row["constant_observed"])


def test_single_spot_section():
    adata = _adata(n_per_section=(40, 1), labels=False)
    table = sthisto.tl.evaluate(adata, predicted="predicted", observed="observed")
    assert _value(table, "S1", "n_spots") == 1
    assert np.isnan(_value(table, "S1", "pearson_gene_mean"))
    assert _value(table, "S1", "n_genes_pearson_undefined") == 6
    # one spot has no map: SSIM is undefined and counted (it used to score 1.0 for any positive prediction)
    assert np.isnan(_value(table, "S1", "ssim_mean"))
    assert _value(table, "S1", "n_genes_ssim_undefined") == 6
    assert _value(table, "overall", "ssim_mean") == pytest.approx(_value(table, "S0", "ssim_mean"))
    x, y = adata.layers["observed"][40], adata.layers["predicted"][40]
    assert abs(_value(table, "S1", "mse") - np.mean((x - y) ** 2)) < TOL
    assert abs(_value(table, "S1", "pearson_spot_mean") - stats.pearsonr(x, y)[0]) < TOL
    # the overall mean skips the undefined section rather than becoming NaN
    assert abs(_value(table, "overall", "pearson_gene_mean") - _value(table, "S0", "pearson_gene_mean")) < TOL


def test_a_model_predicting_nothing_for_a_gene_does_not_lift_ssim():
    adata = _adata(labels=False)
    honest = sthisto.tl.evaluate(adata, predicted="predicted", observed="observed", key_added="honest")
    adata.layers["predicted"][:49, 2] = 0.0  # gives up on G2 in S0
    adata.layers["predicted"][:49, 4] = -adata.layers["observed"][:49, 4]  # negative, varying
    table = sthisto.tl.evaluate(adata, predicted="predicted", observed="observed")
    per_gene = sthisto.tl.get_metrics(adata, "predicted", per_gene=True).set_index(["group", "gene"])
    assert per_gene.loc[("S0", "G2"), "ssim"] < 0.01 and per_gene.loc[("S0", "G4"), "ssim"] < 0.01
    assert bool(per_gene.loc[("S0", "G2"), "predicted_never_positive"])
    assert _value(table, "S0", "n_genes_predicted_never_positive") == 2
    assert _value(table, "S0", "n_genes_ssim_undefined") == 0
    s0 = per_gene.loc["S0", "ssim"]
    assert _value(table, "S0", "ssim_mean") == pytest.approx(s0.mean())  # over all six genes
    assert _value(table, "S0", "ssim_mean") < _value(honest, "S0", "ssim_mean")


def test_the_table_says_which_genes_each_mean_covers():
    adata = _adata(labels=False)
    adata.layers["predicted"][49:, 1] = 0.5  # constant in S1: no Pearson r, but an SSIM
    adata.layers["observed"][:49, 3] = 0.0  # never expressed in S0: neither
    table = sthisto.tl.evaluate(adata, predicted="predicted", observed="observed")

    def genes(group, metric):
        return table.loc[(table["group"] == group) & (table["metric"] == metric), "genes"].item()

    assert genes("S1", "pearson_gene_mean") == genes("S1", "spearman_gene_median") == "5 of 6; left out: G1"
    assert genes("S1", "ssim_mean") == "all 6"
    assert genes("S0", "pearson_gene_mean") == genes("S0", "ssim_mean") == "5 of 6; left out: G3"
    assert genes("S1", "mse") == genes("S1", "pearson_spot_mean") == "all 6"
    assert genes("overall", "pearson_gene_mean").startswith("10 of 12 gene x group pairs")
    assert genes("overall", "ssim_mean").startswith("11 of 12 gene x group pairs")
    assert genes("overall", "n_spots") == ""

    coverage = adata.uns["sthisto"]["evaluate"]["predicted"]["gene_coverage"].set_index(["group", "value"])
    assert coverage.loc[("S1", "pearson"), "left_out"] == "G1" and coverage.loc[("S1", "ssim"), "left_out"] == ""
    assert not coverage.loc[("S1", "ssim"), "same_as_pearson"] and coverage.loc[("S0", "ssim"), "same_as_pearson"]
    assert coverage.loc[("S1", "ssim"), "n_covered"] == 6 and coverage.loc[("S1", "pearson"), "n_covered"] == 5


def test_long_lists_of_left_out_genes_are_cut_short_in_the_table():
    adata = _adata(n_per_section=(30,), n_genes=14, labels=False)
    adata.layers["predicted"][:, :12] = 1.0  # constant: no Pearson r for 12 genes
    table = sthisto.tl.evaluate(adata, predicted="predicted", observed="observed")
    text = table.loc[(table["group"] == "S0") & (table["metric"] == "pearson_gene_mean"), "genes"].item()
    assert text.startswith("2 of 14; left out: G0, G1,") and "G9," in text and "G10" not in text
    assert text.endswith("(+2 more: NaN in per_gene['pearson'])")
    coverage = adata.uns["sthisto"]["evaluate"]["predicted"]["gene_coverage"].set_index(["group", "value"])
    assert coverage.loc[("S0", "pearson"), "left_out"].split(", ") == [f"G{j}" for j in range(12)]


def test_unpredicted_spots_and_genes_are_left_out_and_counted():
    adata = _adata(labels=False)
    adata.layers["predicted"][:5] = np.nan  # spots without a prediction (e.g. training spots of a fold)
    adata.layers["predicted"][49:, 2] = np.nan  # a gene not predicted in S1
    table = sthisto.tl.evaluate(adata, predicted="predicted", observed="observed")
    assert _value(table, "S0", "n_spots") == 44 and _value(table, "S0", "n_spots_not_predicted") == 5
    assert _value(table, "S1", "n_genes") == 5 and _value(table, "S1", "n_genes_not_predicted") == 1
    x, y = adata.layers["observed"][5:49], adata.layers["predicted"][5:49]
    expected = np.mean([stats.pearsonr(x[:, j], y[:, j])[0] for j in range(6)])
    assert abs(_value(table, "S0", "pearson_gene_mean") - expected) < TOL


@pytest.mark.parametrize("where", ["observed", "predicted"])
def test_partial_nan_is_refused_and_adata_unchanged(where):
    adata = _adata(labels=False)
    adata.layers[where][3, 1] = np.nan
    before = adata.copy()
    with pytest.raises(InputError, match="NaN"):
        sthisto.tl.evaluate(adata, predicted="predicted", observed="observed")
    assert "sthisto" not in adata.uns
    np.testing.assert_array_equal(adata.layers[where], before.layers[where])


def test_labels_give_ari_and_nmi_per_section():
    adata = _adata(n_per_section=(60, 45), n_genes=8)
    table = sthisto.tl.evaluate(
        adata, predicted="predicted", observed="observed", labels_key="label", kmeans_n_init=5,
        leiden_connectivities="gauss", n_neighbors=10,
    )  # fmt: skip
    rows = slice(60, 105)
    expected = cluster_scores(
        adata.layers["predicted"][rows], adata.obs["label"].to_numpy()[rows], kmeans_n_init=5,
        leiden_connectivities="gauss", n_neighbors=10,
    )  # fmt: skip
    for metric in ("ari_kmeans", "nmi_kmeans", "ari_leiden", "nmi_leiden"):
        assert abs(_value(table, "S1", metric) - expected[metric]) < TOL
    assert _value(table, "S0", "n_spots_labelled") == 56  # four undetermined/missing labels dropped


def test_leiden_default_uses_scanpy_umap_weights():
    adata = _adata(n_per_section=(50,), n_genes=6)
    gauss = sthisto.tl.evaluate(
        adata, predicted="predicted", observed="observed", labels_key="label", kmeans_n_init=2,
        leiden_connectivities="gauss", key_added="gauss",
    )  # fmt: skip
    umap = sthisto.tl.evaluate(adata, predicted="predicted", observed="observed", labels_key="label", kmeans_n_init=2)
    assert adata.uns["sthisto"]["evaluate"]["predicted"]["clustering"]["leiden_connectivities"] == "umap"
    assert np.isfinite(_value(umap, "S0", "ari_leiden"))
    assert _value(umap, "S0", "ari_kmeans") == _value(gauss, "S0", "ari_kmeans")


def test_refusals_leave_adata_unchanged():
    adata = _adata(labels=False)
    with pytest.raises(MissingKeyError, match="observed"):
        sthisto.tl.evaluate(adata, predicted="predicted")  # no provenance record: observed must be given
    with pytest.raises(MissingKeyError, match="layers"):
        sthisto.tl.evaluate(adata, predicted="nope", observed="observed")
    with pytest.raises(MissingKeyError, match="labels_key"):
        sthisto.tl.evaluate(adata, predicted="predicted", observed="observed", labels_key="nope")
    with pytest.raises(InputError, match="n_pcs"):
        sthisto.tl.evaluate(adata, predicted="predicted", observed="observed", n_pcs=0)
    assert "sthisto" not in adata.uns
    sthisto.tl.evaluate(adata, predicted="predicted", observed="observed")
    stored = adata.uns["sthisto"]["evaluate"]["predicted"]["table"].copy()
    adata.layers["predicted"] = adata.layers["predicted"] + 1.0
    with pytest.raises(KeyExistsError):
        sthisto.tl.evaluate(adata, predicted="predicted", observed="observed")
    pd.testing.assert_frame_equal(adata.uns["sthisto"]["evaluate"]["predicted"]["table"], stored)
    changed = sthisto.tl.evaluate(adata, predicted="predicted", observed="observed", overwrite=True)
    assert not changed["value"].equals(stored["value"])


def test_returns_its_table_by_design_and_copy_is_deprecated():
    adata = _adata(labels=False)
    table = sthisto.tl.evaluate(adata, predicted="predicted", observed="observed")
    pd.testing.assert_frame_equal(sthisto.tl.get_metrics(adata, "predicted"), table)
    fresh = _adata(labels=False)
    # The old copy=True kept working for one release: it evaluates a copy and returns it.
    with pytest.warns(FutureWarning, match=r"adata\.copy\(\)"):
        result = sthisto.tl.evaluate(fresh, predicted="predicted", observed="observed", copy=True)
    assert isinstance(result, ad.AnnData) and "sthisto" not in fresh.uns
    assert not sthisto.tl.get_metrics(result, "predicted").empty


def test_stored_results_survive_h5ad(tmp_path):
    adata = _adata(labels=False)
    table = sthisto.tl.evaluate(adata, predicted="predicted", observed="observed")
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    pd.testing.assert_frame_equal(sthisto.tl.get_metrics(back, "predicted"), table)
    assert len(sthisto.tl.get_metrics(back, "predicted", per_gene=True)) == 12
    with pytest.raises(MissingKeyError, match="no stored metrics"):
        sthisto.tl.get_metrics(back, "other")


def test_ambiguous_provenance_asks_for_observed():
    adata = _adata(labels=False)
    store = adata.uns.setdefault("sthisto", {})
    store["predict"] = {"predicted": {"genes": np.array(["G0"]), "target": "log10_1e4"}}
    store["cross_validate"] = {"predicted": {"genes": np.array(["G0"]), "folds": {}, "fold_key": "f"}}
    with pytest.raises(InputError, match="ambiguous"):
        sthisto.tl.evaluate(adata, predicted="predicted")


# --- observed targets recomputed from the predict record (real training) -----------------------------------
def _tiny_method():
    import torch
    from torch import nn

    from sthisto.models import ExpressionModel

    class TinyNet(nn.Module):
        input_keys = ("patches",)

        def __init__(self, n_genes, hidden=4):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, hidden, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
            self.head = nn.Linear(hidden, n_genes)

        def forward(self, patches):
            return {"prediction": self.head(self.features(patches.float() / 255.0).flatten(1))}

    class TinyEval(ExpressionModel):
        name = "tiny_eval"
        input_kind = "pixels"
        network_class = TinyNet
        batching = "spots"
        data_defaults = {"patch_size_px": 16, "patch_size_um": 100.0}
        training_defaults = {"lr": 1e-2, "max_epochs": 2, "batch_size": 32}

    torch.set_num_threads(1)
    return TinyEval


def test_observed_default_matches_the_models_targets():
    adata = sthisto.datasets.synthetic(n_sections=2, n_spots=40, n_genes=8, seed=3)
    genes = list(adata.var_names[:5])
    model = sthisto.tl.train(adata, _tiny_method(), genes=genes, train_mask=["S01"], store=False, progress=False)
    test = adata[adata.obs["library_id"] == "S02"].copy()
    sthisto.tl.predict(test, model, key_added="pred")
    table = sthisto.tl.evaluate(test, predicted="pred")
    # the same target written explicitly: log10(1 + counts / selected-gene sum * 1e4) over the model's genes
    sthisto.pp.normalize(test, variant="log10_1e4", genes=genes, key_added="target")
    explicit = sthisto.tl.evaluate(test, predicted="pred", observed="target", key_added="explicit")
    np.testing.assert_allclose(table["value"].to_numpy(), explicit["value"].to_numpy(), atol=1e-6, equal_nan=True)
    entry = test.uns["sthisto"]["evaluate"]["pred"]
    assert entry["protocol"]["source"] == "predict"
    assert list(entry["protocol"]["evaluated_groups_seen_in_training"]) == []
    assert list(entry["target"]) == ["log10_1e4"]

    # predicting the training section is flagged in the protocol
    train_section = adata[adata.obs["library_id"] == "S01"].copy()
    sthisto.tl.predict(train_section, model, key_added="pred")
    sthisto.tl.evaluate(train_section, predicted="pred")
    protocol = train_section.uns["sthisto"]["evaluate"]["pred"]["protocol"]
    assert list(protocol["evaluated_groups_seen_in_training"]) == ["S01"]
