"""``tl.calibrate``: split-conformal prediction intervals per gene, stored with the model.

Scores on held-aside spots (never used for training), per gene:

- ``absolute`` (split conformal): ``s = |y - yhat|``; interval ``yhat ± q``.
- ``normalized`` (locally adaptive conformal, when a spread ``sigma`` exists):
  ``s = |y - yhat| / (sigma + beta_g)``; interval ``yhat ± q (sigma + beta_g)``, where
  ``beta_g`` = 10 % of the gene's median spread on the calibration spots keeps a spot with
  near-zero spread from getting a zero-width interval.

``q`` at coverage level ``l`` is the ``ceil((n + 1) l)``-th smallest of the ``n`` scores:
if the calibration spots and a new spot are exchangeable, the new spot's interval covers
its observed value with probability at least ``l`` (and below ``l + 1 / (n + 1)``).
Spots of one section are not independent of each other; see ``docs/uncertainty.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._anndata import record
from .._errors import InputError, KeyExistsError, MissingKeyError
from .._logging import logger
from ..pp._patches import library_ids
from ._intervals import ABSOLUTE
from ._intervals import choose_calibration as choose_calibration  # still importable from here
from ._intervals import decode_quantiles as decode_quantiles
from ._intervals import interval_bounds as interval_bounds
from ._uncertainty import DEFAULT_SAMPLES, check_mode, check_supported, predictive

if TYPE_CHECKING:
    from os import PathLike

    from anndata import AnnData
    from numpy.typing import ArrayLike

    from ..models._protocol import ExpressionModel

DEFAULT_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
"""Coverage levels calibrated by default (besides ``1 - alpha``): the calibration curve's points."""
BETA_FRACTION = 0.1
"""``beta_g`` of the normalised score, as a fraction of the gene's median spread."""


