"""Bad input, as a table: every case raises an error naming the problem and leaves the input as it was."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sthisto
from sthisto._errors import InputError, KeyExistsError, MissingKeyError, NoImageError
from sthisto.cli import main


@pytest.fixture(scope="module")
def base() -> ad.AnnData:
    adata = sthisto.datasets.synthetic(n_sections=2, n_spots=40, n_genes=8, seed=11)
    sthisto.tl.train(adata, "ridge_tiny", encoder="handcrafted", key_added="fitted")
    return adata


def _fingerprint(adata) -> str:
    """Everything a call could change: keys of every slot, X, spatial coordinates, images."""
    digest = hashlib.sha256()
    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    digest.update(np.ascontiguousarray(x, dtype=np.float64).tobytes())
    digest.update(repr(sorted(adata.obs.columns)).encode() + repr(sorted(adata.var.columns)).encode())
    for slot in ("obsm", "layers", "obsp", "varm"):
        digest.update(repr((slot, sorted(getattr(adata, slot).keys()))).encode())
    if "spatial" in adata.obsm:
        digest.update(np.ascontiguousarray(adata.obsm["spatial"], dtype=np.float64).tobytes())
    digest.update(repr(_uns_keys(adata.uns)).encode())
    digest.update(adata.obs.to_csv().encode())
    return digest.hexdigest()


def _uns_keys(mapping, depth: int = 0):
    if not isinstance(mapping, dict) or depth > 4:
        return None
    return {k: _uns_keys(v, depth + 1) for k, v in sorted(mapping.items())}


@dataclass
class Case:
    problem: str
    prepare: Callable[[ad.AnnData], ad.AnnData]
    call: Callable[[ad.AnnData], object]
    error: type[Exception]
    message: str


def _set(adata, fn):
    fn(adata)
    return adata


def _add_empty_library(adata) -> None:
    adata.obs = adata.obs.assign(library_id=adata.obs["library_id"].cat.add_categories("EMPTY"))


def _library(adata) -> str:
    return str(adata.obs["library_id"].cat.categories[0])


def _set_image(adata, image):
    lib = _library(adata)
    adata.uns["spatial"][lib]["images"]["fullres"] = image
    return adata


def _fullres(adata) -> np.ndarray:
    return adata.uns["spatial"][_library(adata)]["images"]["fullres"]


def _spatial_entry(adata) -> dict:
    return adata.uns["spatial"][_library(adata)]


def _set_scalefactor(key, value):
    return lambda a: _set(a, lambda a: _spatial_entry(a)["scalefactors"].__setitem__(key, value))


def _set_entry_part(part, value):
    return lambda a: _set(a, lambda a: _spatial_entry(a).__setitem__(part, value))


def _float_image(adata, *, scale: float, nan: bool = False) -> np.ndarray:
    image = _fullres(adata).astype(np.float32) * scale
    if nan:
        image[:5, :5] = np.nan
    return image


def _duplicate_genes(adata) -> ad.AnnData:
    adata.var_names = pd.Index([adata.var_names[0]] * 2 + list(adata.var_names[2:]))
    return adata


def _nan_library(adata) -> ad.AnnData:
    values = adata.obs["library_id"].astype(object).to_numpy()
    values[:3] = np.nan
    adata.obs = adata.obs.assign(library_id=pd.Categorical(values))
    return adata


def _one_spot_section(adata) -> ad.AnnData:
    """Section S01 whole plus a single spot of S02: S02 trains as a one-spot section."""
    libraries = adata.obs["library_id"].astype(str).to_numpy()
    keep = np.flatnonzero(libraries == _library(adata)).tolist() + [
        int(np.flatnonzero(libraries != _library(adata))[0])
    ]
    return adata[keep].copy()


def _offset_grid(adata) -> ad.AnnData:
    adata.obs = adata.obs.assign(array_row=adata.obs["array_row"] + 10**8)
    return adata


def _record(adata) -> dict:
    return adata.uns["sthisto"]["models"]["fitted"]


def _edit_manifest(edit):
    """Prepare step: rewrite the stored model's manifest (a tampered record)."""

    def prepare(adata):
        record = dict(_record(adata))
        manifest = json.loads(str(record["manifest"]))
        record["manifest"] = json.dumps(edit(manifest))
        adata.uns["sthisto"]["models"]["fitted"] = record
        return adata

    return prepare


