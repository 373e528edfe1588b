"""Stored models: weights in uns or in hashed files, cross-validation folds kept as records."""

from __future__ import annotations

import json
import shutil
import warnings

import anndata as ad
import numpy as np
import pytest
import torch
from torch import nn

import sthisto
from sthisto._errors import InputError, KeyExistsError, MissingKeyError
from sthisto.cli import main
from sthisto.models import ExpressionModel

torch.set_num_threads(1)
METHOD = "tiny_store"


class _StoreNet(nn.Module):
    """Thousands of weights in a hidden layer, so that weights clearly outweigh a manifest."""

    input_keys = ("patches",)

    def __init__(self, n_genes, hidden=512):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(8, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, n_genes)

    def forward(self, patches):
        return {"prediction": self.head(self.hidden(self.features(patches.float() / 255.0)))}


class TinyStore(ExpressionModel):
    name = METHOD
    input_kind = "pixels"
    network_class = _StoreNet
    batching = "spots"
    data_defaults = {"patch_size_px": 16, "patch_size_um": 100.0}
    training_defaults = {"lr": 1e-2, "max_epochs": 1, "batch_size": 32}


FAST = {"progress": False, "evaluate_params": {"leiden_connectivities": "gauss", "kmeans_n_init": 2}}


@pytest.fixture(autouse=True)
def registered():
    """Stored records name their method; get_model and predict look it up in the registry."""
    from sthisto.models import _registry

    _registry.register_method(TinyStore)
    yield
    _registry._METHODS.pop(METHOD, None)


@pytest.fixture(scope="module")
def data():
    return sthisto.datasets.synthetic(n_sections=2, n_spots=30, n_genes=6, seed=5)


def _fresh(data):
    adata = data.copy()
    adata.uns.pop("sthisto", None)
    return adata


def _weights_nbytes(record) -> int:
    """Bytes of the tensors of the model a record describes, rebuilt untrained from its manifest."""
    model = TinyStore.from_manifest(json.loads(str(record["manifest"])))
    return sum(t.numel() * t.element_size() for t in model.all_state_tensors().values())


def _nbytes(value) -> int:
    """Bytes a (nested) uns value holds: strings by their UTF-8 length, arrays by their buffer."""
    if isinstance(value, dict):
        return sum(len(str(k)) + _nbytes(v) for k, v in value.items())
    if isinstance(value, np.ndarray):
        return sum(len(str(v).encode()) for v in value.ravel()) if value.dtype.kind in "OUS" else value.nbytes
    return len(str(value).encode())


