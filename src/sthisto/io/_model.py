"""Saving and loading trained models without pickle.

A saved model is a folder with ``manifest.json`` (method, genes, parameters, history, package
version) and ``weights.safetensors``. safetensors files hold raw tensors and a JSON header and
cannot carry code, so loading never executes anything from the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._constants import MANIFEST_FORMAT, MANIFEST_VERSION
from .._errors import InputError, KeyExistsError, MissingKeyError
from .._logging import logger
from .._method_registry import resolve_method
from .._validate import check_finite_tensors, manifest_fields, parse_json

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"


def save_model(model, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` to the folder ``path`` (see :meth:`sthisto.models.ExpressionModel.save`)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KeyExistsError(f"{str(path)!r} is a file, not a folder; choose a folder path for the saved model.")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise KeyExistsError(
                f"{str(path)!r} exists and is not empty; pass overwrite=True or choose another folder."
            )
        check_replaceable(path)
    path.mkdir(parents=True, exist_ok=True)
    # Only sthisto's own two files are ever replaced (never the folder): whatever else a user keeps
    # next to them was refused above, and nothing outside these names is touched.
    save_file(model.all_state_tensors(), str(path / WEIGHTS_FILE))  # before the manifest: it may add to it
    (path / MANIFEST_FILE).write_text(json.dumps(model.manifest(), indent=1))
    logger.info("saved %s model to %s", model.name, path)
    return path


def check_replaceable(path: Path) -> None:
    """Raise unless ``path`` holds exactly a saved sthisto model (so overwriting it loses nothing else)."""
    others = sorted(p.name for p in path.iterdir() if p.name not in (MANIFEST_FILE, WEIGHTS_FILE))
    manifest_path = path / MANIFEST_FILE
    manifest = None
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError, RecursionError):
            manifest = None
    is_model = isinstance(manifest, Mapping) and manifest.get("format") == MANIFEST_FORMAT
    if others or not is_model:
        reason = f"it also holds {others[:5]}" if others else "its manifest.json is not a sthisto model manifest"
        raise InputError(
            f"{str(path)!r} is not a saved sthisto model ({reason}); refusing to overwrite it so that none of "
            f"its files are lost. Choose another folder for model.save()."
        )


def _check_manifest(manifest: Mapping[str, Any], where: str):
    from .._about import __version__

    manifest = manifest_fields(manifest, where=where)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{where} is not a sthisto model manifest (format={manifest.get('format')!r}).")
    if int(manifest.get("format_version", -1)) > MANIFEST_VERSION:
        raise InputError(
            f"{where} was written by a newer sthisto (manifest format {manifest['format_version']}, "
            f"this version reads ≤ {MANIFEST_VERSION}); upgrade sthisto."
        )
    saved_version = str(manifest.get("sthisto_version", "unknown"))
    if saved_version.split(".")[:1] != str(__version__).split(".")[:1]:
        logger.warning(
            "%s was saved by sthisto %s; this is sthisto %s. Major versions differ: check predictions.",
            where,
            saved_version,
            __version__,
        )
    genes = manifest.get("genes")
    if not isinstance(genes, list) or not genes or len(set(genes)) != len(genes):
        raise InputError(f"{where} has no valid gene list (need unique gene names).")
    cls, _ = resolve_method(str(manifest.get("method")))
    return cls, manifest


def _check_weights_shape(model, tensors: Mapping[str, Any], where: str, manifest: Mapping[str, Any]) -> None:
    if model.network is None:  # closed-form models (ridge) check their own arrays when loading
        return
    expected = model.all_state_tensors()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tuple(expected[k].shape) != tuple(tensors[k].shape)]
    if missing or extra or wrong:
        raise InputError(
            f"weights in {where} do not fit a {model.name} model with {len(model.genes)} genes: "
            f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}."
        )


def load_model(path: str | Path) -> Any:
    """Load a model saved with ``model.save(path)``.

    Checks the manifest (format, package version, method, genes) and that the weights fit the
    method's network for those genes. Weights are read from safetensors only: no pickled object
    is ever unpickled, so a tampered file cannot run code.

    Parameters
    ----------
    path
        The folder written by :meth:`~sthisto.models.ExpressionModel.save`.

    Returns
    -------
    The model (an :class:`~sthisto.models.ExpressionModel`; annotated ``Any`` because model files
    sit below the methods in the import layers), predicting exactly as when it was saved.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest_path, weights_path = path / MANIFEST_FILE, path / WEIGHTS_FILE
    if not manifest_path.is_file() or not weights_path.is_file():
        raise MissingKeyError(
            f"{str(path)!r} is not a saved sthisto model: expected a folder with {MANIFEST_FILE} and "
            f"{WEIGHTS_FILE} (written by model.save). sthisto never loads pickled checkpoints."
        )
    manifest = parse_json(manifest_path.read_text(), where=str(manifest_path))
    cls, manifest = _check_manifest(manifest, str(path))
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(
            f"{weights_path} is not a valid safetensors file ({err}). sthisto reads weights only from "
            f"safetensors and never unpickles; re-save the model with model.save()."
        ) from err
    model = cls.from_manifest(manifest)
    _check_weights_shape(model, tensors, str(path), manifest)
    check_finite_tensors(tensors, where=f"the model saved in {str(path)!r}")
    model.load_all_state_tensors(tensors)
    return model


def model_from_record(record: Mapping[str, Any], *, models_dir: str | Path | None = None):
    """Rebuild a model from its ``uns['sthisto']['models'][key]`` record.

    The weights are in the record (safetensors bytes) or in the file it references, which is
    looked up under ``models_dir`` when given (see :mod:`sthisto.io._weights_store`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    from ._weights_store import read_weights_file, references_file

    where = "the stored model record"
    has_weights = isinstance(record, Mapping) and ("weights" in record or references_file(record))
    if not isinstance(record, Mapping) or "manifest" not in record or not has_weights:
        raise InputError(
            f"{where} is a {type(record).__name__} without 'manifest' and 'weights' (or a weights file); it was "
            f"not written by sthisto.tl.train or was edited. Retrain the model, or store it again with "
            f"model.to_record()."
        )
    manifest = parse_json(record["manifest"], where=f"{where}'s manifest")
    cls, manifest = _check_manifest(manifest, where)
    model = cls.from_manifest(manifest)
    if references_file(record):
        tensors = read_weights_file(record, where=where, models_dir=models_dir)
    else:
        try:
            tensors = load(np.asarray(record["weights"], dtype=np.uint8).tobytes())
        except (SafetensorError, OSError, ValueError, TypeError) as err:
            raise InputError(
                f"the weights of {where} are not valid safetensors bytes ({err}); the record was damaged. "
                f"Retrain the model or load it from its saved folder with sthisto.io.load_model."
            ) from err
    _check_weights_shape(model, tensors, where, manifest)
    check_finite_tensors(tensors, where=where)
    model.load_all_state_tensors(tensors)
    return model
