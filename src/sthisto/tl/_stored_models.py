"""How trained models are kept in an AnnData: records with or without weights, weights in files.

``tl.train`` stores its model with the weights (in ``uns``, or in a file under ``models_dir=``)
because ``tl.predict`` rebuilds it from there. ``tl.cross_validate`` keeps, per fold, a record
of what was trained (manifest, sections, ``tl.train`` arguments, held-out metrics) and the
weights only when asked: a full network is hundreds of MB, times one model per fold.
See ``docs/architecture.md`` ("Stored models").
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._constants import ModelRecord, Obs, Uns
from .._errors import InputError, MissingKeyError
from ..io._weights_store import (
    WEIGHTS_SUFFIX,
    check_models_dir,
    file_stem,
    inline_weights,
    plan_weights_file,
    references_file,
    write_weights_file,
)

CROSS_VALIDATE = "cross_validate"


# --- tl.train ---------------------------------------------------------------------------------------
def train_weights_file(models_dir, key_added: str, *, overwrite: bool) -> tuple[Path, str]:
    """``(path, relative name)`` of the file ``tl.train(models_dir=...)`` writes, checked before training."""
    folder = check_models_dir(models_dir)
    relative = f"{file_stem(key_added)}{WEIGHTS_SUFFIX}"
    return plan_weights_file(folder, relative, overwrite=overwrite), relative


def model_record(model, *, weights_file: tuple[Path, str] | None = None) -> dict[str, Any]:
    """A ``uns['sthisto']['models']`` record: the manifest and the weights (inline, or in ``weights_file``)."""
    if weights_file is None:
        return model.to_record()
    path, relative = weights_file
    return {ModelRecord.MANIFEST: json.dumps(model.manifest()), **write_weights_file(model, path, relative=relative)}


def with_new_manifest(record: Mapping[str, Any], model) -> dict[str, Any] | None:
    """``record`` with ``model``'s manifest, when its weights are in a file (else None).

    ``tl.calibrate`` changes the manifest only; rewriting the weights would move a file-backed
    model's weights back into ``uns``.
    """
    if not references_file(record):
        return None
    return {**record, ModelRecord.MANIFEST: json.dumps(model.manifest())}


# --- tl.cross_validate ------------------------------------------------------------------------------
def resolve_weights_option(store_weights, models_dir, store_models) -> tuple[bool, Path | None]:
    """``(keep weights, folder)`` from cross_validate's options, refusing contradictions."""
    import warnings

    if store_models is not None:
        warnings.warn(
            "cross_validate(store_models=...) is deprecated: fold records are kept without weights by default; "
            "pass store_weights=True to keep them in uns, or models_dir=<folder> to write one file per fold.",
            FutureWarning,
            stacklevel=4,  # the user's call, past cross_validate and its checked_input wrapper
        )
        if store_weights is not None and bool(store_weights) != bool(store_models):
            raise InputError(f"store_models={store_models!r} contradicts store_weights={store_weights!r}; pass one.")
        store_weights = bool(store_models)
    if store_weights is not None and not isinstance(store_weights, bool):
        raise InputError(f"store_weights={store_weights!r} must be True, False or None.")
    folder = None if models_dir is None else check_models_dir(models_dir)
    if folder is not None and store_weights is False:
        raise InputError(
            "models_dir= writes each fold's weights to a file, but store_weights=False keeps none; drop one of them."
        )
    return bool(store_weights) or folder is not None, folder


def plan_fold_files(folder: Path, key: str, folds: Sequence[str], *, overwrite: bool) -> dict[str, tuple[Path, str]]:
    """The weight file of each fold, ``<models_dir>/<key>/<fold>.safetensors``, checked before training."""
    plan, used = {}, set()
    for number, fold in enumerate(folds):
        stem = file_stem(fold)
        if stem in used:  # two fold names that differ only in characters a file name cannot hold
            stem = f"{stem}-{number}"
        used.add(stem)
        relative = f"{file_stem(key)}/{stem}{WEIGHTS_SUFFIX}"
        plan[fold] = (plan_weights_file(folder, relative, overwrite=overwrite), relative)
    return plan


