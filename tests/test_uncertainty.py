"""Uncertainty: ensembles, Monte-Carlo dropout, ZINB spread, conformal calibration, evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sthisto
from sthisto._errors import InputError, KeyExistsError, MissingKeyError
from sthisto.tl._calibrate import conformal_quantiles
from sthisto.tl._uncertainty import zinb_moments

torch.set_num_threads(1)


def _with_features(adata):
    """Ridge on the generator's own morphology: fast (no images) and well specified."""
    adata.obsm["morph"] = np.nan_to_num(np.asarray(adata.obsm["synthetic_morphology"], dtype=np.float32))
    return adata


@pytest.fixture(scope="module")
def sections():
    return _with_features(sthisto.datasets.synthetic(n_sections=4, n_patients=1, n_spots=80, n_genes=10, seed=5))


def _overall(table, metric):
    return float(table[(table["scope"] == "overall") & (table["metric"] == metric)]["value"].item())


def test_conformal_quantile_uses_the_finite_sample_rank():
    scores = np.arange(1.0, 10.0)[:, None]  # n = 9
    q = conformal_quantiles(scores, [0.5, 0.9, 0.95])
    # ceil(10 * 0.5) = 5th, ceil(10 * 0.9) = 9th smallest; 0.95 needs the 10th of 9 → infinite.
    assert q[:, 0].tolist() == [5.0, 9.0, np.inf]


def test_zinb_moments_match_sampling():
    rng = np.random.default_rng(0)
    mu, theta, pi = 4.0, 2.0, 0.3
    nb = rng.poisson(rng.gamma(theta, mu / theta, size=400_000))
    draws = np.where(rng.random(nb.shape) < pi, 0, nb)
    mean, variance = zinb_moments(np.array(mu), np.array(theta), np.array(pi))
    assert mean == pytest.approx(draws.mean(), rel=0.01)
    assert variance == pytest.approx(draws.var(), rel=0.02)


def test_section_level_coverage_of_90_percent_intervals():
    """Calibrated on whole sections, 90% intervals cover 90% ± 3 points of held-out sections."""
    coverages, relative_width = [], {True: [], False: []}
    for seed in range(5):
        adata = _with_features(
            sthisto.datasets.synthetic(n_sections=6, n_patients=1, n_spots=100, n_genes=16, seed=seed)
        )
        sthisto.tl.train(adata, "ridge", features_key="morph", train_mask=["S01", "S02"], progress=False)
        sthisto.tl.calibrate(adata, "ridge", calibration=["S03", "S04"])
        test = adata[adata.obs["library_id"].isin(["S05", "S06"])].copy()
        sthisto.tl.predict(test, "ridge", interval=0.9)
        table = sthisto.tl.evaluate(test, predicted="ridge")
        coverages.append(_overall(table, "coverage"))
        per_gene = test.uns["sthisto"]["evaluate"]["ridge"]["per_gene"]
        per_gene = per_gene[per_gene["group"] == "S05"]
        dependent = test.var.loc[per_gene["gene"], "synthetic_dependent"].to_numpy(dtype=bool)
        # Width relative to the gene's own spread of observed targets: the image explains part of
        # a dependent gene, nothing of an independent one.
        target = _targets(test, per_gene["gene"].tolist())
        ratio = per_gene["interval_width"].to_numpy() / target.std(axis=0)
        for flag in (True, False):
            relative_width[flag].extend(ratio[dependent == flag])
    assert abs(np.mean(coverages) - 0.9) <= 0.03, coverages
    assert np.mean(relative_width[False]) > np.mean(relative_width[True])


def _targets(adata, genes):
    from sthisto.tl._train import _targets as targets

    rows = np.flatnonzero(adata.obs["library_id"].to_numpy() == "S05")
    values, _, _ = targets(adata, rows, genes, layer=None, variant="log10_1e4", need_counts=False)
    return np.asarray(values)


def test_ensemble_spread_flags_spots_outside_the_training_range():
    """Spots whose image features lie outside the training data get larger spread and larger errors."""
    rho, ratio = [], []
    for seed in range(3):
        adata = sthisto.datasets.synthetic(n_sections=3, n_patients=1, n_spots=100, n_genes=16, seed=seed)
        features = np.nan_to_num(np.asarray(adata.obsm["synthetic_morphology"], dtype=np.float32))
        test_rows = np.flatnonzero(adata.obs["library_id"].to_numpy() == "S03")
        shifted = test_rows[::2]
        centre = np.delete(features, test_rows, axis=0).mean(axis=0)
        features[shifted] = centre + 4 * (features[shifted] - centre)
        adata.obsm["morph"] = features
        sthisto.tl.train(adata, "ridge", features_key="morph", train_mask=["S01", "S02"], n_members=5, progress=False)
        test = adata[test_rows].copy()
        sthisto.tl.predict(test, "ridge", uncertainty="ensemble")
        rho.append(_overall(sthisto.tl.evaluate(test, predicted="ridge"), "spearman_error_spread"))
        spread = test.layers["ridge_std"]
        ratio.append(spread[::2].mean() / spread[1::2].mean())
    assert np.mean(rho) > 0.1, rho
    assert min(ratio) > 2, ratio