def test_train_round_trips_through_h5ad_with_weights_in_uns_and_in_a_file(data, tmp_path):
    adata = _fresh(data)
    sthisto.tl.train(adata, METHOD, key_added="inline", train_mask=["S01"], progress=False)
    sthisto.tl.train(
        adata, METHOD, key_added="filed", train_mask=["S01"], progress=False, models_dir=tmp_path / "models"
    )
    inline, filed = (adata.uns["sthisto"]["models"][k] for k in ("inline", "filed"))
    assert "weights" in inline and "weights" not in filed
    path = tmp_path / "models" / "filed.safetensors"
    assert filed["weights_stored"] == "file" and filed["weights_file"] == str(path.resolve())
    assert filed["weights_bytes"] == path.stat().st_size == len(np.asarray(inline["weights"]))
    import hashlib

    assert filed["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # The reference is what keeps the h5ad small: it holds none of the weights' bytes.
    reference = {"weights_stored", "weights_file", "weights_name", "weights_sha256", "weights_bytes"}
    assert set(filed) == {"manifest", *reference} and _nbytes(filed) < _weights_nbytes(filed)

    for key in ("inline", "filed"):
        sthisto.tl.predict(adata, key)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    for key in ("inline", "filed"):
        sthisto.tl.predict(back, key, key_added=f"{key}_again")
        np.testing.assert_array_equal(back.layers[f"{key}_again"], adata.layers[key])
    # same seed, same training: the two ways of storing hold the same model
    np.testing.assert_array_equal(adata.layers["inline"], adata.layers["filed"])

    # a calibration rewrites the manifest only: the weights stay in their file
    sthisto.tl.calibrate(back, "filed", calibration=["S02"])
    record = back.uns["sthisto"]["models"]["filed"]
    assert "weights" not in record and record["weights_sha256"] == filed["weights_sha256"]
    assert sthisto.tl.get_model(back, "filed").calibration


def test_a_moved_or_changed_weights_file_is_refused_and_found_again(data, tmp_path):
    adata = _fresh(data)
    sthisto.tl.train(adata, METHOD, train_mask=["S01"], progress=False, models_dir=tmp_path / "models")
    expected = sthisto.tl.get_model(adata, METHOD).predict(adata)

    shutil.move(tmp_path / "models", tmp_path / "elsewhere")
    with pytest.raises(MissingKeyError, match=r"moved or deleted.*models_dir="):
        sthisto.tl.predict(adata, METHOD)
    assert METHOD not in adata.layers  # refused before anything was written
    moved = sthisto.tl.get_model(adata, METHOD, models_dir=tmp_path / "elsewhere")
    np.testing.assert_array_equal(moved.predict(adata), expected)

    file = tmp_path / "elsewhere" / f"{METHOD}.safetensors"
    data_bytes = bytearray(file.read_bytes())
    data_bytes[-1] ^= 1  # one bit of one weight
    file.write_bytes(bytes(data_bytes))
    with pytest.raises(InputError, match=r"changed since it was written.*Restore the original file"):
        sthisto.tl.get_model(adata, METHOD, models_dir=tmp_path / "elsewhere")


def test_train_checks_the_weights_file_before_training(data, tmp_path):
    adata = _fresh(data)
    folder = tmp_path / "models"
    sthisto.tl.train(adata, METHOD, progress=False, models_dir=folder)
    first = (folder / f"{METHOD}.safetensors").read_bytes()
    other = _fresh(data)
    with pytest.raises(KeyExistsError, match="overwrite=True"):
        sthisto.tl.train(other, METHOD, progress=False, models_dir=folder, seed=1)
    assert "sthisto" not in other.uns and (folder / f"{METHOD}.safetensors").read_bytes() == first
    sthisto.tl.train(other, METHOD, progress=False, models_dir=folder, seed=1, overwrite=True)
    assert (folder / f"{METHOD}.safetensors").read_bytes() != first
    with pytest.raises(InputError, match="changed since it was written"):  # the first record's file was replaced
        sthisto.tl.get_model(adata, METHOD)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        sthisto.tl.train(_fresh(data), METHOD, progress=False, models_dir=tmp_path / "a_file")
    with pytest.raises(InputError, match="store=False"):
        sthisto.tl.train(_fresh(data), METHOD, progress=False, models_dir=folder, store=False)


def test_cross_validate_keeps_fold_records_without_weights_by_default(data, tmp_path):
    adata = _fresh(data)
    sthisto.tl.cross_validate(adata, METHOD, split="section", seed=4, **FAST)
    key = f"cv_{METHOD}"
    records = adata.uns["sthisto"]["cross_validate"][key]["models"]
    assert set(records) == {"S01", "S02"}
    for fold, record in records.items():
        assert record["weights_stored"] == "none" and "weights" not in record and "weights_file" not in record
        assert list(record["test_sections"]) == [fold] and list(record["train_sections"]) == sorted(
            {"S01", "S02"} - {fold}
        )
        manifest = json.loads(record["manifest"])
        assert manifest["method"] == METHOD and manifest["trained_on"]["recipe"] == "paper"
        assert len(manifest["history"]["train_loss"]) == 1
        metrics = json.loads(record["metrics"])
        table = sthisto.tl.get_metrics(adata, key)
        row = table.query("scope == 'group' and group == @fold and metric == 'pearson_gene_mean'")
        assert metrics[fold]["pearson_gene_mean"] == pytest.approx(float(row["value"].iloc[0]))

    # no fold's weights in uns: all records together are smaller than one fold's weights
    weights = _weights_nbytes(records["S01"])
    assert _nbytes(records) < weights
    adata.write_h5ad(tmp_path / "default.h5ad")
    kept = _fresh(data)
    sthisto.tl.cross_validate(kept, METHOD, split="section", seed=4, store_weights=True, **FAST)
    kept.write_h5ad(tmp_path / "kept.h5ad")
    grown = (tmp_path / "kept.h5ad").stat().st_size - (tmp_path / "default.h5ad").stat().st_size
    assert grown >= len(records) * weights  # the difference is the folds' weights (safetensors adds a header)

    # no weights: the error names both ways back, and following the first gives the fold's model
    with pytest.raises(InputError, match=r"without weights.*train_mask=\['S02'\].*store_weights=True") as info:
        sthisto.tl.get_model(adata, key, fold="S01")
    assert "seed=4" in str(info.value)
    params = json.loads(records["S01"]["train_params"])
    params.pop("method")
    genes = json.loads(records["S01"]["manifest"])["genes"]
    model = sthisto.tl.train(adata, METHOD, genes=genes, train_mask=["S02"], store=False, **params)
    rows = np.flatnonzero(adata.obs["library_id"] == "S01")
    np.testing.assert_allclose(model.predict(adata, rows), adata.layers[key][rows], rtol=1e-6, atol=1e-6)


def test_cross_validate_weights_in_uns_and_in_files_round_trip(data, tmp_path):
    key = f"cv_{METHOD}"
    in_uns, in_files = _fresh(data), _fresh(data)
    sthisto.tl.cross_validate(in_uns, METHOD, split="section", store_weights=True, **FAST)
    sthisto.tl.cross_validate(in_files, METHOD, split="section", models_dir=tmp_path / "folds", **FAST)
    np.testing.assert_array_equal(in_uns.layers[key], in_files.layers[key])
    for fold in ("S01", "S02"):
        record = in_files.uns["sthisto"]["cross_validate"][key]["models"][fold]
        assert record["weights_stored"] == "file" and "weights" not in record
        assert record["weights_file"] == str((tmp_path / "folds" / key / f"{fold}.safetensors").resolve())
    for name, adata in (("uns", in_uns), ("files", in_files)):
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
        back = ad.read_h5ad(tmp_path / f"{name}.h5ad")
        for fold in ("S01", "S02"):
            model = sthisto.tl.get_model(back, key, fold=fold)
            rows = np.flatnonzero(back.obs["library_id"] == fold)
            np.testing.assert_array_equal(model.predict(back, rows), adata.layers[key][rows])
    with pytest.raises(MissingKeyError, match="no fold 'S09'"):
        sthisto.tl.get_model(in_uns, key, fold="S09")


def test_cross_validate_refuses_existing_fold_files_and_cleans_up_after_a_failure(data, tmp_path, monkeypatch):
    folder = tmp_path / "folds"
    existing = folder / f"cv_{METHOD}" / "S02.safetensors"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"someone's file")
    adata = _fresh(data)
    with pytest.raises(KeyExistsError, match="S02.safetensors"):
        sthisto.tl.cross_validate(adata, METHOD, split="section", models_dir=folder, **FAST)
    assert "sthisto" not in adata.uns and existing.read_bytes() == b"someone's file"
    assert not (folder / f"cv_{METHOD}" / "S01.safetensors").exists()  # refused before the first fold
    existing.unlink()

    from sthisto.tl import _cross_validate

    real, calls = _cross_validate._fit_task, []

    def second_fold_fails(adata, task):
        calls.append(task.fold)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(adata, task)

    monkeypatch.setattr(_cross_validate, "_fit_task", second_fold_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        sthisto.tl.cross_validate(adata, METHOD, split="section", models_dir=folder, **FAST)
    assert calls == ["S01", "S02"] and not list(folder.rglob("*.safetensors"))


def test_cross_validate_weight_options():
    from sthisto.tl._stored_models import resolve_weights_option

    with pytest.warns(FutureWarning, match="store_weights=True"):
        assert resolve_weights_option(None, None, True) == (True, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_weights_option(None, None, None) == (False, None)
    with pytest.raises(InputError, match="store_weights=False keeps none"):
        resolve_weights_option(False, "folder", None)
    with pytest.raises(InputError, match="must be True, False or None"):
        resolve_weights_option("yes", None, None)


def test_cli_writes_weights_files(data, tmp_path, capsys):
    source = tmp_path / "in.h5ad"
    _fresh(data).write_h5ad(source)
    out, folder = tmp_path / "cv.h5ad", tmp_path / "folds"
    code = main(["cross-validate", str(source), "-m", METHOD, "--models-dir", str(folder), "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    back = ad.read_h5ad(out)
    key = f"cv_{METHOD}"
    assert back.uns["sthisto"]["cross_validate"][key]["models"]["S01"]["weights_stored"] == "file"
    assert sthisto.tl.get_model(back, key, fold="S02").genes == list(back.var_names)

    code = main(["cross-validate", str(source), "-m", METHOD, "--store-weights", "-o", str(out), "--overwrite", "-q"])
    assert code == 0, capsys.readouterr().err
    assert ad.read_h5ad(out).uns["sthisto"]["cross_validate"][key]["models"]["S01"]["weights_stored"] == "uns"

    trained = tmp_path / "trained.h5ad"
    code = main(["train", str(source), "-m", METHOD, "--models-dir", str(folder), "-o", str(trained), "-q"])
    assert code == 0, capsys.readouterr().err
    assert ad.read_h5ad(trained).uns["sthisto"]["models"][METHOD]["weights_file"] == str(
        (folder / f"{METHOD}.safetensors").resolve()
    )
