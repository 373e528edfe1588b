"""The standardise → PCA → per-gene ridge baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from sthisto._errors import InputError
from sthisto.models.ridge import RidgeBaseline


def linear_data(n, p=40, n_genes=4, noise=(0.05,), seed=0):
    """Features with a few informative directions; genes = shared signal + per-gene noise."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)) * rng.uniform(0.5, 3.0, p) + rng.normal(0, 5, p)  # unequal scales, offsets
    weights = rng.normal(size=(p, n_genes))
    signal = X @ weights
    signal = (signal - signal.mean(0)) / signal.std(0)
    noise = np.broadcast_to(np.asarray(noise, dtype=float), (n_genes,))
    Y = 2.0 + signal + rng.normal(size=(n, n_genes)) * noise
    return X, Y, weights


def r2(y, pred):
    return 1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)


def test_recovers_a_linear_signal():
    X, Y, _ = linear_data(400, seed=1)
    model = RidgeBaseline().fit(X[:300], Y[:300])
    assert model.n_components_ == 40  # min(256, 299, 40)
    assert model.cv_scheme_ == "loo"
    assert model.predict(X[300:]).shape == (100, 4)
    assert (r2(Y[300:], model.predict(X[300:])) > 0.99).all()


def test_fewer_spots_than_components():
    X, Y, _ = linear_data(60, p=300, n_genes=3, seed=2)
    model = RidgeBaseline().fit(X[:50], Y[:50])
    assert model.n_components_ == 49  # min(256, 50 - 1, 300)
    assert model.components_.shape == (49, 300)
    prediction = model.predict(X[50:])
    assert prediction.shape == (10, 3) and np.isfinite(prediction).all()


@pytest.mark.parametrize("grouped", [False, True])
def test_alphas_follow_noise_per_gene(grouped):
    # Gene 0 nearly noiseless, gene 1 noisy, gene 2 pure noise.
    X, Y, _ = linear_data(240, p=60, n_genes=3, noise=(0.01, 3.0, 1.0), seed=3)
    Y[:, 2] = np.random.default_rng(4).normal(size=240)
    groups = np.repeat(np.arange(6), 40) if grouped else None
    model = RidgeBaseline().fit(X, Y, groups=groups)
    assert model.cv_scheme_ == ("grouped-kfold(5)" if grouped else "loo")
    assert model.alpha_.shape == (3,)
    assert model.alpha_[0] < model.alpha_[1] <= model.alpha_[2]
    # Nothing to learn for gene 2: its predictions are shrunk towards the mean.
    spread = model.predict(X).std(0) / Y.std(0)
    assert spread[0] > 0.99 and spread[2] < 0.2


def test_grouped_fold_errors_match_scikit_learn():
    X, Y, _ = linear_data(90, p=12, n_genes=2, noise=(0.5, 1.0), seed=5)
    model = RidgeBaseline(alphas=[0.1, 10.0, 1000.0])
    train, valid = np.arange(60), np.arange(60, 90)
    errors = model._fold_errors(X[train], Y[train], X[valid], Y[valid])
    for i, alpha in enumerate(model.alphas):
        reference = Ridge(alpha=alpha).fit(X[train], Y[train]).predict(X[valid])
        np.testing.assert_allclose(errors[i], ((Y[valid] - reference) ** 2).sum(0), rtol=1e-8)


def test_single_group_and_kfold_schemes():
    X, Y, _ = linear_data(80, seed=6)
    assert RidgeBaseline().fit(X, Y, groups=np.zeros(80)).cv_scheme_ == "loo"
    assert RidgeBaseline(cv=4).fit(X, Y).cv_scheme_ == "kfold(4)"
    assert RidgeBaseline(cv=3).fit(X, Y, groups=np.repeat([0, 1, 2, 3], 20)).cv_scheme_ == "grouped-kfold(3)"


def test_state_round_trip_gives_identical_predictions():
    X, Y, _ = linear_data(150, p=30, n_genes=5, noise=(0.1, 0.5, 1.0, 2.0, 0.2), seed=7)
    model = RidgeBaseline(n_components=20).fit(X[:120], Y[:120], groups=np.repeat(np.arange(4), 30))
    state = model.get_state()
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    assert set(arrays) == {
        "feature_mean",
        "feature_scale",
        "pca_mean",
        "components",
        "coef",
        "intercept",
        "alpha",
        "alphas",
    }
    # The non-array part is JSON; arrays survive as plain lists too.
    restored_scalars = json.loads(json.dumps(scalars))
    restored = RidgeBaseline.from_state({**restored_scalars, **arrays})
    assert np.array_equal(restored.predict(X[120:]), model.predict(X[120:]))
    via_lists = RidgeBaseline.from_state({**restored_scalars, **{k: v.tolist() for k, v in arrays.items()}})
    assert np.array_equal(via_lists.predict(X[120:]), model.predict(X[120:]))
    assert np.array_equal(restored.alpha_, model.alpha_)
    assert restored.cv_scheme_ == model.cv_scheme_
    with pytest.raises(InputError, match="format"):
        RidgeBaseline.from_state({**state, "format": "other"})


def test_bad_input_raises():
    X, Y, _ = linear_data(30, seed=8)
    with pytest.raises(InputError, match="rows"):
        RidgeBaseline().fit(X, Y[:20])
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        RidgeBaseline().fit(bad, Y)
    with pytest.raises(InputError, match="not fitted"):
        RidgeBaseline().predict(X)
    with pytest.raises(InputError, match="features"):
        RidgeBaseline().fit(X, Y).predict(X[:, :10])
    with pytest.raises(InputError, match="alphas"):
        RidgeBaseline(alphas=[0.0, 1.0])
    with pytest.raises(InputError, match="groups"):
        RidgeBaseline().fit(X, Y, groups=np.zeros(5))
    with pytest.raises(InputError, match="at least 3"):
        RidgeBaseline().fit(X[:2], Y[:2])