def conformal_quantiles(scores: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """Finite-sample conformal quantiles ``(len(levels), n_genes)`` of scores ``(n, n_genes)``.

    The ``ceil((n + 1) l)``-th smallest score per gene; ``inf`` when that rank exceeds ``n``
    (too few calibration spots for the level).
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64), axis=0)
    n = scores.shape[0]
    out = np.full((len(levels), scores.shape[1]), np.inf)
    for row, level in enumerate(levels):
        rank = math.ceil((n + 1) * float(level) - 1e-9)
        if rank <= n:
            out[row] = scores[max(rank, 1) - 1]
    return out


def _levels(alpha, levels) -> list[float]:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < float(alpha) < 1:
        raise InputError(f"alpha={alpha!r} must lie strictly between 0 and 1 (0.1 for 90% intervals).")
    chosen = set(DEFAULT_LEVELS if levels is None else [float(v) for v in np.atleast_1d(levels)])
    chosen.add(round(1 - float(alpha), 10))
    bad = [v for v in chosen if not 0 < v < 1]
    if bad:
        raise InputError(f"levels={sorted(bad)} must lie strictly between 0 and 1.")
    return sorted(chosen)


def _calibration_index(adata, calibration, model) -> np.ndarray:
    from ._train import _resolve_train_index

    if calibration is None:
        raise InputError(
            "calibration= is required: pass the library ids (or a boolean spot mask) of data not used for "
            "training, e.g. calibration=['S2']. Whole sections give a section-level guarantee."
        )
    try:
        index = _resolve_train_index(adata, calibration)
    except InputError as error:  # the shared resolver speaks of train_mask
        raise type(error)(str(error).replace("train_mask", "calibration")) from None
    trained = {str(x) for x in model.trained_on.get("libraries", [])}
    for member in getattr(model, "members", []):
        trained |= {str(x) for x in member.trained_on.get("libraries", [])}
    seen = sorted(trained & set(library_ids(adata)[index]))
    spot_mask = not isinstance(calibration, str) and np.asarray(calibration).dtype == bool
    if seen and not spot_mask:
        raise InputError(
            f"calibration sections {seen} were used to train this model; conformal intervals need data the "
            f"model never saw. Hold sections out of training (train_mask=) and calibrate on them."
        )
    if seen:
        logger.warning(
            "calibrate: the calibration spots lie in sections %s that the model trained on; the guarantee only "
            "holds if these spots themselves were held out of training (e.g. by a spot mask).",
            seen,
        )
    return index


def _encode(values: np.ndarray) -> list:
    """JSON-able nested lists; infinities become None."""
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in np.atleast_2d(values)]


def _observed(adata, model, index, observed) -> np.ndarray:
    from ._evaluate import _matrix
    from ._train import _gene_columns, _targets

    if observed is not None:
        columns = _gene_columns(adata, model.genes)
        if (columns < 0).any():
            raise MissingKeyError("calibration needs every model gene in adata.var_names, with observed values.")
        return _matrix(adata, observed, index, columns, what="observed")
    missing = [g for g in model.genes if g not in set(adata.var_names.astype(str))]
    if missing:
        raise MissingKeyError(
            f"{len(missing)} model genes are not measured in adata (e.g. {missing[:5]}); calibration needs the "
            f"observed expression of every model gene on the calibration spots."
        )
    values, _, _ = _targets(
        adata,
        index,
        model.genes,
        layer=model.data_params.get("target_layer"),
        variant=model.data_params.get("target") or "log10_1e4",
        need_counts=False,
    )
    return np.asarray(values, dtype=np.float64)


def fit_calibration(
    observed: np.ndarray, mean: np.ndarray, std: np.ndarray | None, *, levels: Sequence[float]
) -> dict[str, Any]:
    """Conformal quantiles of one calibration set (arrays ``(n, n_genes)``); JSON-able."""
    error = np.abs(np.asarray(observed, dtype=np.float64) - np.asarray(mean, dtype=np.float64))
    if std is None:
        return {"conformal": ABSOLUTE, "levels": list(levels), "quantiles": _encode(conformal_quantiles(error, levels))}
    spread = np.asarray(std, dtype=np.float64)
    beta = np.maximum(BETA_FRACTION * np.median(spread, axis=0), 1e-6)
    scores = error / (spread + beta)
    return {
        "conformal": "normalized",
        "levels": list(levels),
        "quantiles": _encode(conformal_quantiles(scores, levels)),
        "beta": [float(b) for b in beta],
    }


def _persist(adata, model, source, stored_key) -> None:
    from ._train import store_model

    if stored_key is not None:
        store_model(adata, model, key_added=stored_key, overwrite=True, manifest_only=True)
    elif isinstance(source, (str, Path)) and Path(source).is_dir():
        from ..io._model import MANIFEST_FILE

        # Only the manifest changes: the weights stay as saved.
        (Path(source) / MANIFEST_FILE).write_text(json.dumps(model.manifest(), indent=1))
        logger.info("updated the calibration in %s", Path(source) / MANIFEST_FILE)


def calibrate_model(
    fitted, adata, index, *, alpha, uncertainty, levels, observed=None, n_samples=DEFAULT_SAMPLES, seed=0, device="auto"
) -> dict[str, dict]:
    """Calibrate ``fitted`` on the spots ``index`` (no checks of provenance); returns the new entries."""
    n = len(index)
    needed = math.ceil((1 - float(alpha)) / float(alpha))
    if n < needed:
        raise InputError(
            f"{n} calibration spots are too few for {1 - alpha:.0%} intervals (need at least {needed}); add "
            f"calibration sections or raise alpha."
        )
    kept = [v for v in levels if math.ceil((n + 1) * v - 1e-9) <= n]
    if len(kept) < len(levels):
        logger.info("calibrate: %d spots cannot calibrate levels %s; left out", n, sorted(set(levels) - set(kept)))
    values = _observed(adata, fitted, index, observed)
    output = predictive(fitted, adata, index, uncertainty=uncertainty, n_samples=n_samples, seed=seed, device=device)
    common = {
        "n_spots": int(n),
        "libraries": sorted({str(x) for x in library_ids(adata)[index]}),
        "alpha": float(alpha),
        "point": "ensemble mean" if fitted.members else "model prediction",
        "observed": observed or "model target from X",
    }
    new = {ABSOLUTE: {**fit_calibration(values, output["mean"], None, levels=kept), **common, "uncertainty": None}}
    if uncertainty is not None:
        new[uncertainty] = {
            **fit_calibration(values, output["mean"], output["std"], levels=kept),
            **common,
            "uncertainty": uncertainty,
            "n_samples": int(n_samples) if uncertainty == "dropout" else None,
            "seed": int(seed),
        }
    fitted.calibration.update(new)
    return new


def calibrate(
    adata: AnnData,
    model: str | PathLike[str] | ExpressionModel,
    *,
    calibration: Sequence[str] | ArrayLike,
    alpha: float = 0.1,
    uncertainty: str | None = None,
    levels: Sequence[float] | None = None,
    observed: str | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
) -> ExpressionModel:
    """Fit split-conformal intervals per gene on held-aside spots and store them with the model.

    Parameters
    ----------
    adata
        AnnData holding the calibration spots with observed expression (raw counts in ``X``).
    model
        A key of ``uns['sthisto']['models']`` (the record there is updated), a model object
        (updated in place), or a folder written by ``model.save`` (its manifest is updated).
    calibration
        Library ids (whole sections: a section-level guarantee) or a boolean mask over spots
        of ``adata``, none of them used to train the model. Sections the model trained on are
        refused; a spot mask inside training sections is accepted with a warning.
    alpha
        Miscoverage of the default interval: ``1 - alpha`` (0.9) is always calibrated.
    uncertainty
        ``None``: plain split conformal only. ``"ensemble"``, ``"dropout"`` or
        ``"distribution"``: also the normalised (locally adaptive) calibration with that spread
        (see :func:`sthisto.tl.predict`).
    levels
        Coverage levels to calibrate (default 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, plus ``1 - alpha``).
    observed
        Layer of observed values on the model's scale; default: the raw counts normalised as
        the model's training targets.
    n_samples, seed
        Monte-Carlo dropout passes and their seed (``uncertainty="dropout"``).
    device
        Device of the predictions.
    overwrite
        Replace a stored calibration of the same kind.

    Returns
    -------
    The calibrated model. ``model.calibration["absolute"]`` (and
    ``model.calibration[uncertainty]``) hold ``conformal``, ``levels``, per-level per-gene
    ``quantiles``, ``beta`` (normalised only), ``n_spots``, ``libraries``, ``alpha``; they are
    part of the manifest, so they survive ``write_h5ad`` / ``read_h5ad`` and save / load.
    Records the call in ``adata.uns['sthisto']['calibrate'][<model key or method>]``.

    Examples
    --------
    >>> model = sthisto.tl.train(adata, "ridge", train_mask=["S0", "S1"])
    >>> sthisto.tl.calibrate(adata, "ridge", calibration=["S2"])
    >>> sthisto.tl.predict(test, "ridge", interval=0.9)  # layers ridge_lower / ridge_upper
    """
    from ._train import _resolve_model

    check_mode(uncertainty)
    source = model
    fitted, stored_key = _resolve_model(adata, model)
    check_supported(fitted, uncertainty, n_samples=n_samples)
    chosen_levels = _levels(alpha, levels)
    keys = [ABSOLUTE] + ([uncertainty] if uncertainty is not None else [])
    existing = sorted(set(keys) & set(fitted.calibration))
    if existing and not overwrite:
        raise KeyExistsError(f"the model already holds calibrations {existing}; pass overwrite=True to replace them.")
    index = _calibration_index(adata, calibration, fitted)
    new = calibrate_model(
        fitted,
        adata,
        index,
        alpha=alpha,
        uncertainty=uncertainty,
        levels=chosen_levels,
        observed=observed,
        n_samples=n_samples,
        seed=seed,
        device=device,
    )
    libraries = new[ABSOLUTE]["libraries"]
    n, kept = new[ABSOLUTE]["n_spots"], new[ABSOLUTE]["levels"]
    _persist(adata, fitted, source, stored_key)
    record(
        adata,
        "calibrate",
        stored_key or fitted.name,
        {"calibration_libraries": libraries, "n_spots": int(n), "alpha": float(alpha), "levels": kept,
         "uncertainty": uncertainty if uncertainty is not None else "None", "kinds": list(new)},
        overwrite=True,
    )  # fmt: skip
    return fitted
