"""Model weights kept outside ``adata.uns``: one safetensors file per model, named by its record.

A record that references a file holds the file's absolute path, its path relative to the
``models_dir`` it was written to, its size and its SHA-256. Loading reads the file once,
checks the hash on exactly the bytes it then decodes, and refuses a file that moved (with the
folder to pass instead) or changed (a different model's weights would predict silently
differently). safetensors cannot carry code, so nothing from the file is ever executed.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._constants import ModelRecord
from .._errors import InputError, KeyExistsError, MissingKeyError

WEIGHTS_SUFFIX = ".safetensors"


def file_stem(name: str) -> str:
    """A file-name-safe form of a key or fold name (library ids may hold ``/`` or spaces)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return stem or "model"


def check_models_dir(models_dir: str | Path, *, argument: str = "models_dir") -> Path:
    """``models_dir`` as a Path, refusing one that exists as a file (before any work)."""
    if isinstance(models_dir, bool) or not isinstance(models_dir, (str, os.PathLike)):
        raise InputError(f"{argument}={models_dir!r} must be a folder path (str or pathlib.Path).")
    folder = Path(models_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{argument}={str(folder)!r} is a file, not a folder; pass a folder for the weight files.")
    return folder


def plan_weights_file(folder: Path, relative: str | Path, *, overwrite: bool) -> Path:
    """The file a model's weights will go to, checked before any training.

    Refuses an existing file unless ``overwrite`` and anything that is not a regular file
    (a folder of the same name is never removed).
    """
    path = Path(folder) / relative
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise InputError(
                f"{str(path)!r} exists and is not a file; refusing to replace it. Choose another models_dir."
            )
        if not overwrite:
            raise KeyExistsError(
                f"the weights file {str(path)!r} already exists. Pass overwrite=True to replace it, or choose "
                f"another models_dir (or key_added) to keep both."
            )
    return path


def write_weights_file(model, path: Path, *, relative: str | Path) -> dict[str, Any]:
    """Write ``model``'s tensors (ensemble members included) to ``path``; return the record's file fields.

    The bytes are written to a temporary file beside ``path`` and renamed into place, so a
    crash never leaves a half-written file under the name a record points at.
    """
    from safetensors.torch import save

    data = save(model.all_state_tensors())
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {
        ModelRecord.STORED: "file",
        ModelRecord.WEIGHTS_FILE: str(path),
        ModelRecord.WEIGHTS_NAME: Path(relative).as_posix(),
        ModelRecord.WEIGHTS_SHA256: hashlib.sha256(data).hexdigest(),
        ModelRecord.WEIGHTS_BYTES: len(data),
    }


def inline_weights(model) -> dict[str, Any]:
    """The record's fields for weights kept in ``uns``: safetensors bytes as uint8."""
    from safetensors.torch import save

    data = save(model.all_state_tensors())
    return {ModelRecord.STORED: "uns", ModelRecord.WEIGHTS: np.frombuffer(data, dtype=np.uint8).copy()}


def references_file(record: Mapping[str, Any]) -> bool:
    """Whether a record's weights live in a file."""
    return isinstance(record, Mapping) and ModelRecord.WEIGHTS_FILE in record


def read_weights_file(record: Mapping[str, Any], *, where: str, models_dir: str | Path | None = None) -> dict:
    """The tensors of a file-referencing record, after checking the file is the one written."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    recorded = Path(str(record[ModelRecord.WEIGHTS_FILE]))
    name = str(record.get(ModelRecord.WEIGHTS_NAME, recorded.name))
    expected = str(record.get(ModelRecord.WEIGHTS_SHA256, ""))
    if models_dir is not None:
        path = check_models_dir(models_dir) / name
        looked = f"{str(path)!r} (models_dir={str(models_dir)!r} + the record's {name!r})"
    else:
        path = recorded
        looked = f"{str(path)!r}"
    if not path.is_file():
        raise MissingKeyError(
            f"the weights of {where} are in a file that is not at {looked}: it was moved or deleted. Put it "
            f"back, or pass models_dir=<the folder that now holds {name!r}> (e.g. "
            f"sthisto.tl.get_model(adata, ..., models_dir=...)); if the file is gone, retrain the model."
        )
    data = path.read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != expected:
        raise InputError(
            f"the weights file {str(path)!r} of {where} changed since it was written (SHA-256 {found[:12]}…, "
            f"the record says {expected[:12] or '<none>'}…): it holds other weights than the model recorded. "
            f"Restore the original file, point models_dir= at the folder holding it, or retrain the model."
        )
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError) as err:  # the hash matched a damaged record's hash
        raise InputError(f"{str(path)!r} is not a valid safetensors file ({err}); retrain the model.") from err
