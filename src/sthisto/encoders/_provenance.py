"""Where weights came from: one record format for encoders, backbones, models and metrics tables.

A *provenance record* is a small JSON-able dict whose ``source`` is one of :data:`SOURCES`:

``"file"``
    a local checkpoint: ``path`` (resolved) and ``sha256`` of its bytes;
``"hub"``
    a model hub: ``hub_id`` (``hf-hub:<org>/<name>``), ``revision`` (the cached snapshot's
    commit) and, when the file is known, ``path`` and ``sha256``;
``"cache"``
    a framework's download cache (torchvision / timm): ``path`` and ``sha256``;
``"random"``
    a random initialisation (``seed`` and ``architecture`` when known);
``"none"``
    no weights at all (deterministic features such as ``handcrafted``);
``"module"``
    an in-memory module or callable (``fingerprint``: a hash of its parameters);
``"unknown"``
    features or models whose origin was not recorded.

:func:`provenance_label` turns a record into the short text a metrics table shows
(``random``, ``file:<sha256[:12]>``, ``hub:<id>@<revision>``, ...) and :func:`weights_label`
does the same for a model made of several components. :func:`with_weights_columns` adds that
text (and a ``random_weights`` flag) to a metrics table, so a table computed on random weights
cannot pass for a pretrained one.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._errors import InputError

SOURCES = ("file", "hub", "cache", "random", "none", "module", "unknown")
"""Values of a provenance record's ``source``."""

WEIGHTS_COLUMN = "weights"
"""Metrics-table column holding :func:`weights_label` of the model behind the predictions."""
RANDOM_COLUMN = "random_weights"
"""Metrics-table column: True when a component that is pretrained in the paper was random."""

_SHA256: dict[tuple[str, int, int], str] = {}


class RandomWeightsWarning(UserWarning):
    """Random weights stand where the paper uses pretrained ones; results are not the paper's setting."""


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, computed once per (path, size, modification time) in a process."""
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(resolved, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def weights_provenance(
    source: str,
    *,
    path: str | os.PathLike | None = None,
    hub_id: str | None = None,
    revision: str | None = None,
    seed: int | None = None,
    architecture: str | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """Build a provenance record (the only place records are made).

    Parameters
    ----------
    source
        One of :data:`SOURCES`.
    path
        The weights file (``file`` and ``cache``: required; ``hub``: the downloaded file). Its
        SHA-256 is computed here.
    hub_id, revision
        Hub id and commit (``hub``).
    seed, architecture
        Seed and architecture of a random initialisation.
    fingerprint
        Hash of an in-memory module's parameters (``module``).

    Returns
    -------
    A dict with ``source`` and only the fields that are known (no ``None`` values, so it
    survives ``write_h5ad``).
    """
    if source not in SOURCES:
        raise InputError(f"weights source {source!r}; use one of {SOURCES}.")
    if source in ("file", "cache") and path is None:
        raise InputError(f"a {source!r} provenance record needs the weights file's path.")
    if source == "hub" and not hub_id:
        raise InputError("a 'hub' provenance record needs hub_id='hf-hub:<org>/<name>'.")
    record: dict[str, Any] = {"source": source}
    if path is not None:
        record["path"] = str(Path(path).expanduser().resolve())
        record["sha256"] = file_sha256(path)
    optional = {"hub_id": hub_id, "revision": revision, "architecture": architecture, "fingerprint": fingerprint}
    record.update({k: str(v) for k, v in optional.items() if v is not None})
    if seed is not None:
        record["seed"] = int(seed)
    return record


def provenance_from_text(weights: str | None, fingerprint: str | None = None) -> dict[str, Any]:
    """Best reading of an older record that only has the ``weights`` text and fingerprint."""
    text = "" if weights is None else str(weights)
    if text.startswith("random"):
        return {"source": "random"}
    if text.startswith("none"):
        return {"source": "none"}
    if text.startswith("hf-hub:"):
        revision = str(fingerprint).rsplit("@", 1)[-1] if fingerprint and "@" in str(fingerprint) else None
        return {"source": "hub", "hub_id": text, **({"revision": revision} if revision else {})}
    if text and Path(text).expanduser().is_file():
        return weights_provenance("file", path=text)
    if fingerprint and str(fingerprint).startswith("params:"):
        return {"source": "module", "fingerprint": str(fingerprint)}
    return {"source": "unknown"}


def provenance_label(record: Mapping[str, Any] | None) -> str:
    """Short text of one provenance record, as metrics tables show it.

    Parameters
    ----------
    record
        A record of :func:`weights_provenance` (``None`` or empty: not recorded).

    Returns
    -------
    ``"random"``, ``"none"``, ``"file:<sha256[:12]>"``, ``"cache:<sha256[:12]>"``,
    ``"hub:<org>/<name>@<revision>"``, ``"module:<hash[:12]>"`` or ``"unknown"``.
    """
    if not record:
        return "unknown"
    source = str(record.get("source", "unknown"))
    if source in ("file", "cache"):
        digest = str(record.get("sha256", ""))[:12] or "?"
        return f"{source}:{digest}"
    if source == "hub":
        hub_id = str(record.get("hub_id", "?")).removeprefix("hf-hub:")
        return f"hub:{hub_id}@{record.get('revision', 'unknown')}"
    if source == "module":
        fingerprint = str(record.get("fingerprint", "")).removeprefix("params:")[:12]
        return f"module:{fingerprint}" if fingerprint else "module"
    return source


def component_records(provenance: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    """``{component: weights record}`` of a model's provenance (features carry theirs under ``weights``)."""
    out = {}
    for name, entry in (provenance or {}).items():
        if isinstance(entry, Mapping):
            out[str(name)] = entry.get("weights", entry) if "source" not in entry else entry
    return out


