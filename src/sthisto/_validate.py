"""Checks shared by the public entry points, so that bad input fails first and clearly.

Every check here raises one of sthisto's own errors (:mod:`sthisto._errors`) whose message
names the problem and the fix, before the calling function has read or written anything.
Public functions opt in with :func:`checked_input`, which validates the data object and every
output name before the body runs; finer checks (numbers, mappings, model records) are plain
functions that the readers and entry points call where the value is first used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from ._errors import InputError

F = TypeVar("F", bound=Callable[..., Any])

MAX_GRID_POSITIONS = 65_536
"""Largest grid index (per axis) a position-embedding table may span. Visium HD's 2 µm bins
reach ~3,350 and legacy ST ~35; a value above this is an offset or a pixel coordinate, and the
table it would need (positions × embedding width floats) runs to gigabytes."""

KEY_PARAMETERS = ("key_added",)
"""Keyword arguments that name something a call writes into the AnnData."""


def is_spatialdata(value) -> bool:
    """Whether ``value`` is a SpatialData object (checked by type, without importing spatialdata)."""
    return any(
        cls.__name__ == "SpatialData" and cls.__module__.startswith("spatialdata") for cls in type(value).__mro__
    )


def check_adata(adata, *, function: str) -> None:
    """Raise :class:`InputError` unless ``adata`` is an AnnData sthisto can work on."""
    import anndata as ad

    if isinstance(adata, ad.AnnData):
        return
    if is_spatialdata(adata):
        raise InputError(
            f"{function} was given a SpatialData object; it works on AnnData. Convert it first with "
            f"adata = sthisto.io.from_spatialdata(sdata), run {function}(adata, ...), and write results "
            f"back with sthisto.io.to_spatialdata(adata)."
        )
    raise InputError(
        f"{function} needs an AnnData as its first argument but got {type(adata).__name__}. Pass the AnnData "
        f"object itself (e.g. from sthisto.io.read_visium or anndata.read_h5ad), not a list, array or None."
    )


def check_key(value, *, name: str = "key_added") -> None:
    """Raise unless ``value`` can name an AnnData element that ``write_h5ad`` stores and reads back."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{name}={value!r} must be a non-empty string naming the result, e.g. {name}='my_result'.")
    if "/" in value:
        # h5py treats '/' as a group separator: the element is written nested and read_h5ad fails on the file.
        raise InputError(
            f"{name}={value!r} contains '/', which h5ad files read as a path separator (the saved file "
            f"could not be read back). Use another character, e.g. {name}={value.replace('/', '_')!r}."
        )


def check_unique_genes(adata, *, function: str) -> None:
    """Raise if ``adata.var_names`` has duplicates (gene columns could not be told apart)."""
    if adata.var_names.is_unique:
        return
    duplicated = adata.var_names[adata.var_names.duplicated()].unique()[:5].tolist()
    raise InputError(
        f"{function}: adata.var_names has duplicate gene names (e.g. {duplicated}), so genes cannot be "
        f"matched by name. Make them unique first: adata.var_names_make_unique()."
    )


def checked_input(function: F | None = None, *, genes: bool = False) -> F:
    """Decorate a public function: check its data object and output names before it runs.

    Parameters
    ----------
    function
        The public function; its first argument is the data object.
    genes
        Also require unique ``var_names`` (functions that match genes by name).
    """

    def decorate(fn: F) -> F:
        name = f"sthisto.{fn.__module__.split('.')[1]}.{fn.__name__}"

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            adata = args[0] if args else kwargs.get("adata")
            check_adata(adata, function=name)
            for key in KEY_PARAMETERS:
                if kwargs.get(key) is not None:
                    check_key(kwargs[key], name=key)
            if genes:
                check_unique_genes(adata, function=name)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate(function) if function is not None else decorate  # type: ignore[return-value]


def check_mapping(value, *, what: str, fix: str) -> Mapping:
    """Return ``value`` if it is a mapping, else raise naming ``what`` and ``fix``."""
    if isinstance(value, Mapping):
        return value
    raise InputError(f"{what} is a {type(value).__name__}, not a dict. {fix}")


def positive_number(value, *, what: str, fix: str) -> float:
    """``value`` as a positive finite float; strings, booleans, NaN, zero and negatives are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        shown = f"the string {value!r}" if isinstance(value, str) else f"a {type(value).__name__}"
        raise InputError(f"{what} is {shown}; it must be a positive number. {fix}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"{what} is {number!r}; it must be a positive finite number. {fix}")
    return number


def check_max_epochs(value) -> int | None:
    """``max_epochs`` as an int ≥ 1 (or None); 0 would store an untrained model as trained."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(
            f"max_epochs={value!r} must be a whole number of epochs ≥ 1 (or None for the paper's default); "
            f"0 or a negative value would store an untrained model as if trained."
        )
    return int(value)