def fold_record(
    model,
    *,
    fold: str,
    train_sections: Sequence[str],
    test_sections: Sequence[str],
    train_params: Mapping[str, Any],
    store_weights: bool,
    weights_file: tuple[Path, str] | None = None,
) -> dict[str, Any]:
    """What a fold keeps: manifest, sections, the training call, and the weights only when asked."""
    record = {
        ModelRecord.MANIFEST: json.dumps(model.manifest()),
        ModelRecord.FOLD: str(fold),
        ModelRecord.TRAIN_SECTIONS: [str(s) for s in train_sections],
        ModelRecord.TEST_SECTIONS: [str(s) for s in test_sections],
        ModelRecord.TRAIN_PARAMS: json.dumps(dict(train_params), default=str),
        ModelRecord.METRICS: "{}",
        ModelRecord.STORED: "none",
    }
    if weights_file is not None:
        path, relative = weights_file
        record.update(write_weights_file(model, path, relative=relative))
    elif store_weights:
        record.update(inline_weights(model))
    return record


def fold_metrics(table, test_sections: Sequence[str]) -> str:
    """JSON ``{section: {metric: value}}`` of a fold's held-out sections, from the metrics table."""
    rows = table[(table["scope"] == "group") & table["group"].astype(str).isin([str(s) for s in test_sections])]
    if "evaluated_on" in rows:
        rows = rows[rows["evaluated_on"] == "held_out"]
    metrics: dict[str, dict[str, float]] = {}
    for group, metric, value in zip(rows["group"].astype(str), rows["metric"], rows["value"]):
        metrics.setdefault(group, {})[str(metric)] = float(value)
    return json.dumps(metrics)


def fold_model(adata, key: str, fold: str, *, models_dir=None):
    """The trained model of fold ``fold`` of ``uns['sthisto']['cross_validate'][key]``."""
    from ..io._model import model_from_record

    runs = adata.uns.get(Uns.STHISTO, {}).get(CROSS_VALIDATE, {})
    if key not in runs or "models" not in runs[key]:
        raise MissingKeyError(
            f"no cross-validation under uns['sthisto']['cross_validate'][{key!r}] (stored: {sorted(runs)}). "
            f"Pass the key_added of sthisto.tl.cross_validate."
        )
    records = runs[key]["models"]
    if str(fold) not in records:
        raise MissingKeyError(f"cross-validation {key!r} has no fold {fold!r}; its folds are {sorted(records)}.")
    record = records[str(fold)]
    if ModelRecord.WEIGHTS not in record and not references_file(record):
        raise InputError(_retrain_hint(runs[key], record, key, str(fold)))
    model = model_from_record(record, models_dir=models_dir)
    return model


def _retrain_hint(entry: Mapping[str, Any], record: Mapping[str, Any], key: str, fold: str) -> str:
    """The error for a fold kept without weights: how to get its model back."""
    params = json.loads(str(record.get(ModelRecord.TRAIN_PARAMS, "{}")))
    method = params.pop("method", str(entry.get("method", "<method>")))
    train = [str(s) for s in record.get(ModelRecord.TRAIN_SECTIONS, [])]
    split = str(entry.get("split", ""))
    if split == "spots":
        fold_key = str(entry.get("fold_key", "<key>_fold"))
        mask = f"(adata.obs[{Obs.LIBRARY_ID!r}] == {fold!r}) & (adata.obs[{fold_key!r}] != {fold!r})"
    else:
        mask = repr(train)
    arguments = ", ".join(f"{k}={v!r}" for k, v in params.items())
    note = ""
    if int(entry.get("folds", {}).get(fold, {}).get("n_calibration_spots", 0) or 0):
        note = " (this fold also held calibration spots aside, so the retrained model sees a few more spots)"
    return (
        f"fold {fold!r} of uns['sthisto']['cross_validate'][{key!r}] was kept without weights (cross_validate's "
        f"default). Its record, record = adata.uns['sthisto']['cross_validate'][{key!r}]['models'][{fold!r}], "
        f"holds the manifest, sections, training arguments and metrics: retrain the fold's model with "
        f"sthisto.tl.train(adata, {method!r}, genes=json.loads(record['manifest'])['genes'], train_mask={mask}"
        + (f", {arguments}" if arguments else "")
        + f"){note}, or rerun sthisto.tl.cross_validate(..., store_weights=True) (weights in uns) or "
        f"models_dir=<folder> (one weights file per fold)."
    )