def weights_label(provenance: Mapping[str, Any] | None) -> str:
    """Text of a model's weight provenance for a metrics table.

    Parameters
    ----------
    provenance
        A model's ``provenance`` (``{component: record}``; a feature record holds its weights
        under ``"weights"``), e.g. from its manifest's ``weights_provenance``.

    Returns
    -------
    ``"unknown"`` for ``None`` (not recorded); ``"none"`` when no component is pretrained
    (everything trained from the seed, e.g. THItoGene); the :func:`provenance_label` of a
    single component; ``"<component>=<label>; ..."`` for several.
    """
    if provenance is None:
        return "unknown"
    records = component_records(provenance)
    if not records:
        return "none"
    if len(records) == 1:
        return provenance_label(next(iter(records.values())))
    return "; ".join(f"{name}={provenance_label(record)}" for name, record in sorted(records.items()))


def has_random_weights(provenance: Mapping[str, Any] | None) -> bool:
    """Whether any component of a model's provenance was randomly initialised."""
    return any(record.get("source") == "random" for record in component_records(provenance).values())


def with_weights_columns(table, label: str, *, random: bool, after: str = "predicted"):
    """Insert the ``weights`` and ``random_weights`` columns into a metrics table (in place; returned).

    Placed right after ``after`` when the table has that column, else first.
    """
    position = list(table.columns).index(after) + 1 if after in table.columns else 0
    for offset, (column, value) in enumerate(((WEIGHTS_COLUMN, str(label)), (RANDOM_COLUMN, bool(random)))):
        if column in table.columns:
            table[column] = value
        else:
            table.insert(position + offset, column, value)
    return table


def warn_random_weights(what: str, fix: str, *, stacklevel: int = 3) -> None:
    """Emit a :class:`RandomWeightsWarning`: ``what`` uses random weights where the paper's are pretrained."""
    warnings.warn(
        f"{what}: RANDOM weights stand where the paper uses pretrained ones, so the features carry no "
        f"pretrained knowledge and results are not comparable with the paper's. {fix}",
        RandomWeightsWarning,
        stacklevel=stacklevel,
    )