def _set_record_field(field, value):
    def prepare(adata):
        record = dict(_record(adata))
        record[field] = value
        adata.uns["sthisto"]["models"]["fitted"] = record
        return adata

    return prepare


def _with(mapping, **changes):
    return {**mapping, **changes}


def _nan_weights(adata) -> ad.AnnData:
    from safetensors.torch import load, save

    record = dict(_record(adata))
    tensors = load(np.asarray(record["weights"], dtype=np.uint8).tobytes())
    tensors["coef"] = tensors["coef"] * float("nan")
    record["weights"] = np.frombuffer(save(tensors), dtype=np.uint8).copy()
    adata.uns["sthisto"]["models"]["fitted"] = record
    return adata


def _nan_model(adata):
    model = sthisto.tl.get_model(adata, "fitted")
    model.estimator.coef_ = np.full_like(model.estimator.coef_, np.nan)
    return model


def _swap_two_spots(adata) -> ad.AnnData:
    coords = np.array(adata.obsm["spatial"], dtype=float)
    coords[[0, 1]] = coords[[1, 0]]
    adata.obsm["spatial"] = coords
    return adata


def _spatialdata():
    import spatialdata

    return spatialdata.SpatialData()


def _foreign_series_mask(adata) -> pd.Series:
    return pd.Series(np.ones(adata.n_obs, bool), index=[f"other_{i}" for i in range(adata.n_obs)])


def _train(a, method="ridge_tiny", **kwargs):
    kwargs.setdefault("key_added", "new")
    if method.startswith("ridge"):
        kwargs.setdefault("encoder", "handcrafted")
    return sthisto.tl.train(a, method, progress=False, **kwargs)


def _embed(a, **kwargs):
    kwargs.setdefault("key_added", "X_new")
    return sthisto.pp.embed(a, encoder="handcrafted", **kwargs)


def _predict(a, model="fitted", **kwargs):
    kwargs.setdefault("key_added", "new")
    return sthisto.tl.predict(a, model, **kwargs)


