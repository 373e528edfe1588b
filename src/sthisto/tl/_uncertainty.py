"""Spread of predictions: deep ensembles, Monte-Carlo dropout and predictive distributions.

Every mode returns, per spot and gene, a point prediction on the model's target scale and a
standard deviation on the same scale, so that :func:`sthisto.tl.calibrate` can normalise
conformal scores by it and :func:`sthisto.tl.evaluate` can rank errors by it.

- ``"ensemble"``: K independently seeded models (``tl.train(..., n_members=K)``); mean and
  standard deviation (ddof = 1) across members. Works for every method, ridge included.
- ``"dropout"``: T stochastic passes with only the dropout of the network switched on
  (batch-norm statistics and every other training-mode branch stay in evaluation mode);
  pass ``t`` is seeded with ``seed + t`` inside a forked RNG, so a seed repeats exactly and the
  global random stream is left untouched.
- ``"distribution"``: the method's own predictive distribution (HGGEF's ZINB heads).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from .._errors import InputError

MODES = ("ensemble", "dropout", "distribution")
"""Values of ``uncertainty=`` in :func:`sthisto.tl.predict` and :func:`sthisto.tl.calibrate`."""
DEFAULT_SAMPLES = 20
"""Stochastic passes of Monte-Carlo dropout (``n_samples``)."""


def check_mode(uncertainty) -> str | None:
    """Validate ``uncertainty=``; returns it (``None`` for no spread)."""
    if uncertainty is None or uncertainty in MODES:
        return uncertainty
    raise InputError(f"uncertainty={uncertainty!r} is not a spread mode; use None or one of {list(MODES)}.")


def all_members(model) -> list:
    """The model itself followed by its further ensemble members."""
    return [model, *getattr(model, "members", [])]


def check_supported(model, uncertainty: str | None, *, n_samples: int = DEFAULT_SAMPLES) -> None:
    """Raise a clear error when ``model`` cannot give the requested spread (before any work)."""
    if uncertainty is None:
        return
    if uncertainty == "ensemble" and not getattr(model, "members", []):
        raise InputError(
            f"uncertainty='ensemble' needs a model trained as several members, but this {model.name} model is a "
            f"single one. Train it with sthisto.tl.train(..., n_members=5), or use uncertainty='dropout' for "
            f"networks with dropout."
        )
    if uncertainty == "dropout":
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 2:
            raise InputError(f"n_samples={n_samples!r}: Monte-Carlo dropout needs an integer of at least 2 passes.")
        if model.network is None or not dropout_modules(model.network):
            raise InputError(
                f"the {model.name} model has no active dropout, so Monte-Carlo dropout would give zero spread. "
                f"Use uncertainty='ensemble' (train with n_members=K), or retrain with a dropout rate > 0."
            )
    if uncertainty == "distribution" and not hasattr(model.network, "zinb"):
        raise InputError(
            f"the {model.name} model has no predictive distribution (only HGGEF's ZINB heads give one). Use "
            f"uncertainty='ensemble' (train with n_members=K) or 'dropout'."
        )


def dropout_modules(network) -> list:
    """Modules whose training flag switches dropout, and nothing else, on.

    ``nn.Dropout`` and its subclasses, plus sthisto's graph-attention layers, which drop
    their inputs and attention coefficients through a rate attribute. Their parents are not touched: in
    training mode they would also augment patches (HGGEF) or update batch-norm statistics.
    """
    from torch import nn

    from ..models.layers.graph_attention import GraphAttention

    found = []
    for module in network.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            if float(module.p) > 0:
                found.append(module)
        elif isinstance(module, GraphAttention) and float(getattr(module, "dropout", 0) or 0) > 0:
            found.append(module)
    return found


@contextmanager
def active_dropout(network):
    """Keep the dropout modules of ``network`` in training mode while predicting.

    Prediction code calls ``network.eval()`` itself, so the flag is set again by a forward
    pre-hook right before each dropout module runs, and reset on exit.
    """
    modules = dropout_modules(network)

    def switch_on(module, _inputs):
        module.training = True

    handles = [module.register_forward_pre_hook(switch_on) for module in modules]
    try:
        yield modules
    finally:
        for handle in handles:
            handle.remove()
        network.eval()


@contextmanager
def _seeded(seed: int, device):
    import torch

    devices = []
    if str(device).startswith("cuda") and torch.cuda.is_available():
        devices = [torch.device(device).index or 0]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        if devices:
            torch.cuda.manual_seed(int(seed))
        yield


def _predict(model, adata, index, device) -> np.ndarray:
    """One member's own prediction (``predict`` would average the ensemble it heads)."""
    return np.asarray(model.predict_network(adata, index, device=device), dtype=np.float32)


