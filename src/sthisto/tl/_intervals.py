"""Stored calibrations → prediction intervals: what ``tl.predict(..., interval=)`` reads.

Shared by :mod:`~sthisto.tl._calibrate` (which writes the calibrations), ``tl.predict`` and the
spread checks; below them all, so that ``_train`` does not import ``_calibrate`` (which
imports ``_train``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._errors import InputError, MissingKeyError
from .._logging import logger

ABSOLUTE = "absolute"
"""Key of the plain split-conformal calibration in ``model.calibration``."""


def decode_quantiles(values) -> np.ndarray:
    """Inverse of the JSON encoding of stored quantiles (None means an infinite quantile)."""
    return np.array([[np.inf if v is None else float(v) for v in row] for row in values], dtype=np.float64)


def interval_bounds(entry: dict, mean: np.ndarray, std: np.ndarray | None, level: float):
    """``(lower, upper)`` of the calibrated interval at ``level`` around ``mean``."""
    levels = [float(v) for v in entry["levels"]]
    row = _level_row(levels, level)
    q = decode_quantiles(entry["quantiles"])[row]
    if entry["conformal"] == "normalized":
        if std is None:
            raise InputError("a normalised calibration needs the spread it was fitted with.")
        half = q * (np.asarray(std, dtype=np.float64) + np.asarray(entry["beta"], dtype=np.float64))
    else:
        half = np.broadcast_to(q, np.shape(mean))
    mean = np.asarray(mean, dtype=np.float64)
    return (mean - half).astype(np.float32), (mean + half).astype(np.float32)


def _level_row(levels: Sequence[float], level: float) -> int:
    for row, value in enumerate(levels):
        if abs(value - float(level)) < 1e-9:
            return row
    raise InputError(
        f"interval={level!r} was not calibrated (calibrated levels: {levels}). Pass one of them, or recalibrate "
        f"with sthisto.tl.calibrate(..., levels=[{level!r}])."
    )


def choose_calibration(model, uncertainty: str | None, interval) -> tuple[str, dict]:
    """The stored calibration ``tl.predict(..., interval=)`` uses, and its key."""
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < float(interval) < 1:
        raise InputError(f"interval={interval!r} must be a coverage level between 0 and 1, e.g. 0.9.")
    stored = getattr(model, "calibration", {}) or {}
    if not stored:
        raise MissingKeyError(
            f"interval={interval} needs a calibrated model, and this {model.name} model has no calibration. Run "
            f"sthisto.tl.calibrate(adata, model, calibration=<held-out sections>) first."
        )
    if uncertainty is not None and uncertainty in stored:
        key = uncertainty
    elif ABSOLUTE in stored:
        key = ABSOLUTE
        if uncertainty is not None:
            logger.info("no %r calibration stored: intervals use the plain (absolute) split-conformal one", uncertainty)
    else:
        raise MissingKeyError(
            f"the model is calibrated for {sorted(stored)}, not for uncertainty={uncertainty!r}; pass "
            f"uncertainty={sorted(stored)[0]!r} or recalibrate."
        )
    _level_row([float(v) for v in stored[key]["levels"]], float(interval))
    return key, stored[key]
