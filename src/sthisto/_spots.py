"""Per-spot accessors every layer reads: section labels, centres, grid positions.

Each returns the values checked, or raises an error that says how to fix the data.
"""

from __future__ import annotations

import numpy as np

from ._constants import Obs, Obsm
from ._errors import InputError, MissingKeyError


def spot_coordinates(adata) -> np.ndarray:
    """Return ``obsm['spatial']`` as a float (n_obs, 2) array of (x, y), checking it."""
    if Obsm.SPATIAL not in adata.obsm:
        raise MissingKeyError(
            "adata.obsm['spatial'] is missing: spot centres (x, y) in full-resolution pixels are "
            "needed to cut patches. Read the data with a sthisto.io reader or set it yourself."
        )
    coords = np.asarray(adata.obsm[Obsm.SPATIAL], dtype=float)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise InputError(f"adata.obsm['spatial'] has shape {coords.shape}; expected (n_obs, 2) columns (x, y).")
    if not np.isfinite(coords[:, :2]).all():
        bad = int((~np.isfinite(coords[:, :2])).any(axis=1).sum())
        raise InputError(
            f"adata.obsm['spatial'] has {bad} spots with NaN or infinite coordinates; drop them "
            f"(adata = adata[np.isfinite(adata.obsm['spatial']).all(axis=1)].copy()) or fix them."
        )
    return coords[:, :2]


def library_ids(adata) -> np.ndarray:
    """Return ``obs['library_id']`` as strings, or raise a clear error."""
    if Obs.LIBRARY_ID not in adata.obs:
        raise MissingKeyError(
            "adata.obs['library_id'] is missing: sthisto needs to know the section of every spot. "
            "For a single section: adata.obs['library_id'] = pd.Categorical(['<name>'] * adata.n_obs)."
        )
    column = adata.obs[Obs.LIBRARY_ID]
    missing = column.isna().to_numpy()
    if missing.any():
        # astype(str) would file these spots under a section literally named 'nan'.
        names = adata.obs_names[missing][:5].tolist()
        raise InputError(
            f"{int(missing.sum())} spots have no obs['library_id'] (NaN, e.g. {names}). Assign each spot its "
            f"section, or drop them: adata = adata[adata.obs['library_id'].notna()].copy()."
        )
    return column.astype(str).to_numpy()


def grid_positions(adata) -> np.ndarray:
    """Integer grid coordinates ``(n_obs, 2)``, columns (x, y) = (array_col, array_row)."""
    missing = [k for k in (Obs.ARRAY_COL, Obs.ARRAY_ROW) if k not in adata.obs]
    if missing:
        raise MissingKeyError(
            f"adata.obs lacks {missing}: this method embeds integer grid positions. Readers set "
            f"them; for your own data add obs['array_col'] / obs['array_row'] (integers from 0)."
        )
    values = adata.obs[[Obs.ARRAY_COL, Obs.ARRAY_ROW]].to_numpy()
    if not np.isfinite(values.astype(float)).all():
        raise InputError("obs['array_col'] / obs['array_row'] contain NaN; every spot needs grid coordinates.")
    if (values.astype(float) != np.round(values.astype(float))).any():
        raise InputError("obs['array_col'] / obs['array_row'] must be integers (grid indices), not pixels.")
    values = values.astype(np.int64)
    if len(values) and values.min() < 0:
        raise InputError("obs['array_col'] / obs['array_row'] contain negative values; shift them to start at 0.")
    return values


def pd_unique(values: np.ndarray) -> list:
    """Unique values in order of first appearance."""
    _, first = np.unique(values, return_index=True)
    return [values[i] for i in np.sort(first)]