CASES = [
    Case(
        "missing spatial coordinates",
        lambda a: _set(a, lambda a: a.obsm.pop("spatial")),
        lambda a: sthisto.pp.embed(a, encoder="handcrafted", key_added="X_new"),
        MissingKeyError,
        r"obsm\['spatial'\] is missing",
    ),
    Case(
        "spots outside the image",
        lambda a: _set(a, lambda a: a.obsm["spatial"].__setitem__((0, 0), 1e7)),
        lambda a: sthisto.pp.embed(a, encoder="handcrafted", key_added="X_new"),
        InputError,
        r"outside its",
    ),
    Case(
        "RGBA image",
        lambda a: _set_image(a, np.dstack([_fullres(a), np.full(_fullres(a).shape[:2], 255, np.uint8)])),
        lambda a: sthisto.pp.embed(a, encoder="handcrafted", key_added="X_new"),
        InputError,
        r"RGBA",
    ),
    Case(
        "grayscale image",
        lambda a: _set_image(a, _fullres(a)[..., 0]),
        lambda a: sthisto.pp.embed(a, encoder="handcrafted", key_added="X_new"),
        InputError,
        r"grayscale",
    ),
    Case(
        "16-bit image",
        lambda a: _set_image(a, _fullres(a).astype(np.uint16) * 257),
        lambda a: sthisto.pp.embed(a, encoder="handcrafted", key_added="X_new"),
        InputError,
        r"8-bit",
    ),
    Case(
        "NaN counts",
        lambda a: _set(a, lambda a: setattr(a, "X", _with_value(a.X, np.nan))),
        lambda a: sthisto.pp.normalize(a, key_added="target_new"),
        InputError,
        r"NaN",
    ),
    Case(
        "negative counts",
        lambda a: _set(a, lambda a: setattr(a, "X", _with_value(a.X, -3.0))),
        lambda a: sthisto.tl.train(a, "ridge_tiny", encoder="handcrafted", key_added="new"),
        InputError,
        r"negative",
    ),
    Case(
        "duplicate spot ids",
        lambda a: _set(a, lambda a: setattr(a, "obs_names", pd.Index([a.obs_names[0]] * 2 + list(a.obs_names[2:])))),
        lambda a: sthisto.tl.train(a, "ridge_tiny", encoder="handcrafted", key_added="new"),
        InputError,
        r"duplicate spot ids",
    ),
    Case(
        "empty section",
        lambda a: _set(a, _add_empty_library),
        lambda a: sthisto.tl.train(a, "ridge_tiny", train_mask=["EMPTY"], key_added="new"),
        InputError,
        r"no spots .*empty section",
    ),
    Case(
        "unknown section name",
        lambda a: a,
        lambda a: sthisto.tl.train(a, "ridge_tiny", train_mask=["NOPE"], key_added="new"),
        MissingKeyError,
        r"NOPE.*not in obs\['library_id'\]",
    ),
    Case(
        "genes absent from the data",
        lambda a: a,
        lambda a: sthisto.tl.train(a, "ridge_tiny", genes=["NOT_A_GENE"], key_added="new"),
        MissingKeyError,
        r"not in adata.var_names",
    ),
    Case(
        "genes absent from the data (selection)",
        lambda a: a,
        lambda a: sthisto.pp.select_genes(a, genes=["NOT_A_GENE"], key_added="sel_new"),
        MissingKeyError,
        r"NOT_A_GENE",
    ),
    Case(
        "patch larger than the image",
        lambda a: a,
        lambda a: sthisto.pp.embed(a, encoder="handcrafted", patch_size_um=1e6, key_added="X_new"),
        InputError,
        r"larger than",
    ),
    Case(
        "missing microns per pixel",
        lambda a: _set(a, lambda a: a.uns["spatial"][_library(a)]["scalefactors"].pop("microns_per_pixel")),
        lambda a: sthisto.pp.embed(a, encoder="handcrafted", key_added="X_new"),
        MissingKeyError,
        r"microns_per_pixel",
    ),
    Case(
        "section without an image asked for patches",
        lambda a: _set(a, lambda a: a.uns["spatial"][_library(a)]["metadata"].__setitem__("has_image", False)),
        lambda a: sthisto.pp.embed(a, encoder="handcrafted", key_added="X_new"),
        NoImageError,
        r"no H&E image",
    ),
    Case(
        "unknown method",
        lambda a: a,
        lambda a: sthisto.tl.train(a, "not_a_method"),
        InputError,
        r"unknown method 'not_a_method'. Valid names: .*ridge",
    ),
    Case(
        "unknown method parameter",
        lambda a: a,
        lambda a: sthisto.tl.train(a, "ridge_tiny", key_added="new", not_a_parameter=3),
        InputError,
        r"does not accept \['not_a_parameter'\]",
    ),
    Case(
        "missing target layer",
        lambda a: a,
        lambda a: sthisto.tl.train(a, "ridge_tiny", layer="no_such_layer", key_added="new"),
        MissingKeyError,
        r"layer='no_such_layer'",
    ),
    Case(
        "missing library column",
        lambda a: _set(a, lambda a: a.obs.pop("library_id")),
        lambda a: sthisto.tl.predict(a, "fitted", key_added="new"),
        MissingKeyError,
        r"obs\['library_id'\] is missing",
    ),
    Case(
        "existing result without overwrite",
        lambda a: _set(a, lambda a: a.layers.__setitem__("fitted", np.zeros(a.shape, np.float32))),
        lambda a: sthisto.tl.predict(a, "fitted"),
        KeyExistsError,
        r"overwrite=True",
    ),
    Case(
        "validation outside (0, 1)",
        lambda a: a,
        lambda a: sthisto.tl.train(a, "ridge_tiny", validation=1.5, key_added="new"),
        InputError,
        r"fraction in \(0, 1\)",
    ),
    Case(
        "boolean train mask of the wrong length",
        lambda a: a,
        lambda a: sthisto.tl.train(a, "ridge_tiny", train_mask=np.ones(3, bool), key_added="new"),
        InputError,
        r"shape \(3,\)",
    ),
    Case(
        "unknown stored model",
        lambda a: a,
        lambda a: sthisto.tl.predict(a, "never_trained"),
        MissingKeyError,
        r"never_trained",
    ),
    # --- not an AnnData --------------------------------------------------------------------------
    Case(
        "None instead of an AnnData",
        lambda a: a,
        lambda a: sthisto.pp.embed(None, key_added="X_new"),
        InputError,
        r"needs an AnnData .* got NoneType",
    ),
    Case("a list of AnnData", lambda a: a, lambda a: _train([a]), InputError, r"got list"),
    Case("a NumPy array", lambda a: a, lambda a: _predict(np.zeros((3, 3))), InputError, r"got ndarray"),
    Case(
        "a DataFrame",
        lambda a: a,
        lambda a: sthisto.pp.normalize(a.to_df(), key_added="t_new"),
        InputError,
        r"got DataFrame",
    ),
    Case(
        "SpatialData without a table to pp.embed",
        lambda a: a,
        lambda a: sthisto.pp.embed(_spatialdata(), key_added="X_new"),
        MissingKeyError,
        r"SpatialData has no table.*TableModel\.parse",
    ),
    Case(
        "SpatialData without a table to tl.predict",
        lambda a: a,
        lambda a: _predict(_spatialdata()),
        MissingKeyError,
        r"SpatialData has no table.*TableModel\.parse",
    ),
    Case(
        "SpatialData without a table to tl.train",
        lambda a: a,
        lambda a: _train(_spatialdata()),
        MissingKeyError,
        r"SpatialData has no table.*TableModel\.parse",
    ),
    Case(
        "SpatialData to tl.evaluate",
        lambda a: a,
        lambda a: sthisto.tl.evaluate(_spatialdata(), predicted="fitted"),
        InputError,
        r"SpatialData object.*from_spatialdata",
    ),
    # --- output names that h5ad cannot store -----------------------------------------------------
    Case(
        "'/' in the key of a trained model",
        lambda a: a,
        lambda a: _train(a, key_added="a/b"),
        InputError,
        r"contains '/'.*key_added='a_b'",
    ),
    Case(
        "'/' in the key of predictions",
        lambda a: a,
        lambda a: _predict(a, key_added="pred/v1"),
        InputError,
        r"contains '/'",
    ),
    Case(
        "'/' in the key of a normalised layer",
        lambda a: a,
        lambda a: sthisto.pp.normalize(a, key_added="t/1"),
        InputError,
        r"contains '/'",
    ),
    Case("'/' in the key of features", lambda a: a, lambda a: _embed(a, key_added="X/h"), InputError, r"contains '/'"),
    Case(
        "'/' in the key of a gene selection",
        lambda a: a,
        lambda a: sthisto.pp.select_genes(a, genes=[a.var_names[0]], key_added="sel/1"),
        InputError,
        r"contains '/'",
    ),
    Case("empty key", lambda a: a, lambda a: _predict(a, key_added=""), InputError, r"non-empty string"),
    Case(
        "key that is not a string",
        lambda a: a,
        lambda a: sthisto.pp.normalize(a, key_added=3),
        InputError,
        r"key_added=3 must be a non-empty string",
    ),
    # --- genes -------------------------------------------------------------------------------------
    Case(
        "duplicate gene names (predict)",
        _duplicate_genes,
        lambda a: _predict(a),
        InputError,
        r"duplicate gene names.*var_names_make_unique",
    ),
    Case(
        "duplicate gene names (normalize)",
        _duplicate_genes,
        lambda a: sthisto.pp.normalize(a, key_added="t_new"),
        InputError,
        r"duplicate gene names.*var_names_make_unique",
    ),
    Case(
        "duplicate gene names (train)",
        _duplicate_genes,
        lambda a: _train(a),
        InputError,
        r"duplicate gene names.*var_names_make_unique",
    ),
    Case(
        "duplicate gene names (evaluate)",
        _duplicate_genes,
        lambda a: sthisto.tl.evaluate(a, predicted="fitted"),
        InputError,
        r"duplicate gene names",
    ),
    # --- uns['spatial'] of the wrong shape ----------------------------------------------------------
    Case(
        "uns['spatial'] is None",
        lambda a: _set(a, lambda a: a.uns.__setitem__("spatial", None)),
        _embed,
        InputError,
        r"uns\['spatial'\] is a NoneType, not a dict",
    ),
    Case(
        "a library entry that is a list",
        lambda a: _set(a, lambda a: a.uns["spatial"].__setitem__(_library(a), [])),
        _embed,
        InputError,
        r"uns\['spatial'\]\['S01'\] is a list, not a dict",
    ),
    Case(
        "scalefactors that are a list",
        _set_entry_part("scalefactors", [2.0]),
        _embed,
        InputError,
        r"\['scalefactors'\] is a list, not a dict",
    ),
    Case(
        "images that are a string",
        _set_entry_part("images", "fullres.png"),
        _embed,
        InputError,
        r"\['images'\] is a str, not a dict",
    ),
    Case(
        "µm/px given as a string",
        _set_scalefactor("microns_per_pixel", "2.0"),
        _embed,
        InputError,
        r"microns_per_pixel.*the string '2.0'",
    ),
    Case(
        "negative µm/px",
        _set_scalefactor("microns_per_pixel", -2.0),
        _embed,
        InputError,
        r"microns_per_pixel.*-2.0.*positive",
    ),
    Case("zero µm/px", _set_scalefactor("microns_per_pixel", 0), _embed, InputError, r"microns_per_pixel.*positive"),
    Case(
        "NaN µm/px",
        _set_scalefactor("microns_per_pixel", float("nan")),
        _embed,
        InputError,
        r"microns_per_pixel.*nan.*positive",
    ),
    Case(
        "zero hires scale factor",
        _set_scalefactor("tissue_hires_scalef", 0.0),
        lambda a: _embed(a, image_key="hires"),
        InputError,
        r"tissue_hires_scalef.*positive",
    ),
    # --- images ------------------------------------------------------------------------------------
    Case(
        "image given as a nested list",
        lambda a: _set_image(a, _fullres(a)[:50, :50].tolist()),
        _embed,
        InputError,
        r"is a list, not an image array.*np\.asarray",
    ),
    Case(
        "image with NaN pixels",
        lambda a: _set_image(a, _float_image(a, scale=1 / 255, nan=True)),
        _embed,
        InputError,
        r"NaN or infinite pixel values.*nan_to_num",
    ),
    Case(
        "float image in [0, 255]",
        lambda a: _set_image(a, _float_image(a, scale=1.0)),
        _embed,
        InputError,
        r"values from \d+ to 2\d\d, outside \[0, 1\].*astype\(np.uint8\)",
    ),
    # --- spots and sections ------------------------------------------------------------------------
    Case(
        "NaN library_id (train)", _nan_library, lambda a: _train(a), InputError, r"3 spots have no obs\['library_id'\]"
    ),
    Case("NaN library_id (embed)", _nan_library, _embed, InputError, r"no obs\['library_id'\] \(NaN"),
    Case(
        "one-spot training section",
        _one_spot_section,
        lambda a: _train(a, "thitogene_tiny", max_epochs=1),
        InputError,
        r"\['S02'\] have a single spot.*at least 2",
    ),
    Case(
        "grid rows offset by 1e8",
        _offset_grid,
        lambda a: _train(a, "thitogene_tiny", max_epochs=1),
        InputError,
        r"limit of 65,536 grid positions.*array_row'\] -= ",
    ),
    Case(
        "n_positions of 1e9",
        lambda a: a,
        lambda a: _train(a, "thitogene_tiny", max_epochs=1, n_positions=10**9),
        InputError,
        r"1,000,000,000 entries.*limit",
    ),
    Case(
        "spot coordinates with one column",
        lambda a: _set(a, lambda a: a.obsm.__setitem__("spatial", a.obsm["spatial"][:, :1])),
        _embed,
        InputError,
        r"shape \(80, 1\); expected \(n_obs, 2\)",
    ),
    Case(
        "stale features after obsm['spatial'] changed",
        _swap_two_spots,
        lambda a: _predict(a),
        InputError,
        r"obsm\['spatial'\] changed.*overwrite=True",
    ),
    # --- training options --------------------------------------------------------------------------
    Case("max_epochs=0", lambda a: a, lambda a: _train(a, max_epochs=0), InputError, r"max_epochs=0 must be .* ≥ 1"),
    Case("negative max_epochs", lambda a: a, lambda a: _train(a, max_epochs=-1), InputError, r"max_epochs=-1"),
    Case("fractional max_epochs", lambda a: a, lambda a: _train(a, max_epochs=2.5), InputError, r"max_epochs=2.5"),
    Case("max_epochs as a string", lambda a: a, lambda a: _train(a, max_epochs="3"), InputError, r"max_epochs='3'"),
    Case(
        "boolean Series mask over other spots",
        lambda a: a,
        lambda a: _train(a, train_mask=_foreign_series_mask(a)),
        InputError,
        r"boolean Series .* cannot be aligned",
    ),
    Case(
        "early stopping without validation",
        lambda a: a,
        lambda a: _train(a, early_stopping=3),
        InputError,
        r"early_stopping needs a validation split",
    ),
    Case(
        "resume without a checkpoint folder",
        lambda a: a,
        lambda a: _train(a, resume=True),
        InputError,
        r"resume=True needs checkpoint_dir",
    ),
    # --- stored models -----------------------------------------------------------------------------
    Case(
        "model record that is a string",
        lambda a: _set(a, lambda a: a.uns["sthisto"]["models"].__setitem__("fitted", "garbage")),
        lambda a: _predict(a),
        InputError,
        r"without 'manifest' and 'weights'.*Retrain",
    ),
    Case(
        "model record that is None",
        lambda a: _set(a, lambda a: a.uns["sthisto"]["models"].__setitem__("fitted", None)),
        lambda a: _predict(a),
        InputError,
        r"NoneType without 'manifest' and 'weights'",
    ),
    Case(
        "manifest nested too deeply",
        _set_record_field("manifest", "[" * 100_000 + "]" * 100_000),
        lambda a: _predict(a),
        InputError,
        r"nested too deeply",
    ),
    Case(
        "manifest that is a JSON string",
        _set_record_field("manifest", json.dumps("model")),
        lambda a: _predict(a),
        InputError,
        r"manifest is a JSON str, not an object",
    ),
    Case(
        "manifest that is not JSON",
        _set_record_field("manifest", "{not json"),
        lambda a: _predict(a),
        InputError,
        r"not valid JSON",
    ),
    Case(
        "tampered format_version",
        _edit_manifest(lambda m: _with(m, format_version="one")),
        lambda a: _predict(a),
        InputError,
        r"format_version='one' is not an integer",
    ),
    Case(
        "gene list that is a string",
        _edit_manifest(lambda m: _with(m, genes="ABC")),
        lambda a: _predict(a),
        InputError,
        r"no valid gene list",
    ),
    Case(
        "data_params that are a list",
        _edit_manifest(lambda m: _with(m, data_params=[1, 2])),
        lambda a: _predict(a),
        InputError,
        r"'data_params' is a list, not an object",
    ),
    Case(
        "history that is a string",
        _edit_manifest(lambda m: _with(m, history="x")),
        lambda a: _predict(a),
        InputError,
        r"'history' is a str",
    ),
    Case(
        "manifest with n_positions=1e9",
        _edit_manifest(lambda m: _with(m, data_params=_with(m["data_params"], n_positions=10**9))),
        lambda a: _predict(a),
        InputError,
        r"1,000,000,000 entries.*limit",
    ),
    Case(
        "manifest naming an unknown method",
        _edit_manifest(lambda m: _with(m, method="not_a_method")),
        lambda a: _predict(a),
        InputError,
        r"unknown method 'not_a_method'",
    ),
    Case(
        "damaged weight bytes",
        _set_record_field("weights", np.zeros(10, np.uint8)),
        lambda a: _predict(a),
        InputError,
        r"not valid safetensors bytes",
    ),
    Case(
        "stored model with NaN weights",
        _nan_weights,
        lambda a: _predict(a),
        InputError,
        r"NaN or infinite weights.*retrain",
    ),
    Case(
        "model object with NaN weights",
        lambda a: a,
        lambda a: _predict(a, _nan_model(a)),
        InputError,
        r"NaN or infinite weights",
    ),
    Case("model of the wrong type", lambda a: a, lambda a: _predict(a, 3), InputError, r"model must be a stored key"),
    # --- options of pp functions -------------------------------------------------------------------
    Case("batch size zero", lambda a: a, lambda a: _embed(a, batch_size=0), InputError, r"batch_size=0"),
    Case(
        "negative patch size", lambda a: a, lambda a: _embed(a, patch_size_um=-5.0), InputError, r"patch_size_um=-5.0"
    ),
    Case(
        "embedding an unknown library", lambda a: a, lambda a: _embed(a, libraries=["NOPE"]), MissingKeyError, r"NOPE"
    ),
    # --- further hostile options (each names the problem and the fix) -------------------------------
    Case(
        "genes given as a number",
        lambda a: a,
        lambda a: _train(a, genes=3),
        InputError,
        r"genes=3 is a int; pass a list",
    ),
    Case(
        "seed given as a string", lambda a: a, lambda a: _train(a, seed="a"), InputError, r"seed='a' must be an integer"
    ),
    Case("no genes at all", lambda a: a[:, :0].copy(), lambda a: _train(a), InputError, r"no genes selected"),
    Case("no spots at all", lambda a: a[:0].copy(), lambda a: _train(a), InputError, r"only 0 training spots"),
    Case(
        "validation section outside the training data",
        lambda a: a,
        lambda a: _train(a, validation=["NOPE"]),
        InputError,
        r"validation libraries \['NOPE'\] are not among the training spots",
    ),
    Case(
        "infinite counts",
        lambda a: _set(a, lambda a: setattr(a, "X", _with_value(a.X, np.inf))),
        lambda a: _train(a),
        InputError,
        r"NaN or infinite values",
    ),
    Case(
        "prediction flag column already present",
        lambda a: _set(a, lambda a: a.var.__setitem__("new_predicted", True)),
        lambda a: _predict(a),
        KeyExistsError,
        r"var\['new_predicted'\] already exists.*overwrite=True",
    ),
    Case(
        "unknown encoder",
        lambda a: a,
        lambda a: sthisto.pp.embed(a, encoder="not_an_encoder_xyz", key_added="X_new"),
        InputError,
        r"unknown encoder 'not_an_encoder_xyz'",
    ),
    Case(
        "µm/px given as a boolean",
        _set_scalefactor("microns_per_pixel", True),
        _embed,
        InputError,
        r"microns_per_pixel.*is a bool",
    ),
    Case(
        "channels-first image",
        lambda a: _set_image(a, np.moveaxis(_fullres(a), -1, 0)),
        _embed,
        InputError,
        r"transpose it",
    ),
    Case(
        "graph with zero neighbours",
        lambda a: a,
        lambda a: sthisto.pp.spatial_graph(a, n_neighbors=0, key_added="g_new"),
        InputError,
        r"n_neighbors=0 must be a positive integer",
    ),
    Case(
        "unknown normalisation",
        lambda a: a,
        lambda a: sthisto.pp.normalize(a, variant="bogus", key_added="t_new"),
        InputError,
        r"unknown variant='bogus'; use one of",
    ),
    Case(
        "zero genes to select",
        lambda a: a,
        lambda a: sthisto.pp.select_genes(a, n_top_genes=0, key_added="s_new"),
        InputError,
        r"n_top_genes=0 must be a positive integer",
    ),
    Case(
        "unknown stain method",
        lambda a: a,
        lambda a: sthisto.pp.stain_normalize(a, method="bogus", key_added="st_new"),
        InputError,
        r"unknown method='bogus'; use one of",
    ),
    Case(
        "negative tile spacing",
        lambda a: a,
        lambda a: sthisto.pp.tile(a, spacing_um=-1, key_added="tile_new"),
        InputError,
        r"spacing_um=-1 must be a positive number",
    ),
    Case(
        "evaluating a missing layer",
        lambda a: a,
        lambda a: sthisto.tl.evaluate(a, predicted="nope"),
        MissingKeyError,
        r"layers\['nope'\] is missing.*sthisto.tl.predict",
    ),
    Case(
        "unknown cross-validation split",
        lambda a: a,
        lambda a: sthisto.tl.cross_validate(a, "ridge_tiny", split="bogus"),
        InputError,
        r"unknown split='bogus'",
    ),
    Case(
        "super-resolution factor 0",
        lambda a: a,
        lambda a: sthisto.tl.superresolve(a, "fitted", factor=0),
        InputError,
        r"factor=0; use 4 .* or 8",
    ),
]