def check_grid_extent(high: int, *, where: str, fix: str) -> None:
    """Refuse a position table larger than :data:`MAX_GRID_POSITIONS` before it is allocated."""
    if high > MAX_GRID_POSITIONS:
        raise InputError(
            f"{where} needs a position table of {high:,} entries, above sthisto's limit of "
            f"{MAX_GRID_POSITIONS:,} grid positions per axis (allocating it would take gigabytes). {fix}"
        )


def check_finite_tensors(tensors: Mapping[str, Any], *, where: str) -> None:
    """Raise if any floating-point tensor of a model holds NaN or infinite values."""
    import torch

    bad = [
        name
        for name, tensor in tensors.items()
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise InputError(
            f"{where} has NaN or infinite weights (in {bad[:5]}), so every prediction would be NaN. Training "
            f"diverged or the file is damaged: retrain (e.g. with a lower lr) or load an intact copy."
        )


def align_train_mask(adata, train_mask):
    """A boolean :class:`pandas.Series` mask aligned on ``adata.obs_names``; other masks pass through."""
    import pandas as pd

    if not isinstance(train_mask, pd.Series) or train_mask.dtype != bool:
        return train_mask
    if train_mask.index.equals(adata.obs_names):
        return train_mask.to_numpy()
    if not train_mask.index.is_unique or set(train_mask.index) != set(adata.obs_names):
        raise InputError(
            f"train_mask is a boolean Series whose index ({len(train_mask)} labels) is not the spots of "
            f"adata.obs_names ({adata.n_obs}), so it cannot be aligned. Build it from adata.obs, e.g. "
            f"adata.obs['library_id'] == 'A1', or pass a NumPy array in obs order."
        )
    return train_mask.reindex(adata.obs_names).to_numpy()


def manifest_fields(manifest, *, where: str) -> dict:
    """Check the types of a model manifest's fields, so a tampered one fails with a clear message."""
    if not isinstance(manifest, Mapping):
        raise InputError(
            f"{where}: the manifest is a JSON {type(manifest).__name__}, not an object; it was not written by "
            f"sthisto or was edited. Re-save the model with model.save() or retrain it."
        )
    try:
        int(manifest.get("format_version", -1))
    except (TypeError, ValueError):
        raise InputError(
            f"{where}: manifest format_version={manifest.get('format_version')!r} is not an integer; the file "
            f"was edited. Re-save the model with model.save()."
        ) from None
    expected = {
        "network_params": Mapping,
        "data_params": Mapping,
        "training_params": Mapping,
        "history": Mapping,
        "trained_on": Mapping,
        "extra": Mapping,
    }
    for field, kind in expected.items():
        if field in manifest and manifest[field] is not None and not isinstance(manifest[field], kind):
            raise InputError(
                f"{where}: manifest field {field!r} is a {type(manifest[field]).__name__}, not an object; the "
                f"file was edited. Re-save the model with model.save() or retrain it."
            )
    history = manifest.get("history") or {}
    if any(not isinstance(v, Sequence) or isinstance(v, str) for v in history.values()):
        raise InputError(f"{where}: manifest 'history' must map names to lists of numbers; re-save the model.")
    genes = manifest.get("genes")
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) for g in genes):
        raise InputError(
            f"{where} has no valid gene list (need a non-empty list of gene names); re-save the model with "
            f"model.save() or retrain it."
        )
    for group in ("data_params", "network_params"):
        value = (manifest.get(group) or {}).get("n_positions")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
            raise InputError(f"{where}: {group}['n_positions']={value!r} must be a positive integer; re-save.")
        check_grid_extent(
            int(value), where=where, fix="The manifest was edited or damaged; re-save or retrain the model."
        )
    return dict(manifest)


def parse_json(text, *, where: str):
    """``json.loads`` with sthisto errors for invalid and pathologically nested JSON."""
    import json

    try:
        return json.loads(str(text))
    except json.JSONDecodeError as err:
        raise InputError(f"{where} is not valid JSON ({err}); re-save the model with model.save().") from err
    except RecursionError:
        raise InputError(
            f"{where} is nested too deeply to be a sthisto manifest (a damaged or hostile file); re-save the "
            f"model with model.save() or retrain it."
        ) from None