def _dropout_passes(model, adata, index, *, n_samples: int, seed: int, device) -> list[np.ndarray]:
    passes = []
    for t in range(int(n_samples)):
        with _seeded(seed + t, device), active_dropout(model.network):
            passes.append(_predict(model, adata, index, device))
    return passes


def _capture_outputs(model, adata, index, device) -> dict[str, np.ndarray]:
    """Every per-spot output of the network (prediction and distribution heads), unit by unit."""
    import torch

    from .._device import resolve_device

    index = np.arange(adata.n_obs) if index is None else np.asarray(index, dtype=np.int64)
    plan = model.prediction_plan(adata, index)
    device = resolve_device(device)
    captured: list[dict[str, Any]] = []

    def keep(_module, _inputs, outputs):
        captured.append({k: v.detach().float().cpu() for k, v in outputs.items() if hasattr(v, "shape")})

    result: dict[str, np.ndarray] = {}
    handle = model.network.register_forward_hook(keep)
    model.network.to(device)
    try:
        for unit in plan.units:
            captured.clear()
            model.predict_unit(adata, unit, device=device, graph_positions=plan.graph_positions)
            for name in captured[0] if captured else ():
                values = torch.cat([c[name] for c in captured]).numpy()
                if values.ndim != 2 or values.shape[0] != unit.n_spots:
                    continue
                if name not in result:
                    result[name] = np.zeros((len(index), values.shape[1]), dtype=np.float32)
                result[name][unit.result_rows] = values[unit.keep]
    finally:
        handle.remove()
        model.network.to("cpu")
        model._feature_cache = None
    return result