def _with_value(matrix, value: float):
    dense = matrix.toarray() if sp.issparse(matrix) else np.array(matrix, dtype=float)
    dense = dense.astype(np.float32)
    dense[0, 0] = value
    return sp.csr_matrix(dense)


def test_the_table_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=[c.problem for c in CASES])
def test_bad_input_is_named_and_leaves_the_input_unchanged(base, case):
    adata = case.prepare(base.copy())
    before = _fingerprint(adata)
    with pytest.raises(case.error, match=case.message) as info:
        case.call(adata)
    assert len(str(info.value)) > 40, "the message must name the problem and the fix"
    assert _fingerprint(adata) == before


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_save_overwrite_never_deletes_a_folder_that_is_not_a_saved_model(base, tmp_path):
    model = sthisto.tl.get_model(base, "fitted")
    user = tmp_path / "project"
    user.mkdir()
    (user / "manifest.json").write_text(json.dumps({"project": "mine", "samples": 12}))
    before = _files(user)
    with pytest.raises(InputError, match=r"not a saved sthisto model .*manifest.json is not a sthisto model manifest"):
        model.save(user, overwrite=True)
    assert _files(user) == before

    saved = model.save(tmp_path / "model")
    (saved / "notes.txt").write_text("my notes")
    before = _files(saved)
    with pytest.raises(InputError, match=r"also holds \['notes.txt'\].*refusing to overwrite"):
        model.save(saved, overwrite=True)
    assert _files(saved) == before

    (saved / "notes.txt").unlink()
    model.save(saved, overwrite=True)  # a saved model alone is replaced
    assert sorted(_files(saved)) == ["manifest.json", "weights.safetensors"]


