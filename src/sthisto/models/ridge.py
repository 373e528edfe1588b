"""The frozen-features ridge baseline (HEST-Benchmark protocol).

Features from any image encoder are standardised, reduced by PCA to at most 256 components,
and each gene gets its own ridge regression whose penalty is chosen by cross-validation inside
the training data only. Every fitted quantity is a plain array, so a model is saved without
pickle (:meth:`RidgeBaseline.get_state` / :meth:`RidgeBaseline.from_state`).

Choice of the inner cross-validation
------------------------------------
- ``groups`` given with at least two distinct values (e.g. the training sections'
  ``library_id``, or spatial tiles from :func:`sthisto.models.layers.sequences.chunk_spots`
  with ``mode="spatial"`` for a single section): grouped K-fold (``min(cv or 5, n_groups)``
  folds), so the penalty is judged on spots far from those it was fitted on. This is the
  recommended setting: neighbouring spots share tissue and expression, and validating on
  them favours too little shrinkage.
- otherwise, ``cv=None`` (default): scikit-learn's efficient leave-one-out
  (:class:`sklearn.linear_model.RidgeCV` with ``alpha_per_target=True``);
- otherwise, ``cv=k``: K-fold on contiguous blocks of the storage order (no shuffling, so
  blocks follow however the spots are stored).

PCA is fitted once on all training spots (it sees no targets); only the ridge penalty is
cross-validated.

HEST's published setting
------------------------
``alpha_rule="hest"`` reproduces the HEST-Benchmark's linear probe exactly, so numbers compare
with its leaderboard: one fixed penalty ``alpha = 100 / (n_components · n_genes)`` for every
gene (``n_components`` = PCA scores entering the ridge, 256 on HEST), no intercept, no inner
cross-validation. Without an intercept the predictions are centred on zero rather than on
each gene's mean; the per-gene Pearson correlation HEST reports does not see that offset, but
MSE/MAE do, so compare those only between models fitted with the same rule.
"""

from __future__ import annotations

import numpy as np

from .._errors import InputError

ALPHA_RULES = ("cv", "hest")
HEST_ALPHA_SCALE = 100.0
"""HEST-Benchmark: alpha = 100 / (n_features · n_genes), with n_features the PCA scores."""
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-3, 7, 21))
"""Penalty grid: 1e-3 … 1e7 in half-decade steps."""
STATE_FORMAT = "sthisto.ridge_baseline/1"
_ARRAY_KEYS = ("feature_mean", "feature_scale", "pca_mean", "components", "coef", "intercept", "alpha", "alphas")


def _dense(values, name: str) -> np.ndarray:
    if hasattr(values, "toarray"):
        values = values.toarray()
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise InputError(f"{name} contains NaN or infinite values; impute or drop those rows first.")
    return values


