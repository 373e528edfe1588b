"""Saving and loading trained models without pickle.

A saved model is a folder with ``manifest.json`` (method, genes, parameters, history, package
version) and ``weights.safetensors``. safetensors files hold raw tensors and a JSON header and
cannot carry code, so loading never executes anything from the file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import InputError, KeyExistsError, MissingKeyError
from .._logging import logger

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"


def save_model(model, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` to the folder ``path`` (see :meth:`sthisto.models.ExpressionModel.save`)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise KeyExistsError(
                f"{str(path)!r} exists and is not empty; pass overwrite=True or choose another folder."
            )
        if not (path / MANIFEST_FILE).exists():
            raise InputError(f"{str(path)!r} is not a saved sthisto model; refusing to overwrite it.")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(model.all_state_tensors(), str(path / WEIGHTS_FILE))  # before the manifest: it may add to it
    (path / MANIFEST_FILE).write_text(json.dumps(model.manifest(), indent=1))
    logger.info("saved %s model to %s", model.name, path)
    return path


def _check_manifest(manifest: Mapping[str, Any], where: str):
    from .. import __version__
    from ..models._base import MANIFEST_FORMAT, MANIFEST_VERSION
    from ..models._registry import resolve_method

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
    return cls


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


def load_model(path: str | Path):
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
    The model, predicting exactly as when it was saved.
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
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{manifest_path} is not valid JSON: {err}") from err
    cls = _check_manifest(manifest, str(path))
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(
            f"{weights_path} is not a valid safetensors file ({err}). sthisto reads weights only from "
            f"safetensors and never unpickles; re-save the model with model.save()."
        ) from err
    model = cls.from_manifest(manifest)
    _check_weights_shape(model, tensors, str(path), manifest)
    model.load_all_state_tensors(tensors)
    return model


def model_from_record(record: Mapping[str, Any]):
    """Rebuild a model from its ``uns['sthisto']['models'][key]`` record."""
    from safetensors.torch import load

    manifest = json.loads(str(record["manifest"]))
    cls = _check_manifest(manifest, "the stored model record")
    model = cls.from_manifest(manifest)
    tensors = load(np.asarray(record["weights"], dtype=np.uint8).tobytes())
    _check_weights_shape(model, tensors, "the stored model record", manifest)
    model.load_all_state_tensors(tensors)
    return model