def test_ensemble_members_share_the_training_path_and_persist(sections, tmp_path):
    import anndata as ad

    sections = sections.copy()
    model = sthisto.tl.train(
        sections, "ridge", features_key="morph", train_mask=["S01", "S02"], n_members=3, progress=False
    )
    assert len(model.members) == 2
    info = model.trained_on["ensemble"]
    assert info["seeds"] == [0, 1000, 2000] and info["bootstrap_sections"]  # ridge bootstraps by default
    sthisto.tl.calibrate(sections, "ridge", calibration=["S03"], uncertainty="ensemble")
    test = sections[sections.obs["library_id"] == "S04"].copy()
    sthisto.tl.predict(test, "ridge", uncertainty="ensemble", interval=0.9)
    assert (test.layers["ridge_std"] > 0).mean() > 0.9
    assert (test.layers["ridge_lower"] <= test.layers["ridge"]).all()
    assert (test.layers["ridge"] <= test.layers["ridge_upper"]).all()

    sections.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    again = test.copy()
    sthisto.tl.predict(again, sthisto.tl.get_model(back, "ridge"), key_added="r", uncertainty="ensemble", interval=0.9)
    sthisto.tl.get_model(back, "ridge").save(tmp_path / "m")
    loaded = sthisto.io.load_model(tmp_path / "m")
    assert len(loaded.members) == 2 and sorted(loaded.calibration) == ["absolute", "ensemble"]
    sthisto.tl.predict(again, tmp_path / "m", key_added="s", uncertainty="ensemble", interval=0.9)
    for suffix in ("", "_std", "_lower", "_upper"):
        np.testing.assert_array_equal(again.layers[f"r{suffix}"], test.layers[f"ridge{suffix}"])
        np.testing.assert_array_equal(again.layers[f"s{suffix}"], test.layers[f"ridge{suffix}"])


def test_calibrating_a_saved_model_updates_its_folder(sections, tmp_path):
    sections = sections.copy()
    model = sthisto.tl.train(sections, "ridge", features_key="morph", train_mask=["S01"], store=False)
    model.save(tmp_path / "m")
    sthisto.tl.calibrate(sections, tmp_path / "m", calibration=["S02"], alpha=0.2)
    loaded = sthisto.io.load_model(tmp_path / "m")
    assert 0.8 in loaded.calibration["absolute"]["levels"]
    assert loaded.calibration["absolute"]["libraries"] == ["S02"]


def test_refusals_leave_data_unchanged(sections):
    adata = sections.copy()
    sthisto.tl.train(adata, "ridge", features_key="morph", train_mask=["S01", "S02"], key_added="one")
    layers = set(adata.layers)
    with pytest.raises(InputError, match="n_members"):
        sthisto.tl.predict(adata, "one", uncertainty="ensemble")
    with pytest.raises(MissingKeyError, match="calibrate"):
        sthisto.tl.predict(adata, "one", interval=0.9)
    with pytest.raises(InputError, match="used to train"):
        sthisto.tl.calibrate(adata, "one", calibration=["S02"])
    with pytest.raises(InputError, match="no active dropout"):
        sthisto.tl.predict(adata, "one", uncertainty="dropout")
    with pytest.raises(InputError, match="spread mode"):
        sthisto.tl.predict(adata, "one", uncertainty="bayes")
    assert set(adata.layers) == layers
    sthisto.tl.calibrate(adata, "one", calibration=["S03"])
    with pytest.raises(InputError, match="not calibrated"):
        sthisto.tl.predict(adata, "one", interval=0.85)
    with pytest.raises(KeyExistsError):
        sthisto.tl.calibrate(adata, "one", calibration=["S04"])
    assert set(adata.layers) == layers


def test_mc_dropout_is_repeatable_for_a_seed():
    adata = sthisto.datasets.synthetic(n_sections=2, n_spots=30, n_genes=5, seed=1)
    sthisto.tl.train(adata, "thitogene_tiny", train_mask=["S01"], max_epochs=1, progress=False)
    for key, seed in (("a", 3), ("b", 3), ("c", 4)):
        torch.manual_seed(100 + seed if key == "b" else seed)  # the global stream must not matter
        sthisto.tl.predict(adata, "thitogene_tiny", key_added=key, uncertainty="dropout", n_samples=3, seed=seed)
    np.testing.assert_array_equal(adata.layers["a_std"], adata.layers["b_std"])
    assert (adata.layers["a_std"] > 0).all()
    assert not np.array_equal(adata.layers["a_std"], adata.layers["c_std"])
    sthisto.tl.predict(adata, "thitogene_tiny", key_added="plain")
    assert not np.allclose(adata.layers["plain"], adata.layers["a"])  # dropout was on in the passes
    record = adata.uns["sthisto"]["predict"]["a"]
    assert record["uncertainty"] == "dropout" and int(record["n_samples"]) == 3


