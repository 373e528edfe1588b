"""One place through which sthisto writes into AnnData objects.

Every write checks that it does not clobber an existing key (unless ``overwrite=True``), and is
logged, so a user can see exactly what a call added. Parameters of each call are recorded in
``uns['sthisto'][<function>][<key_added>]`` beside the result.

Each write is logged at the ``hint`` level and remembered for its object; the record a call
stores last (every writing function stores one after its writes) logs, at ``info``, one line
naming everything the call added: the summary ``sthisto.settings.verbosity`` shows by default.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._constants import Uns
from ._errors import KeyExistsError
from ._logging import HINT, logger

_SLOTS = ("obs", "var", "obsm", "varm", "obsp", "layers", "uns")

# Keys written into each object since its last record, for the one-line summary. Keyed by id
# (AnnData is unhashable) and emptied when the object is collected, so a write never keeps an
# object alive.
_written: dict[int, tuple[weakref.ref, list[str]]] = {}


def _remember(adata, where: str) -> None:
    logger.log(HINT, "added adata.%s", where)
    key = id(adata)
    entry = _written.get(key)
    if entry is None or entry[0]() is not adata:
        try:
            ref = weakref.ref(adata, lambda _, key=key: _written.pop(key, None))
        except TypeError:  # not weak-referenceable: its writes stay logged at hint only
            return
        entry = _written[key] = (ref, [])
    entry[1].append(where)


def _summarise(adata, function: str, where: str) -> None:
    entry = _written.pop(id(adata), None)
    keys = entry[1] if entry is not None and entry[0]() is adata else []
    keys = [*dict.fromkeys([*keys, where])]
    listed = ", ".join(keys[:-1]) + f" and {keys[-1]}" if len(keys) > 1 else keys[0]
    logger.info("%s: added %s", function, listed)


def check_writable(adata, slot: str, key: str, *, overwrite: bool) -> None:
    """Raise :class:`KeyExistsError` if ``adata.<slot>[key]`` exists and ``overwrite`` is False.

    Call it for every key a function will write *before* computing anything, so that a refused
    call leaves the object untouched.
    """
    if slot not in _SLOTS:
        raise ValueError(f"unknown AnnData slot {slot!r}; expected one of {_SLOTS}")
    container = getattr(adata, slot)
    if overwrite:
        return
    exists = key in container.columns if slot in ("obs", "var") else key in container
    if exists:
        raise KeyExistsError(
            f"adata.{slot}[{key!r}] already exists. Pass overwrite=True to replace it, "
            f"or key_added='<new name>' to keep both."
        )


def write(adata, slot: str, key: str, value: Any, *, overwrite: bool = False) -> None:
    """Write ``value`` to ``adata.<slot>[key]``, refusing to overwrite unless asked, and log it."""
    check_writable(adata, slot, key, overwrite=overwrite)
    container = getattr(adata, slot)
    container[key] = value
    _remember(adata, f"{slot}[{key!r}]")


def sthisto_uns(adata) -> dict:
    """Return ``adata.uns['sthisto']``, creating it when absent."""
    return adata.uns.setdefault(Uns.STHISTO, {})


def check_record_writable(adata, function: str, key: str, *, overwrite: bool) -> None:
    """Raise if ``uns['sthisto'][function][key]`` exists and ``overwrite`` is False."""
    existing = adata.uns.get(Uns.STHISTO, {}).get(function, {})
    if key in existing and not overwrite:
        raise KeyExistsError(
            f"adata.uns['sthisto'][{function!r}][{key!r}] already exists. Pass overwrite=True "
            f"to replace it, or key_added='<new name>' to keep both."
        )


def record(adata, function: str, key: str, params: Mapping[str, Any], *, overwrite: bool = False) -> None:
    """Store the parameters of a call at ``uns['sthisto'][function][key]`` in an h5ad-safe form."""
    check_record_writable(adata, function, key, overwrite=overwrite)
    sthisto_uns(adata).setdefault(function, {})[key] = to_uns(params)
    where = f"uns['sthisto'][{function!r}][{key!r}]"
    logger.log(HINT, "added adata.%s", where)
    _summarise(adata, function, where)


def to_uns(value: Any) -> Any:
    """Convert a value into something ``write_h5ad`` stores and ``read_h5ad`` gives back.

    Mappings stay mappings (keys as strings); tuples and lists of scalars become arrays; other
    objects are replaced by their ``repr`` so a record never breaks writing.
    """
    if isinstance(value, Mapping):
        return {str(k): to_uns(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str, np.generic, np.ndarray)):
        return value
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (bool, int, float, np.generic)) for v in value) or all(isinstance(v, str) for v in value):
            return np.asarray(value) if value else np.asarray([], dtype=str)
        return json.dumps(value, default=repr)
    if hasattr(value, "tolist"):
        return np.asarray(value)
    return repr(value)


def maybe_copy(adata, copy: bool):
    """Return the object to modify: a copy when ``copy`` is True, else ``adata`` itself."""
    return adata.copy() if copy else adata