def test_predict_copy_leaves_the_caller_untouched(base):
    adata = base.copy()
    del adata.obsm["X_handcrafted"]  # the model must compute its features again
    del adata.uns["sthisto"]["embed"]["X_handcrafted"]
    before = _fingerprint(adata)
    result = sthisto.tl.predict(adata, "fitted", key_added="new", copy=True)
    assert _fingerprint(adata) == before and "X_handcrafted" not in adata.obsm
    assert "new" in result.layers and "X_handcrafted" in result.obsm


def test_a_boolean_series_mask_is_aligned_on_the_index(base):
    adata = base.copy()
    first = adata.obs["library_id"].astype(str) == _library(adata)
    reversed_mask = first[::-1]  # same spots, other order: positions would pick the other section
    model = _train(adata, train_mask=reversed_mask, store=False)
    assert model.trained_on["libraries"] == [_library(adata)]


@pytest.fixture
def h5ad(base, tmp_path):
    path = tmp_path / "data.h5ad"
    base.write_h5ad(path)
    return path


def test_cli_param_fills_an_option_left_at_its_default(h5ad, tmp_path, capsys):
    out = tmp_path / "trained.h5ad"
    argv = ["train", str(h5ad), "-m", "ridge_tiny", "-o", str(out), "--key-added", "cli", "-q"]
    assert main([*argv, "--param", "encoder=handcrafted", "--param", "max_epochs=3"]) == 0, capsys.readouterr().err
    assert "cli" in ad.read_h5ad(out).uns["sthisto"]["models"]