def test_hggef_predictive_distribution():
    adata = sthisto.datasets.synthetic(n_sections=2, n_spots=30, n_genes=5, seed=2)
    sthisto.tl.train(adata, "hggef_tiny", train_mask=["S01"], max_epochs=1, progress=False)
    sthisto.tl.predict(adata, "hggef_tiny", uncertainty="distribution")
    mean, var, pi = (adata.layers[f"hggef_tiny_{k}"] for k in ("count_mean", "count_var", "dropout_prob"))
    assert (mean > 0).all() and ((pi > 0) & (pi < 1)).all()
    assert (var >= mean * (1 - pi) * 0.999).all()  # at least Poisson-like, (1 - pi) mu
    assert (adata.layers["hggef_tiny_std"] > 0).all()
    sthisto.tl.predict(adata, "hggef_tiny", key_added="plain")
    np.testing.assert_allclose(adata.layers["hggef_tiny"], adata.layers["plain"], atol=1e-5)


def test_cross_validate_calibrates_inside_each_fold(sections):
    adata = sections.copy()
    table = sthisto.tl.cross_validate(
        adata,
        "ridge",
        features_key="morph",
        n_members=3,
        uncertainty="ensemble",
        interval=0.9,
        calibration="section",
        progress=False,
    )
    for suffix in ("std", "lower", "upper"):
        assert np.isfinite(adata.layers[f"cv_ridge_{suffix}"]).all()
    folds = adata.uns["sthisto"]["cross_validate"]["cv_ridge"]["folds"]
    for fold, info in folds.items():
        held = list(info["calibration_libraries"])
        assert len(held) == 1 and held[0] != fold  # a training section, never the test one
        assert int(info["n_train_spots"]) + int(info["n_calibration_spots"]) == adata.n_obs - int(info["n_test_spots"])
    coverage = _overall(table, "coverage")
    assert 0.75 < coverage <= 1.0
    with pytest.raises(InputError, match="calibration"):
        sthisto.tl.cross_validate(adata, "ridge", features_key="morph", interval=0.9, key_added="x", progress=False)


def test_evaluate_coverage_matches_the_layers(sections):
    adata = sections.copy()
    sthisto.tl.train(adata, "ridge", features_key="morph", train_mask=["S01", "S02"], n_members=3)
    sthisto.tl.calibrate(adata, "ridge", calibration=["S03"], uncertainty="ensemble")
    test = adata[adata.obs["library_id"] == "S04"].copy()
    sthisto.tl.predict(test, "ridge", uncertainty="ensemble", interval=0.9)
    table = sthisto.tl.evaluate(test, predicted="ridge")
    observed = _targets_all(test)
    inside = (test.layers["ridge_lower"] <= observed) & (observed <= test.layers["ridge_upper"])
    assert _overall(table, "coverage") == pytest.approx(inside.mean())
    width = test.layers["ridge_upper"] - test.layers["ridge_lower"]
    assert _overall(table, "interval_width_mean") == pytest.approx(width.mean(), rel=1e-5)
    curve = test.uns["sthisto"]["evaluate"]["ridge"]["calibration_curve"]
    at_90 = curve[(curve["group"] == "overall") & (curve["level"] == 0.9)]["observed"].item()
    assert at_90 == pytest.approx(inside.mean())
    assert sorted(curve["level"].unique()) == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def _targets_all(adata):
    from sthisto.tl._train import _targets as targets

    values, _, _ = targets(
        adata, np.arange(adata.n_obs), list(adata.var_names), layer=None, variant="log10_1e4", need_counts=False
    )
    return np.asarray(values)