class RidgeBaseline:
    """Standardise → PCA → per-gene ridge with cross-validated penalties.

    Parameters
    ----------
    n_components
        Largest number of principal components; the fit uses
        ``min(n_components, n_samples - 1, n_features)``.
    alphas
        Penalty grid searched for each gene (default :data:`DEFAULT_ALPHAS`).
    cv
        Inner cross-validation; see the module documentation. ``None``: grouped 5-fold when
        ``groups`` are given, else efficient leave-one-out. An integer sets the number of folds.
    standardize
        Scale features to unit variance before PCA (they are always centred).
    random_state
        Seed of the PCA solver (randomised solvers only).
    alpha_rule
        ``"cv"`` (default): per-gene penalties cross-validated over ``alphas``, with an
        intercept. ``"hest"``: HEST-Benchmark's fixed ``100 / (k · G)`` for all genes, no
        intercept (see the module documentation); ``alphas`` and ``cv`` are not used.

    Attributes
    ----------
    alpha_
        ``(G,)`` penalty chosen for each gene.
    cv_scheme_
        ``"grouped-kfold(k)"``, ``"kfold(k)"``, ``"loo"`` or ``"hest-fixed"``: how the
        penalties were chosen.

    Examples
    --------
    >>> model = RidgeBaseline().fit(train_features, train_targets, groups=train_sections)
    >>> predicted = model.predict(test_features)  # (n_test, G)
    """

    def __init__(
        self,
        *,
        n_components: int = 256,
        alphas=None,
        cv: int | None = None,
        standardize: bool = True,
        random_state: int = 0,
        alpha_rule: str = "cv",
    ) -> None:
        if alpha_rule not in ALPHA_RULES:
            raise InputError(f"alpha_rule={alpha_rule!r}; use 'cv' (cross-validated) or 'hest' (HEST's fixed alpha).")
        if int(n_components) != n_components or n_components < 1:
            raise InputError(f"n_components={n_components!r} must be a positive integer.")
        alphas = np.asarray(DEFAULT_ALPHAS if alphas is None else alphas, dtype=np.float64).ravel()
        if alphas.size == 0 or not np.isfinite(alphas).all() or (alphas <= 0).any():
            raise InputError("alphas must be a non-empty list of positive penalties, e.g. np.logspace(-3, 7, 21).")
        if cv is not None and (int(cv) != cv or cv < 2):
            raise InputError(f"cv={cv!r} must be None (automatic) or a number of folds >= 2.")
        self.n_components = int(n_components)
        self.alphas = np.sort(alphas)
        self.cv = None if cv is None else int(cv)
        self.standardize = bool(standardize)
        self.random_state = int(random_state)
        self.alpha_rule = alpha_rule

    # -- fitting ----------------------------------------------------------------------------

    def fit(self, X, Y, groups=None) -> RidgeBaseline:
        """Fit on features ``X`` ``(n, p)`` and targets ``Y`` ``(n, G)`` (or ``(n,)``).

        Parameters
        ----------
        X
            Training features.
        Y
            Training targets, one column per gene.
        groups
            Optional ``(n,)`` labels defining the inner folds (sections or spatial tiles).

        Returns
        -------
        ``self``, fitted.
        """
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        X = _dense(X, "X")
        Y = _dense(Y, "Y")
        if Y.ndim == 1:
            Y = Y[:, None]
        if X.ndim != 2 or Y.ndim != 2:
            raise InputError(f"X must be (n_samples, n_features) and Y (n_samples, n_genes); got {X.shape}, {Y.shape}.")
        n, p = X.shape
        if Y.shape[0] != n:
            raise InputError(f"X has {n} rows but Y has {Y.shape[0]}; they must describe the same spots.")
        if n < 3:
            raise InputError(f"only {n} training spots; the ridge baseline needs at least 3.")
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (n,):
                raise InputError(f"groups has shape {groups.shape}; expected one label per spot ({n},).")

        scaler = StandardScaler(with_std=self.standardize).fit(X)
        Xs = scaler.transform(X)
        k = min(self.n_components, n - 1, p)
        # The covariance eigendecomposition is exact and by far the fastest when spots
        # outnumber features (the usual case: thousands of spots, ≤ ~1.5k encoder dimensions).
        solver = "covariance_eigh" if p <= 4096 and n > p else "auto"
        pca = PCA(n_components=k, svd_solver=solver, random_state=self.random_state).fit(Xs)
        Z = pca.transform(Xs)

        self.feature_mean_ = scaler.mean_.copy()
        self.feature_scale_ = scaler.scale_.copy() if self.standardize else np.ones(p)
        self.pca_mean_ = pca.mean_.copy()
        self.components_ = pca.components_.copy()
        self.n_components_ = k
        self.n_features_in_ = p

        n_groups = 0 if groups is None else len(np.unique(groups))
        if self.alpha_rule == "hest":
            from sklearn.linear_model import Ridge

            alpha = HEST_ALPHA_SCALE / (k * Y.shape[1])
            ridge = Ridge(alpha=alpha, fit_intercept=False, solver="svd").fit(Z, Y)
            self.alpha_ = np.full(Y.shape[1], alpha)
            self.coef_ = np.asarray(ridge.coef_, dtype=np.float64).reshape(Y.shape[1], k)
            self.intercept_ = np.zeros(Y.shape[1])
            self.cv_scheme_ = "hest-fixed"
        elif n_groups >= 2 or self.cv is not None:
            from sklearn.model_selection import GroupKFold, KFold

            if n_groups >= 2:
                folds = min(self.cv or 5, n_groups)
                splits = GroupKFold(n_splits=folds).split(Z, groups=groups)
                self.cv_scheme_ = f"grouped-kfold({folds})"
            else:
                folds = min(self.cv, n)
                splits = KFold(n_splits=folds).split(Z)
                self.cv_scheme_ = f"kfold({folds})"
            error = np.zeros((len(self.alphas), Y.shape[1]))
            for train, valid in splits:
                error += self._fold_errors(Z[train], Y[train], Z[valid], Y[valid])
            self.alpha_ = self.alphas[np.argmin(error, axis=0)]
            self.coef_, self.intercept_ = self._solve(Z, Y, self.alpha_)
        else:
            from sklearn.linear_model import RidgeCV

            ridge = RidgeCV(alphas=self.alphas, alpha_per_target=True).fit(Z, Y)
            self.alpha_ = np.broadcast_to(np.asarray(ridge.alpha_, dtype=np.float64), (Y.shape[1],)).copy()
            self.coef_ = np.asarray(ridge.coef_, dtype=np.float64).reshape(Y.shape[1], k)
            self.intercept_ = np.asarray(ridge.intercept_, dtype=np.float64).reshape(Y.shape[1])
            self.cv_scheme_ = "loo"
        return self

    def _fold_errors(self, Zt, Yt, Zv, Yv) -> np.ndarray:
        """Validation sum of squared errors, ``(n_alphas, G)``, of ridge fits on one fold."""
        z_mean, y_mean = Zt.mean(0), Yt.mean(0)
        centred = Zt - z_mean
        # Ridge in the eigenbasis of the (k × k) scatter matrix: coef(α) = V (Λ + α)⁻¹ Vᵀ Zᵀ Y.
        eigenvalues, V = np.linalg.eigh(centred.T @ centred)
        eigenvalues = np.clip(eigenvalues, 0.0, None)
        projected_targets = V.T @ (centred.T @ (Yt - y_mean))  # (k, G)
        projected_valid = (Zv - z_mean) @ V  # (n_valid, k)
        residual_base = Yv - y_mean
        # ‖R − Pv·A‖² per gene with A = (Λ + α)⁻¹·projected_targets, expanded so that each
        # penalty costs O(k²·G) instead of O(n_valid·k·G).
        base = (residual_base**2).sum(0)
        cross = projected_valid.T @ residual_base  # (k, G)
        gram = projected_valid.T @ projected_valid  # (k, k)
        errors = np.empty((len(self.alphas), Yt.shape[1]))
        for i, alpha in enumerate(self.alphas):
            coef = projected_targets / (eigenvalues + alpha)[:, None]
            errors[i] = base - 2.0 * (cross * coef).sum(0) + (coef * (gram @ coef)).sum(0)
        return errors

    @staticmethod
    def _solve(Z, Y, alpha) -> tuple[np.ndarray, np.ndarray]:
        """Ridge coefficients ``(G, k)`` and intercepts ``(G,)`` with one penalty per gene."""
        from sklearn.linear_model import Ridge

        ridge = Ridge(alpha=alpha, solver="svd").fit(Z, Y)
        return (
            np.asarray(ridge.coef_, dtype=np.float64).reshape(Y.shape[1], Z.shape[1]),
            np.asarray(ridge.intercept_, dtype=np.float64).reshape(Y.shape[1]),
        )

    # -- prediction -------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise InputError("this RidgeBaseline is not fitted yet; call fit(X, Y) or build it with from_state().")

    def transform(self, X) -> np.ndarray:
        """Standardised PCA scores ``(n, k)`` of features ``X``."""
        self._check_fitted()
        X = _dense(X, "X")
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise InputError(
                f"X has shape {X.shape}; the model was fitted on {self.n_features_in_} features. Use "
                f"features from the same encoder as in training."
            )
        return ((X - self.feature_mean_) / self.feature_scale_ - self.pca_mean_) @ self.components_.T

    def predict(self, X) -> np.ndarray:
        """Predicted targets ``(n, G)`` for features ``X`` ``(n, p)``."""
        return self.transform(X) @ self.coef_.T + self.intercept_

    # -- state ------------------------------------------------------------------------------

    def get_state(self) -> dict:
        """Everything needed to rebuild the fitted model, as arrays and JSON-able values.

        Returns
        -------
        Dict with float64 arrays ``feature_mean``, ``feature_scale``, ``pca_mean``,
        ``components`` ``(k, p)``, ``coef`` ``(G, k)``, ``intercept`` ``(G,)``, ``alpha``
        ``(G,)``, ``alphas`` (grid), and JSON-able ``format``, ``n_components``,
        ``n_components_fitted``, ``n_features``, ``cv``, ``cv_scheme``, ``standardize``,
        ``random_state``, ``alpha_rule``.
        """
        self._check_fitted()
        return {
            "format": STATE_FORMAT,
            "n_components": self.n_components,
            "n_components_fitted": int(self.n_components_),
            "n_features": int(self.n_features_in_),
            "cv": self.cv,
            "cv_scheme": self.cv_scheme_,
            "standardize": self.standardize,
            "random_state": self.random_state,
            "alpha_rule": self.alpha_rule,
            "feature_mean": self.feature_mean_.copy(),
            "feature_scale": self.feature_scale_.copy(),
            "pca_mean": self.pca_mean_.copy(),
            "components": self.components_.copy(),
            "coef": self.coef_.copy(),
            "intercept": self.intercept_.copy(),
            "alpha": self.alpha_.copy(),
            "alphas": self.alphas.copy(),
        }

    @classmethod
    def from_state(cls, state: dict) -> RidgeBaseline:
        """Rebuild a fitted model from :meth:`get_state`'s output (arrays may be lists)."""
        if state.get("format") != STATE_FORMAT:
            raise InputError(
                f"state has format {state.get('format')!r}, expected {STATE_FORMAT!r}; it was not written "
                f"by RidgeBaseline.get_state()."
            )
        missing = [key for key in _ARRAY_KEYS if key not in state]
        if missing:
            raise InputError(f"state lacks {missing}; save the full dict returned by get_state().")
        model = cls(
            n_components=state["n_components"],
            alphas=state["alphas"],
            cv=state["cv"],
            standardize=state["standardize"],
            random_state=state["random_state"],
            alpha_rule=str(state.get("alpha_rule", "cv")),
        )
        arrays = {key: np.asarray(state[key], dtype=np.float64) for key in _ARRAY_KEYS}
        n_features, n_components = int(state["n_features"]), int(state["n_components_fitted"])
        n_genes = arrays["intercept"].size
        expected = {
            "feature_mean": n_features,
            "feature_scale": n_features,
            "pca_mean": n_features,
            "components": n_components * n_features,
            "coef": n_genes * n_components,
            "alpha": n_genes,
        }
        wrong = {key: arrays[key].shape for key, size in expected.items() if arrays[key].size != size}
        if wrong:
            raise InputError(
                f"ridge state arrays {wrong} do not fit {n_features} features, {n_components} components and "
                f"{n_genes} genes; the saved weights were altered or come from another model."
            )
        model.feature_mean_ = arrays["feature_mean"]
        model.feature_scale_ = arrays["feature_scale"]
        model.pca_mean_ = arrays["pca_mean"]
        model.components_ = arrays["components"].reshape(int(state["n_components_fitted"]), int(state["n_features"]))
        model.coef_ = arrays["coef"].reshape(-1, int(state["n_components_fitted"]))
        model.intercept_ = arrays["intercept"].ravel()
        model.alpha_ = arrays["alpha"].ravel()
        model.n_components_ = int(state["n_components_fitted"])
        model.n_features_in_ = int(state["n_features"])
        model.cv_scheme_ = str(state["cv_scheme"])
        return model