def test_cli_refuses_an_option_given_twice(h5ad, tmp_path, capsys):
    argv = ["train", str(h5ad), "-m", "ridge_tiny", "-o", str(tmp_path / "o.h5ad"), "--max-epochs", "2"]
    assert main([*argv, "--param", "max_epochs=3"]) == 2
    assert (
        "max_epochs is given twice (--param max_epochs=... and --max-epochs); give it once" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "{existing}"], "exists; pass --overwrite"),
        (["-o", "{tmp}/out.csv"], "must end in .h5ad or .zarr"),
        (["-o", "{user}.zarr", "--overwrite"], "is not a zarr store; refusing to replace it"),
        (["--save-model", "{user}", "--overwrite"], "not a saved sthisto model"),
        (["--save-model", "{user}"], "is not empty; pass --overwrite"),
    ],
)
def test_cli_checks_outputs_before_any_work(h5ad, tmp_path, capsys, extra, message):
    existing = tmp_path / "existing.h5ad"
    existing.write_text("keep me")
    user = tmp_path / "user"
    user.mkdir()
    (user / "manifest.json").write_text("{}")
    (tmp_path / "user.zarr").mkdir()
    (tmp_path / "user.zarr" / "data.csv").write_text("mine")
    extra = [e.format(existing=existing, tmp=tmp_path, user=user) for e in extra]
    code = main(["train", str(h5ad), "-m", "ridge_tiny", *extra, "--param", "encoder=handcrafted"])
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err
    assert "reading" not in err and "training" not in err  # refused before the input was even read
    assert existing.read_text() == "keep me" and _files(user) == {"manifest.json": b"{}"}
    assert _files(tmp_path / "user.zarr") == {"data.csv": b"mine"}


@pytest.mark.real_data
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("spot_diameter_fullres", -89.4, r"'spot_diameter_fullres'.*-89.4.*positive"),
        ("microns_per_pixel", 0, r"'microns_per_pixel'.*0.0.*positive"),
        ("tissue_hires_scalef", "0.17", r"'tissue_hires_scalef'.*the string '0.17'"),
    ],
)
def test_spaceranger_scalefactors_must_be_positive(visium_dir, tmp_path, key, value, message):
    import shutil

    folder = tmp_path / "outs"
    shutil.copytree(visium_dir / "spaceranger-1.0.0", folder)
    file = folder / "spatial" / "scalefactors_json.json"
    factors = json.loads(file.read_text())
    factors[key] = value
    file.write_text(json.dumps(factors))
    with pytest.raises(InputError, match=message):
        sthisto.io.read_visium(folder)