def test_plots_of_uncertainty(sections, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adata = sections.copy()
    sthisto.tl.train(adata, "ridge", features_key="morph", train_mask=["S01", "S02"], n_members=3)
    sthisto.tl.calibrate(adata, "ridge", calibration=["S03"], uncertainty="ensemble")
    test = adata[adata.obs["library_id"] == "S04"].copy()
    sthisto.tl.predict(test, "ridge", uncertainty="ensemble", interval=0.9)
    sthisto.tl.evaluate(test, predicted="ridge")
    gene = str(test.var_names[0])
    fig = sthisto.pl.uncertainty_maps(test, gene, key="ridge", save=tmp_path / "maps.png", return_fig=True)
    assert [ax.get_title() for ax in fig.axes[:3]] == [f"ridge: {gene}", "spread (std)", "interval width"]
    width = fig.axes[2].collections[0].get_array()
    np.testing.assert_allclose(width, (test.layers["ridge_upper"] - test.layers["ridge_lower"])[:, 0], rtol=1e-6)
    fig = sthisto.pl.calibration_curve(test, "ridge", return_fig=True)
    line = fig.axes[0].lines[-1]
    assert list(line.get_xdata()) == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    fig = sthisto.pl.error_vs_spread(test, "ridge", n_bins=4, return_fig=True)
    assert len(fig.axes[0].lines[0].get_xdata()) == 4
    assert (tmp_path / "maps.png").stat().st_size > 0
    plt.close("all")
    with pytest.raises(MissingKeyError, match="uncertainty="):
        sthisto.pl.error_vs_spread(adata, "ridge")


def test_cli_calibrate_and_predict_with_intervals(sections, tmp_path):
    import anndata as ad

    from sthisto.cli import main

    adata = sections.copy()
    model = sthisto.tl.train(adata, "ridge", features_key="morph", train_mask=["S01", "S02"], n_members=3)
    model.save(tmp_path / "model")
    adata.write_h5ad(tmp_path / "in.h5ad")
    assert main(["calibrate", str(tmp_path / "in.h5ad"), "--model", str(tmp_path / "model"),
                 "--calibration-libraries", "S03", "--uncertainty", "ensemble", "-q"]) == 0  # fmt: skip
    assert main(["predict", str(tmp_path / "in.h5ad"), "--model", str(tmp_path / "model"), "-o",
                 str(tmp_path / "out.h5ad"), "--key-added", "p", "--uncertainty", "ensemble", "--interval", "0.9",
                 "-q"]) == 0  # fmt: skip
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert {"p", "p_std", "p_lower", "p_upper"} <= set(out.layers)
    assert out.uns["sthisto"]["predict"]["p"]["interval"]["conformal"] == "normalized"
    # A model stored in the AnnData needs -o to keep its calibration.
    assert main(["calibrate", str(tmp_path / "in.h5ad"), "--model", "ridge", "--calibration-libraries", "S03",
                 "-q"]) == 2  # fmt: skip


def test_distributed_prediction_refuses_an_ensemble(sections):
    adata = sections.copy()
    sthisto.tl.train(adata, "ridge", features_key="morph", train_mask=["S01"], n_members=2)
    with pytest.raises(InputError, match="ensemble of 2 members"):
        sthisto.tl.predict_distributed(adata, "ridge")
    assert "ridge" not in adata.layers


def test_replacing_a_prediction_drops_its_old_intervals(sections):
    adata = sections.copy()
    sthisto.tl.train(adata, "ridge", features_key="morph", train_mask=["S01"])
    sthisto.tl.calibrate(adata, "ridge", calibration=["S02"])
    sthisto.tl.predict(adata, "ridge", interval=0.9)
    assert "ridge_upper" in adata.layers
    sthisto.tl.predict(adata, "ridge", overwrite=True)
    assert "ridge_upper" not in adata.layers and "ridge_lower" not in adata.layers
    with pytest.raises(MissingKeyError, match="calibration"):
        sthisto.tl.calibrate(adata, "ridge", calibration=["S09"], overwrite=True)


TINY = sorted(name for name in sthisto.models.list_models() if name.endswith("_tiny"))


@pytest.mark.parametrize("method", TINY)
def test_every_method_gives_an_ensemble_spread_and_conformal_intervals(method):
    adata = sthisto.datasets.synthetic(n_sections=3, n_spots=30, n_genes=4, seed=4)
    model = sthisto.tl.train(adata, method, train_mask=["S01"], n_members=2, max_epochs=1, progress=False)
    sthisto.tl.calibrate(adata, method, calibration=["S02"], uncertainty="ensemble")
    test = adata[adata.obs["library_id"] == "S03"].copy()
    sthisto.tl.predict(test, method, uncertainty="ensemble", interval=0.9)
    point, spread = test.layers[method], test.layers[f"{method}_std"]
    lower, upper = test.layers[f"{method}_lower"], test.layers[f"{method}_upper"]
    assert np.isfinite(spread).all() and (spread > 0).any()
    assert (lower <= point).all() and (point <= upper).all() and np.isfinite(upper).all()
    members = [sthisto.tl.get_model(adata, method), *sthisto.tl.get_model(adata, method).members]
    each = np.stack([m.predict_network(test) for m in members])
    np.testing.assert_allclose(point, each.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert len(model.members) == 1
