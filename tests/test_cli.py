"""The sthisto command: help, exit codes, one-line errors, and the train → predict → evaluate path."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import sthisto
from sthisto import cli
from sthisto.cli import build_parser, cli_words, main, parse_params
from sthisto.models import ExpressionModel

torch.set_num_threads(1)
COMMANDS = ["train", "predict", "calibrate", "superresolve", "cross-validate", "evaluate", "demo"]


class _CliNet(nn.Module):
    input_keys = ("patches",)

    def __init__(self, n_genes, hidden=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, hidden, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(hidden, n_genes)

    def forward(self, patches):
        return {"prediction": self.head(self.features(patches.float() / 255.0).flatten(1))}


class TinyCli(ExpressionModel):
    name = "tiny_cli"
    input_kind = "pixels"
    network_class = _CliNet
    batching = "spots"
    data_defaults = {"patch_size_px": 16, "patch_size_um": 100.0}
    training_defaults = {"lr": 1e-2, "max_epochs": 1, "batch_size": 32}


@pytest.fixture
def tiny_method():
    """Register the test method under a name for the duration of one test (the CLI takes names)."""
    from sthisto.models import _registry

    _registry.register_method(TinyCli)
    yield "tiny_cli"
    _registry._METHODS.pop("tiny_cli", None)


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "data.h5ad"
    sthisto.datasets.synthetic(n_sections=2, n_spots=40, n_genes=6, seed=2).write_h5ad(path)
    return path


def test_help_as_subprocess_without_heavy_imports():
    result = subprocess.run(
        [sys.executable, "-m", "sthisto.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    probe = "import sys, sthisto.cli; sthisto.cli.build_parser(); print(any(m in sys.modules for m in ('torch', 'lightning')))"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert imported.stdout.strip() == "False"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sthisto {command}")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bogus"], "invalid choice"),
        (["train", "x.h5ad"], "required"),
        (["train", "x.csv", "-m", "ridge", "-o", "y.h5ad"], ".h5ad file or a SpatialData .zarr"),
        (["train", "x.h5ad", "-m", "ridge"], "nothing would be kept"),
        (["train", "x.h5ad", "-m", "ridge", "-o", "y.h5ad", "--param", "lr"], "KEY=VALUE"),
        (["cross-validate", "x.h5ad", "-m", "ridge", "--split", "spots", "--folds", "S1"], "fraction"),
        (["demo", "--n-sections", "1"], "at least 2"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.h5ad").write_bytes(b"")  # usage is checked before the file is read
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_failures_exit_1_with_one_line(h5ad, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing.h5ad"), "--predicted", "p"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("sthisto evaluate: error:")

    assert main(["train", str(h5ad), "-m", "no_such_method", "-o", str(tmp_path / "o.h5ad"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "unknown method 'no_such_method'" in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "o.h5ad").exists()

    assert main(["evaluate", str(h5ad), "--predicted", "nothing", "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "layers['nothing'] is missing" in err


def test_zarr_input_without_spatialdata_is_a_clear_failure(tmp_path, capsys, monkeypatch):
    (tmp_path / "data.zarr").mkdir()
    monkeypatch.setitem(sys.modules, "spatialdata", None)  # import spatialdata → ImportError
    assert main(["evaluate", str(tmp_path / "data.zarr"), "--predicted", "p", "-q"]) == 1
    assert "reading .zarr needs spatialdata" in capsys.readouterr().err


def test_superresolve_command(h5ad, tmp_path, capsys):
    available = "superresolve" in dir(sthisto.tl)
    code = main(["superresolve", str(h5ad), "--model", "m", "-o", str(tmp_path / "sr.h5ad"), "-q"])
    if not available:
        assert code == 1
        assert "superresolve is not available" in capsys.readouterr().err
    else:
        assert code == 1  # no model 'm' is stored in the input
        assert "error:" in capsys.readouterr().err


def test_parse_params():
    assert parse_params(["lr=1e-4", "depth=2", "name=uni", "flag=true", "sizes=[1, 2]"]) == {
        "lr": 1e-4, "depth": 2, "name": "uni", "flag": True, "sizes": [1, 2],
    }  # fmt: skip


def test_train_predict_evaluate(h5ad, tmp_path, tiny_method, capsys):
    trained, model_dir = tmp_path / "trained.h5ad", tmp_path / "model"
    code = main(["train", str(h5ad), "-m", tiny_method, "--train-libraries", "S01", "--max-epochs", "2",
                 "-o", str(trained), "--save-model", str(model_dir), "--param", "lr=0.005"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "[sthisto train" in err and "2 epochs, final training loss" in err
    stored = ad.read_h5ad(trained)
    model = sthisto.tl.get_model(stored, tiny_method)
    assert model.training_params["lr"] == 0.005 and model.trained_on["libraries"] == ["S01"]

    predicted = tmp_path / "predicted.h5ad"
    assert main(["predict", str(trained), "--model", str(model_dir), "--key-added", "pred", "--libraries", "S02",
                 "-o", str(predicted), "-q"]) == 0  # fmt: skip
    result = ad.read_h5ad(predicted)
    assert set(result.obs["library_id"]) == {"S02"} and np.isfinite(result.layers["pred"]).all()
    expected = model.predict(stored[stored.obs["library_id"] == "S02"].copy())
    np.testing.assert_allclose(result.layers["pred"], expected, rtol=1e-5, atol=1e-6)

    table_path = tmp_path / "metrics.csv"
    assert main(["evaluate", str(predicted), "--predicted", "pred", "--table", str(table_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "pearson_gene_mean" in out
    table = pd.read_csv(table_path)
    direct = sthisto.tl.evaluate(result, predicted="pred")
    np.testing.assert_allclose(table["value"].to_numpy(), direct["value"].to_numpy(), atol=1e-9, equal_nan=True)
    assert main(["predict", str(trained), "--model", tiny_method, "-o", str(predicted), "-q"]) == 1  # exists
    assert "--overwrite" in capsys.readouterr().err


def test_train_records_the_recipe(h5ad, tmp_path, capsys):
    trained = tmp_path / "trained.h5ad"
    code = main(["train", str(h5ad), "-m", "histosge_tiny", "--train-libraries", "S01", "--max-epochs", "2",
                 "--recipe", "small_data", "-o", str(trained), "-q"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    model = sthisto.tl.get_model(ad.read_h5ad(trained), "histosge_tiny")
    assert model.trained_on["recipe"] == "small_data"
    assert main(["train", str(h5ad), "-m", "ridge", "--recipe", "fast", "-o", str(trained)]) == 2


def test_cross_validate_command(h5ad, tmp_path, tiny_method, capsys):
    out, table_path = tmp_path / "cv.h5ad", tmp_path / "cv.csv"
    code = main(["cross-validate", str(h5ad), "-m", tiny_method, "--split", "section", "--max-epochs", "1",
                 "--table", str(table_path), "-o", str(out), "-q"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "pearson_gene_mean" in capsys.readouterr().out
    table = pd.read_csv(table_path)
    assert set(table["split"]) == {"section"} and set(table["method"]) == {tiny_method}
    adata = ad.read_h5ad(out)
    assert np.isfinite(adata.layers[f"cv_{tiny_method}"]).all()
    assert adata.uns["sthisto"]["cross_validate"][f"cv_{tiny_method}"]["split"] == "section"


def test_demo_writes_a_report(tmp_path, tiny_method, capsys):
    folder = tmp_path / "demo"
    code = main(["demo", "-o", str(folder), "-m", tiny_method, "--n-spots", "40", "--n-genes", "8",
                 "--max-epochs", "2"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "[5/5]" in captured.err and "pearson_gene_mean=" in captured.out
    for name in ("metrics.csv", "metrics.md", "report.md", "gene_maps.png", "domain_map.png", "training_curves.png"):
        assert (folder / name).stat().st_size > 0, name
    table = pd.read_csv(folder / "metrics.csv")
    assert set(table["group"]) == {"S03", "overall"}
    value = table.query("scope == 'overall' and metric == 'pearson_gene_mean'")["value"].iloc[0]
    assert f"{value:.3f}" in (folder / "report.md").read_text()
    assert (folder / "metrics.md").read_text().startswith("| metric | S03 |")
    assert main(["demo", "-o", str(folder), "-m", tiny_method, "-q"]) == 1  # refuses a non-empty folder
    assert "--overwrite" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, h5ad):
    """The fixture data with a ridge model stored under 'ridge' (trained on S01)."""
    path = tmp_path_factory.mktemp("cli_trained") / "trained.h5ad"
    adata = ad.read_h5ad(h5ad)
    sthisto.tl.train(adata, "ridge", train_mask=["S01"])
    adata.write_h5ad(path)
    return path


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_every_flag_has_help_and_one_spelling_of_out(capsys):
    for name, parser in {"sthisto": build_parser(), **_subparsers()}.items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings or action.dest}"
    for command in COMMANDS:
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "--output" not in text, command  # the old spellings are accepted but not shown
        assert "-o OUTPUT, --out OUTPUT" in text or "-o DIR, --out DIR" in text, command
    docs = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for text in (docs, readme):
        assert "sthisto demo --out demo_report" in text
        assert re.search(r"sthisto [a-z-]+ [^\n`]*(--output|-o )", text) is None  # examples spell --out


def test_old_spelling_of_out_still_works_with_a_note(h5ad, tmp_path, capsys):
    out = tmp_path / "e.h5ad"
    assert main(["evaluate", str(h5ad), "--predicted", "x", "--output", str(out), "-q"]) == 1  # no layer x
    err = capsys.readouterr().err
    assert "--output is now spelled --out" in err and "layers['x'] is missing" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "{trained}", "--model", "ridge", "-o", "{existing}"], "pass --overwrite"),
        (["predict", "{trained}", "--model", "ridge", "-o", "{tmp}/p.csv"], "must end in .h5ad or .zarr"),
        (["predict", "{trained}", "--model", "ridge", "-o", "{tmp}/missing/p.h5ad"], "does not exist"),
        (["predict", "{trained}", "--model", "ridge", "-o", "{folder}.h5ad", "--overwrite"], "is a folder"),
        (["train", "{trained}", "-m", "ridge", "-o", "{tmp}/missing/t.h5ad"], "does not exist"),
        (["train", "{trained}", "-m", "ridge", "--save-model", "{existing}"], "is a file"),
        (["calibrate", "{trained}", "--model", "ridge", "--calibration-libraries", "S02", "-o", "{existing}"],
         "pass --overwrite"),
        (["cross-validate", "{trained}", "-m", "ridge", "--table", "{tmp}/m.txt"], "must end in .csv"),
        (["cross-validate", "{trained}", "-m", "ridge", "--table", "{existing_csv}"], "pass --overwrite"),
        (["evaluate", "{trained}", "--predicted", "p", "-o", "{tmp}/nowhere/e.zarr"], "does not exist"),
        (["superresolve", "{trained}", "--model", "ridge", "-o", "{existing}"], "pass --overwrite"),
        (["demo", "-o", "{tmp}/missing/report"], "does not exist"),
        (["demo", "-o", "{existing}"], "is a file"),
    ],
)  # fmt: skip
def test_outputs_are_checked_before_any_work(argv, message, trained, tmp_path, capsys, monkeypatch):
    existing, existing_csv, folder = tmp_path / "exists.h5ad", tmp_path / "exists.csv", tmp_path / "folder"
    existing.write_bytes(b"keep")
    existing_csv.write_text("keep")
    (tmp_path / "folder.h5ad").mkdir()

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the outputs were checked")

    monkeypatch.setattr(cli, "read_input", no_work)
    monkeypatch.setattr(sthisto.datasets, "synthetic", no_work)
    names = {"trained": trained, "existing": existing, "existing_csv": existing_csv, "folder": folder, "tmp": tmp_path}
    code = main([item.format(**names) for item in argv] + ["-q"])
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and "work started" not in err, err
    assert existing.read_bytes() == b"keep" and existing_csv.read_text() == "keep"
    assert not (tmp_path / "missing").exists() and not (tmp_path / "nowhere").exists()


def test_predict_writes_a_spatialdata_zarr(trained, tmp_path, capsys):
    spatialdata = pytest.importorskip("spatialdata")
    out = tmp_path / "p.zarr"
    assert main(["predict", str(trained), "--model", "ridge", "-o", str(out), "-q"]) == 0, capsys.readouterr().err
    table = spatialdata.read_zarr(out).tables["table"]
    assert "ridge" in table.layers and np.isfinite(np.asarray(table.layers["ridge"])).all()
    assert _leftovers(tmp_path) == []
    # Replacing it keeps exactly one store and nothing beside it.
    assert main(["predict", str(trained), "--model", "ridge", "-o", str(out), "--overwrite", "-q"]) == 0
    assert "ridge" in spatialdata.read_zarr(out).tables["table"].layers
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["p.zarr", "p.h5ad"])
def test_failed_write_leaves_no_partial_output(name, trained, tmp_path, capsys, monkeypatch):
    class _Broken:
        def write(self, path):
            Path(path).mkdir()
            (Path(path) / "zarr.json").write_text("{}")  # a store begun, then the write fails
            raise OSError("disk full")

    def broken_h5ad(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(sthisto.io, "to_spatialdata", lambda adata: _Broken())
    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken_h5ad)
    out = tmp_path / name
    assert main(["predict", str(trained), "--model", "ridge", "-o", str(out), "-q"]) == 1
    assert "disk full" in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []

    # An earlier output survives a failed --overwrite untouched.
    if name.endswith(".zarr"):
        out.mkdir()
        (out / "zarr.json").write_text("earlier")
        marker = out / "zarr.json"
    else:
        out.write_bytes(b"earlier")
        marker = out
    assert main(["predict", str(trained), "--model", "ridge", "-o", str(out), "--overwrite", "-q"]) == 1
    assert marker.read_bytes() == b"earlier" and _leftovers(tmp_path) == []


def test_failed_demo_leaves_no_partial_report(tmp_path, tiny_method, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(sthisto.pl, "domain_maps", broken)  # after metrics and the first figure are written
    folder = tmp_path / "demo"
    assert main(["demo", "--out", str(folder), "-m", tiny_method, "--n-spots", "30", "--n-genes", "6",
                 "--max-epochs", "1", "-q"]) == 1  # fmt: skip
    assert "drawing failed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_library_errors_name_the_flags(trained, tmp_path, capsys):
    # 'ridge' is already stored in the input: the library says overwrite=True / key_added=...
    out = tmp_path / "again.h5ad"
    assert main(["train", str(trained), "-m", "ridge", "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--key-added <new name>" in err, err
    assert "overwrite=" not in err and "key_added" not in err
    assert not out.exists()


def test_cli_words():
    train = _subparsers()["train"]
    said = cli_words(
        "Pass overwrite=True to replace it, or key_added='<new name>' to keep both; train_mask=['S1'] "
        "and max_epochs=5. Not a flag: bootstrap=True, n_members=K.",
        train,
    )
    assert said == (
        "Pass --overwrite to replace it, or --key-added <new name> to keep both; --train-libraries ['S1'] "
        "and --max-epochs 5. Not a flag: bootstrap=True, --n-members K."
    )
    assert cli_words("key_added= must be a string.", _subparsers()["demo"]) == "key_added= must be a string."


def test_training_reports_its_spots_and_prints_plain_progress(h5ad, tmp_path, tiny_method, capsys):
    out = tmp_path / "t.h5ad"
    code = main(["train", str(h5ad), "-m", tiny_method, "--train-libraries", "S01", "--max-epochs", "3",
                 "--validation", "0.25", "-o", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    err = capsys.readouterr().err  # captured: not a terminal, so plain lines instead of a bar
    adata = ad.read_h5ad(h5ad)
    n_s01 = int((adata.obs["library_id"] == "S01").sum())
    assert n_s01 < adata.n_obs
    assert f"training {tiny_method} on {n_s01} spots of S01" in err
    record = sthisto.tl.get_model(ad.read_h5ad(out), tiny_method).trained_on
    assert 0 < record["n_fit_spots"] < n_s01
    assert f"trained on {record['n_fit_spots']} spots ({record['n_validation_spots']} more held out" in err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert lines[0].startswith("epoch 1/3  train loss") and lines[-1].startswith("epoch 3/3")
    assert "val loss" in lines[-1] and "\r" not in err

    assert main(["train", str(h5ad), "-m", tiny_method, "--max-epochs", "2", "-o", str(out), "--overwrite", "-q"]) == 0
    assert capsys.readouterr().err == ""