def zinb_moments(mean: np.ndarray, dispersion: np.ndarray, dropout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of a zero-inflated negative binomial (NB mean ``mean``, size ``dispersion``).

    ``E = (1 - pi) mu`` and ``Var = (1 - pi)(mu + mu^2 / theta) + pi (1 - pi) mu^2``.
    """
    mu = np.asarray(mean, dtype=np.float64)
    theta = np.asarray(dispersion, dtype=np.float64)
    pi = np.asarray(dropout, dtype=np.float64)
    expected = (1 - pi) * mu
    variance = (1 - pi) * (mu + mu**2 / theta) + pi * (1 - pi) * mu**2
    return expected, variance


def target_scale_std(prediction: np.ndarray, expected: np.ndarray, variance: np.ndarray, target: str) -> np.ndarray:
    """Delta-method standard deviation on the log target scale of a count-scale distribution.

    The target is ``log_b(1 + c x)`` for counts ``x``; the per-spot scale ``c`` (which folds
    in the library size, unknown for an image) is chosen so that the distribution's mean maps
    onto the model's own point prediction summed over genes. Then
    ``sd_y = c sd_x / ((1 + c E[x]) ln b)``.
    """
    from ..pp._normalize import VARIANTS

    spec = VARIANTS.get(str(target), VARIANTS["log10_1e4"])
    log_base = math.log(10.0) if spec["log"] == "log10" else 1.0
    linear = np.expm1(np.asarray(prediction, dtype=np.float64) * log_base).clip(min=0)
    c = linear.sum(axis=1, keepdims=True) / np.maximum(expected.sum(axis=1, keepdims=True), 1e-12)
    sd = np.sqrt(np.maximum(variance, 0))
    return (c * sd / ((1 + c * expected) * log_base)).astype(np.float32)


def predictive(
    model,
    adata,
    index: np.ndarray | None = None,
    *,
    uncertainty: str | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    device="auto",
) -> dict[str, np.ndarray]:
    """Point prediction and, with ``uncertainty``, its spread for the spots ``index``.

    Returns
    -------
    ``{"mean": (n, G)}`` plus ``"std"`` for every mode, and for ``"distribution"`` also
    ``"count_mean"``, ``"count_var"`` and ``"dropout_prob"`` (count scale at the section's
    median library size, i.e. size factor 1). Without ``uncertainty`` the point prediction of
    an ensemble is the mean of its members.
    """
    check_mode(uncertainty)
    check_supported(model, uncertainty, n_samples=n_samples)
    members = all_members(model)
    if uncertainty == "dropout":
        draws = []
        for number, member in enumerate(members):
            draws += _dropout_passes(
                member, adata, index, n_samples=n_samples, seed=seed + 100_003 * number, device=device
            )
        stack = np.stack(draws)
        return {"mean": stack.mean(axis=0), "std": stack.std(axis=0, ddof=1).astype(np.float32)}
    if uncertainty == "distribution":
        outputs = [_capture_outputs(member, adata, index, device) for member in members]
        prediction = np.mean([o["prediction"] for o in outputs], axis=0)
        moments = [zinb_moments(o["mean"], o["dispersion"], o["dropout"]) for o in outputs]
        # A mixture of the members' distributions: law of total variance.
        expected = np.mean([m[0] for m in moments], axis=0)
        variance = np.mean([m[1] + m[0] ** 2 for m in moments], axis=0) - expected**2
        target = model.data_params.get("target") or "log10_1e4"
        return {
            "mean": prediction.astype(np.float32),
            "std": target_scale_std(prediction, expected, variance, target),
            "count_mean": expected.astype(np.float32),
            "count_var": variance.astype(np.float32),
            "dropout_prob": np.mean([o["dropout"] for o in outputs], axis=0).astype(np.float32),
        }
    if len(members) == 1:
        return {"mean": _predict(model, adata, index, device)}
    stack = np.stack([_predict(member, adata, index, device) for member in members])
    out = {"mean": stack.mean(axis=0)}
    if uncertainty == "ensemble":
        out["std"] = stack.std(axis=0, ddof=1).astype(np.float32)
    return out


# --- training ensemble members -------------------------------------------------------------------------
def member_masks(adata, train_index: np.ndarray, n_members: int, *, bootstrap: bool, seed: int) -> list[np.ndarray]:
    """Training spots of members 1..K-1: the same spots, or the distinct units of a bootstrap draw.

    The units are the training sections when there are at least two (spots of one section
    are not independent), else the spots of the one section.
    """
    from ..pp._patches import library_ids

    if not bootstrap:
        return [train_index] * (n_members - 1)
    libraries = library_ids(adata)[train_index]
    sections = sorted(set(libraries))
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(n_members - 1):
        if len(sections) > 1:
            drawn = set(rng.choice(sections, size=len(sections), replace=True))
            masks.append(train_index[np.isin(libraries, sorted(drawn))])
        else:
            drawn = np.unique(rng.choice(len(train_index), size=len(train_index), replace=True))
            masks.append(train_index[drawn])
    return masks


def check_members(n_members, bootstrap, cls) -> tuple[int, bool]:
    """Validate ``n_members`` / ``bootstrap`` of :func:`sthisto.tl.train`; resolve ``bootstrap=None``.

    ``None`` bootstraps closed-form methods (ridge: the same data and another seed give the same
    fit, so seeds alone would give zero spread) and keeps all data for networks.
    """
    if isinstance(n_members, bool) or not isinstance(n_members, (int, np.integer)) or n_members < 1:
        raise InputError(f"n_members={n_members!r} must be a positive integer (1: a single model; 5 is common).")
    if bootstrap is None:
        bootstrap = cls.network_class is None and n_members > 1
    if not isinstance(bootstrap, (bool, np.bool_)):
        raise InputError(f"bootstrap={bootstrap!r} must be True, False or None.")
    if bootstrap and n_members < 2:
        raise InputError("bootstrap=True only makes sense with n_members >= 2 ensemble members.")
    return int(n_members), bool(bootstrap)


def describe(members: Sequence, *, bootstrap: bool) -> dict[str, Any]:
    """JSON-able summary of an ensemble for ``trained_on``."""
    return {
        "n_members": len(members),
        "seeds": [int(m.trained_on.get("seed", -1)) for m in members],
        "bootstrap_sections": bool(bootstrap),
        "member_libraries": [list(map(str, m.trained_on.get("libraries", []))) for m in members],
        "member_held_aside": [list(map(str, m.trained_on.get("validation_libraries", []))) for m in members],
    }


# --- evaluation of uncertainty -------------------------------------------------------------------------
SPREAD_DEFINITIONS = {
    "coverage": "share of spot x gene values inside [lower, upper] (layers <key>_lower / <key>_upper)",
    "coverage_gene_min": "lowest per-gene coverage in the group",
    "interval_width_mean": "mean of upper - lower over all spot x gene values",
    "spearman_error_spread": "mean over genes of Spearman rho across spots between |predicted - observed| and <key>_std",
    "spearman_error_spread_pooled": "Spearman rho between |error| and <key>_std over all spot x gene values",
    "spread_mean": "mean of <key>_std over all spot x gene values",
    "coverage_at_<level>": "calibration curve: observed coverage of the interval at nominal level <level> "
    "(conformal quantiles of the predict record; without calibration, Gaussian prediction +/- z * std)",
}
"""Definitions of the uncertainty metrics :func:`sthisto.tl.evaluate` adds when spread or intervals exist."""
CURVE_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
"""Nominal levels of the Gaussian calibration curve when no conformal calibration is recorded."""


class SpreadInputs:
    """Uncertainty layers beside a prediction layer, restricted to the evaluated genes."""

    def __init__(self, std=None, lower=None, upper=None, curve=None) -> None:
        self.std, self.lower, self.upper = std, lower, upper
        self.curve = curve  # (levels, half-width function) or None

    def __bool__(self) -> bool:
        return self.std is not None or self.lower is not None

    def rows(self, mask: np.ndarray) -> SpreadInputs:
        def pick(values):
            return None if values is None else values[mask]

        return SpreadInputs(pick(self.std), pick(self.lower), pick(self.upper), self.curve)


def spread_inputs(adata, predicted: str, rows, columns, genes, function, entry, matrix) -> SpreadInputs:
    """Read ``{predicted}_std`` / ``_lower`` / ``_upper`` and the recorded conformal quantiles."""
    from .._constants import Layers
    from ._intervals import decode_quantiles

    def layer(what):
        key = Layers.companion(predicted, what)
        return matrix(adata, key, rows, columns, what=what) if key in adata.layers else None

    inputs = SpreadInputs(layer("std"), layer("lower"), layer("upper"))
    info = entry.get("interval") if function == "predict" and entry is not None else None
    if isinstance(info, dict) and "quantiles" in info:
        model_genes = [str(g) for g in np.asarray(entry["genes"]).ravel()]
        position = {g: i for i, g in enumerate(model_genes)}
        take = np.asarray([position[g] for g in genes])
        levels = [float(v) for v in np.asarray(info["levels"]).ravel()]
        quantiles = np.asarray(info["quantiles"], dtype=np.float64)
        quantiles = decode_quantiles(quantiles.tolist()) if quantiles.dtype == object else quantiles
        quantiles = quantiles.reshape(len(levels), -1)[:, take]
        normalized = str(info.get("conformal")) == "normalized"
        beta = np.asarray(info.get("beta", []), dtype=np.float64).ravel()
        beta = beta[take] if normalized and beta.size else 0.0
        inputs.curve = ("conformal", levels, quantiles, normalized, beta)
    elif inputs.std is not None:
        inputs.curve = ("gaussian", list(CURVE_LEVELS), None, True, 0.0)
    return inputs


def group_spread_metrics(observed: np.ndarray, predicted: np.ndarray, spread: SpreadInputs, genes):
    """Coverage, width, error-spread rank correlation and calibration curve of one group.

    Returns
    -------
    metrics, per-gene DataFrame (``gene`` + columns), curve rows (``level``, ``expected``,
    ``observed``, ``source``).
    """
    import pandas as pd
    from scipy.stats import norm

    from ._metric_kernels import spearman_columns

    x = np.asarray(observed, dtype=np.float64)
    y = np.asarray(predicted, dtype=np.float64)
    valid = np.isfinite(x) & np.isfinite(y)
    metrics: dict[str, float] = {}
    per_gene = pd.DataFrame({"gene": np.asarray(genes, dtype=str)})
    curve_rows = []
    if spread.lower is not None and spread.upper is not None:
        ok = valid & np.isfinite(spread.lower) & np.isfinite(spread.upper)
        inside = np.where(ok, (spread.lower <= x) & (x <= spread.upper), np.nan)
        width = np.where(ok, spread.upper - spread.lower, np.nan)
        metrics["coverage"] = _nanmean(inside)
        metrics["interval_width_mean"] = _nanmean(width)
        per_gene["coverage"] = _nanmean(inside, axis=0)
        per_gene["interval_width"] = _nanmean(width, axis=0)
        metrics["coverage_gene_min"] = float(np.nanmin(per_gene["coverage"])) if ok.any() else np.nan
    if spread.std is not None:
        ok = valid & np.isfinite(spread.std)
        error = np.abs(y - x)
        keep_spots = ok.all(axis=1)
        rho = spearman_columns(error[keep_spots], spread.std[keep_spots]) if keep_spots.sum() > 2 else None
        per_gene["spearman_error_spread"] = rho if rho is not None else np.nan
        metrics["spearman_error_spread"] = _nanmean(np.asarray(rho)) if rho is not None else np.nan
        pooled = spearman_columns(error[ok].reshape(-1, 1), spread.std[ok].reshape(-1, 1)) if ok.sum() > 2 else [np.nan]
        metrics["spearman_error_spread_pooled"] = float(pooled[0])
        metrics["spread_mean"] = _nanmean(np.where(ok, spread.std, np.nan))
    if spread.curve is not None:
        source, levels, quantiles, normalized, beta = spread.curve
        for row, level in enumerate(levels):
            if source == "gaussian":
                half = norm.ppf(0.5 + level / 2) * spread.std
            elif normalized:
                if spread.std is None:
                    continue
                half = quantiles[row] * (spread.std + beta)
            else:
                half = np.broadcast_to(quantiles[row], y.shape)
            ok = valid & np.isfinite(half)
            covered = _nanmean(np.where(ok, np.abs(x - y) <= half, np.nan))
            metrics[f"coverage_at_{level:g}"] = covered
            curve_rows.append({"level": float(level), "expected": float(level), "observed": covered, "source": source})
    return metrics, per_gene, pd.DataFrame(curve_rows, columns=["level", "expected", "observed", "source"])


def _nanmean(values, axis=None):
    values = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is a NaN mean, on purpose
        out = np.nanmean(values, axis=axis)
    return float(out) if axis is None else out
