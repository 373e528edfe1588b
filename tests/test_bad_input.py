"""Bad input, as a table: every case raises an error naming the problem and leaves the input as it was."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sthisto
from sthisto._errors import InputError, KeyExistsError, MissingKeyError, NoImageError


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
]


def _with_value(matrix, value: float):
    dense = matrix.toarray() if sp.issparse(matrix) else np.array(matrix, dtype=float)
    dense = dense.astype(np.float32)
    dense[0, 0] = value
    return sp.csr_matrix(dense)


def test_the_table_is_large_enough():
    assert len(CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=[c.problem for c in CASES])
def test_bad_input_is_named_and_leaves_the_input_unchanged(base, case):
    adata = case.prepare(base.copy())
    before = _fingerprint(adata)
    with pytest.raises(case.error, match=case.message) as info:
        case.call(adata)
    assert len(str(info.value)) > 40, "the message must name the problem and the fix"
    assert _fingerprint(adata) == before