# -- the registered method ---------------------------------------------------------------------
# Imported here, below the estimator, so the estimator stays usable without the model machinery.
from ._protocol import ExpressionModel  # noqa: E402
from ._registry import register_method  # noqa: E402


@register_method
class Ridge(ExpressionModel):
    """Frozen image features → standardise → PCA → ridge per gene (the honest comparator).

    The HEST-Benchmark protocol: features from any encoder registered with
    :mod:`sthisto.encoders` (``encoder=``; the offline default is ``"handcrafted"``), or any
    ``obsm`` key (``features_key=``). Penalties are chosen per gene by inner cross-validation
    on the training spots, grouped by section when there are several (see
    :class:`RidgeBaseline`). Fitting is closed-form: no epochs, no Lightning, ``validation``
    is not needed and ignored.

    Parameters (``tl.train(..., **params)``)
    -----------------------------------------
    n_components, alphas, cv, standardize, alpha_rule
        See :class:`RidgeBaseline`; ``alpha_rule="hest"`` is HEST-Benchmark's published
        setting (fixed ``alpha = 100 / (n_components · n_genes)``, no intercept, 256 PCA
        components), beside the default cross-validated penalties.
    encoder, encoder_weights, features_key, patch_size_um, image_key
        Where the features come from (see :meth:`ExpressionModel.ensure_features`).
    target
        Target transform of the raw counts (default ``"log10_1e4"``).
    """

    name = "ridge"
    variants = {"tiny": {"n_components": 8}}
    input_kind = "features"
    default_loss = "ridge (closed form)"
    reference = "Jaume et al., HEST-1k, NeurIPS 2024 (frozen encoder + PCA + ridge)"
    network_class = None
    batching = "spots"
    data_defaults = {"encoder": "handcrafted"}
    training_defaults = {
        "n_components": 256,
        "alphas": None,
        "cv": None,
        "standardize": True,
        "alpha_rule": "cv",
        "max_epochs": 0,
    }

    def build_network(self):
        """Ridge has no neural network; the fitted estimator lives in :attr:`estimator`."""
        self.estimator: RidgeBaseline | None = None
        return None

    def _new_estimator(self, seed: int) -> RidgeBaseline:
        params = self.training_params
        return RidgeBaseline(
            n_components=int(params["n_components"]),
            alphas=params["alphas"],
            cv=params["cv"],
            standardize=bool(params["standardize"]),
            random_state=int(seed),
            alpha_rule=str(params["alpha_rule"]),
        )

    def fit(self, adata, train_index, *, targets, seed: int = 0, validation=None, **_engine_params) -> Ridge:
        """Fit the estimator on the training spots (closed form; engine options do not apply)."""
        from ..pp._patches import library_ids

        if validation is not None:
            from .._logging import logger

            logger.info("ridge chooses its penalties by inner cross-validation; validation=%r is not used.", validation)
        features = self._features_cache(adata)[train_index]
        self._feature_cache = None
        groups = library_ids(adata)[train_index]
        self.estimator = self._new_estimator(seed).fit(
            features, np.asarray(targets, dtype=np.float64), groups=groups if len(set(groups)) > 1 else None
        )
        self.extra["ridge_state"] = {k: v for k, v in self.estimator.get_state().items() if k not in _ARRAY_KEYS}
        self.history = {"epoch": [], "train_loss": [], "val_loss": []}
        self.trained_on = {
            "libraries": sorted(set(groups)),
            "n_spots": int(len(train_index)),
            "seed": int(seed),
            "cv_scheme": self.estimator.cv_scheme_,
            "n_components": int(self.estimator.n_components_),
        }
        return self

    def predict_section(self, section, *, device) -> np.ndarray:
        """Closed-form prediction from the section's features."""
        if self.estimator is None:
            raise InputError("this ridge model is not fitted; train it with sthisto.tl.train(adata, 'ridge').")
        return self.estimator.predict(section.tensors["features"].numpy()).astype(np.float32)

    def predict_network(self, adata, index=None, *, device="cpu") -> np.ndarray:
        """Predict with this fitted estimator alone (CPU; ``device`` is accepted for a uniform API)."""
        index = np.arange(adata.n_obs) if index is None else np.asarray(index)
        self.check_inputs(adata, index)
        try:
            features = self._features_cache(adata)[index]
        finally:
            self._feature_cache = None
        return self.predict_section(_FeatureSection(features), device=device)

    def state_tensors(self) -> dict:
        """The fitted arrays as tensors (their scalar settings go to the manifest's ``extra``)."""
        import torch

        if self.estimator is None:
            raise InputError("this ridge model is not fitted; nothing to save.")
        state = self.estimator.get_state()
        return {k: torch.as_tensor(np.ascontiguousarray(state[k])) for k in _ARRAY_KEYS}

    def load_state_tensors(self, tensors) -> None:
        """Rebuild the estimator from saved arrays and the manifest's scalar settings."""
        state = dict(self.extra.get("ridge_state", {}))
        state.update({k: tensors[k].numpy() for k in _ARRAY_KEYS if k in tensors})
        estimator = RidgeBaseline.from_state(state)
        if estimator.coef_.shape[0] != len(self.genes):
            raise InputError(
                f"the saved ridge coefficients predict {estimator.coef_.shape[0]} genes but the manifest "
                f"lists {len(self.genes)}; the model files do not belong together."
            )
        self.estimator = estimator


class _FeatureSection:
    """Minimal stand-in for :class:`~sthisto.models._planning.Section` holding features only."""

    def __init__(self, features: np.ndarray) -> None:
        import torch

        self.tensors = {"features": torch.as_tensor(np.asarray(features, dtype=np.float32))}
