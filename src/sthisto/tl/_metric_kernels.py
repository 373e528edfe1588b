"""Correlation kernels on plain arrays, shared by :mod:`~sthisto.tl._evaluate` and the spread metrics.

They sit below every tool module so that ``_uncertainty`` scores spreads without importing
``_evaluate`` (which imports ``_uncertainty``): the tools import each other one way.
"""

from __future__ import annotations

import numpy as np

from .._errors import InputError


def pearson_columns(observed: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Pearson's r between matching columns of two ``(n, m)`` arrays; NaN where a column is constant.

    Parameters
    ----------
    observed, predicted
        Arrays of the same shape; correlation is taken along axis 0 (e.g. across spots for
        each gene).

    Returns
    -------
    ``(m,)`` float64 array in [-1, 1]; NaN for columns constant in either input or when
    ``n < 2``.
    """
    x = np.asarray(observed, dtype=np.float64)
    y = np.asarray(predicted, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise InputError(f"observed {x.shape} and predicted {y.shape} must be 2-d arrays of the same shape.")
    if x.shape[0] < 2:
        return np.full(x.shape[1], np.nan)
    undefined = constant_columns(x) | constant_columns(y)
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    # Normalising each column first keeps the products well scaled (as scipy does).
    x_norm = np.linalg.norm(xc, axis=0)
    y_norm = np.linalg.norm(yc, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sum((xc / x_norm) * (yc / y_norm), axis=0)
    r = np.clip(r, -1.0, 1.0)
    r[undefined] = np.nan
    return r


def spearman_columns(observed: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Spearman's rho between matching columns (Pearson's r of average ranks); NaN where constant."""
    from scipy.stats import rankdata

    x = np.asarray(observed, dtype=np.float64)
    y = np.asarray(predicted, dtype=np.float64)
    if x.shape[0] < 2:
        return np.full(x.shape[1] if x.ndim == 2 else 0, np.nan)
    return pearson_columns(rankdata(x, axis=0), rankdata(y, axis=0))


def constant_columns(values: np.ndarray) -> np.ndarray:
    """True for columns whose values are all equal (exactly) or that have no values."""
    values = np.asarray(values)
    if values.shape[0] == 0:
        return np.ones(values.shape[1], dtype=bool)
    return values.max(axis=0) == values.min(axis=0)
