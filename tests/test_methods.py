"""One contract for every registered method, exercised through its tiny variant (timm-style).

Each ``*_tiny`` variant trains for a few epochs on synthetic sections, predicts a held-out
section, and must give the same predictions after an ``.h5ad`` round trip of the AnnData that
carries it, and after ``save`` / ``io.load_model``. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import pickle

import anndata as ad
import numpy as np
import pytest
import torch

import sthisto
from sthisto._errors import InputError

TINY = sorted(name for name in sthisto.models.list_models() if name.endswith("_tiny"))


def test_every_method_has_a_tiny_variant():
    methods = set(sthisto.models.list_models(include_variants=False))
    published = {"thitogene", "hggef", "histosge", "histospace", "ridge"}
    assert published <= methods  # other tests may register small methods of their own
    assert published <= {name.removesuffix("_tiny") for name in TINY} <= methods


@pytest.fixture(scope="module")
def cohort():
    adata = sthisto.datasets.synthetic(n_sections=3, n_spots=60, n_genes=8, seed=11)
    libraries = list(adata.obs["library_id"].cat.categories)
    return adata, libraries[:2], libraries[2]


@pytest.fixture(scope="module", params=TINY)
def trained(request, cohort):
    adata, train_libraries, _ = cohort
    adata = adata.copy()
    torch.manual_seed(0)
    model = sthisto.tl.train(adata, request.param, train_mask=train_libraries, max_epochs=2, seed=0, progress=False)
    return request.param, adata, model


def _held_out(adata, library):
    return adata[adata.obs["library_id"] == library].copy()


def test_train_stores_a_record_and_predict_writes_a_new_layer(trained, cohort):
    name, adata, model = trained
    _, train_libraries, test_library = cohort
    record = adata.uns["sthisto"]["models"][name]
    assert json.loads(record["manifest"])["method"] == name.removesuffix("_tiny")  # the variant's sizes
    assert model.trained_on["libraries"] == sorted(train_libraries)
    if model.network is not None:  # ridge is fitted in closed form, without epochs
        assert len(model.history["train_loss"]) == 2 and np.isfinite(model.history["train_loss"]).all()

    before = {key: adata.layers[key].copy() for key in adata.layers}
    sthisto.tl.predict(adata, name, key_added="pred")
    predicted = np.asarray(adata.layers["pred"])
    assert predicted.shape == adata.shape and np.isfinite(predicted).all()
    assert predicted[adata.obs["library_id"] == test_library].std(axis=0).max() > 0  # not a constant
    for key, value in before.items():  # nothing else was touched
        np.testing.assert_array_equal(np.asarray(adata.layers[key]), np.asarray(value))
    with pytest.raises(Exception, match="overwrite"):
        sthisto.tl.predict(adata, name, key_added="pred")
    del adata.layers["pred"]


def test_the_record_survives_h5ad(trained, cohort, tmp_path):
    name, adata, _ = trained
    test = _held_out(adata, cohort[2])
    sthisto.tl.predict(test, name, key_added="before")
    path = tmp_path / "with_model.h5ad"
    test.write_h5ad(path)
    reread = ad.read_h5ad(path)
    sthisto.tl.predict(reread, name, key_added="after")
    np.testing.assert_array_equal(np.asarray(reread.layers["after"]), np.asarray(test.layers["before"]))


def test_save_and_load_give_identical_predictions(trained, cohort, tmp_path):
    name, adata, model = trained
    test = _held_out(adata, cohort[2])
    sthisto.tl.predict(test, model, key_added="original")
    folder = model.save(tmp_path / name)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "weights.safetensors"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["genes"] == list(model.genes) and manifest["network_params"] == json.loads(
        json.dumps(model.network_params)
    )

    loaded = sthisto.io.load_model(folder)
    assert type(loaded) is type(model) and list(loaded.genes) == list(model.genes)
    assert json.dumps(loaded.network_params) == json.dumps(model.network_params)
    assert json.dumps(loaded.history) == json.dumps(model.history)
    sthisto.tl.predict(test, loaded, key_added="loaded")
    np.testing.assert_array_equal(np.asarray(test.layers["loaded"]), np.asarray(test.layers["original"]))
    sthisto.tl.predict(test, str(folder), key_added="from_folder")
    np.testing.assert_array_equal(np.asarray(test.layers["from_folder"]), np.asarray(test.layers["original"]))


class _Payload:
    """Unpickling this runs ``marker.touch()``: proof that a loader executed file content."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_pickle_planted_in_a_saved_model_is_never_executed(trained, tmp_path):
    name, _, model = trained
    folder = model.save(tmp_path / "model")
    marker = tmp_path / "payload_ran"
    payload = pickle.dumps(_Payload(marker))
    (folder / "weights.safetensors").write_bytes(payload)  # a pickle where the weights belong
    with pytest.raises(InputError, match="weights"):
        sthisto.io.load_model(folder)
    (folder / "model.pt").write_bytes(payload)  # and one beside a valid save
    with pytest.raises(InputError, match=r"model\.pt"):  # overwriting never deletes files it did not write
        model.save(folder, overwrite=True)
    (folder / "model.pt").unlink()
    model.save(folder, overwrite=True)
    (folder / "model.pt").write_bytes(payload)
    sthisto.io.load_model(folder)
    assert not marker.exists()


def test_a_saved_model_with_edited_weights_is_refused(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    name, _, model = trained
    folder = model.save(tmp_path / "model")
    tensors = load_file(str(folder / "weights.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = torch.zeros(tuple(tensors[first].shape) + (2,))
    save_file(tensors, str(folder / "weights.safetensors"))
    with pytest.raises(InputError):
        sthisto.io.load_model(folder)


def test_training_again_in_the_same_process_gives_the_same_model(trained, cohort):
    # The first training leaves cached features (and records) behind on the object; a second
    # call with the same seed must not depend on them: same weights, same predictions.
    name, adata, model = trained
    train_libraries, test_library = cohort[1], cohort[2]
    torch.manual_seed(123)  # the global stream before the call must not matter either
    again = sthisto.tl.train(adata, name, train_mask=train_libraries, max_epochs=2, seed=0, progress=False, store=False)
    if model.network is not None:
        first, second = model.state_tensors(), again.state_tensors()
        assert sorted(first) == sorted(second)
        for key in first:
            torch.testing.assert_close(second[key], first[key], rtol=0, atol=0, msg=f"{name}: {key} differs")
    test = _held_out(adata, test_library)
    np.testing.assert_array_equal(again.predict(test, device="cpu"), model.predict(test, device="cpu"))
