"""The benchmark table's bookkeeping: parameters, the gene-mean row, appending runs, Markdown."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("benchmark_table", BENCHMARKS / "benchmark_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method="ridge", recipe="closed form", settings="", folds="all", value=0.2):
    return {
        "cohort": "synthetic",
        "protocol": "patient",
        "method": method,
        "recipe": recipe,
        "settings": settings,
        "folds": folds,
        "weights": "none",
        "random_weights": False,
        "epochs": "",
        "epochs_run": "",
        "pearson_gene_mean": value,
        "pearson_gene_median": value,
        "pearson_spot_mean": 0.7,
        "rmse": 0.3,
        "genes_constant": 0,
        "n_spots": 100,
        "n_genes": 10,
        "n_folds": 3,
        "n_sections_scored": 6,
        "gene_mean_pearson_spot_mean": 0.6,
        "gene_mean_rmse": 0.4,
        "dep_n_genes": 6,
        "ind_n_genes": 4,
        "gene_mean_dep_pcc_spot_mean": 0.55,
        "gene_mean_ind_pcc_spot_mean": 0.65,
        "dep_genes_constant": 0,
        "ind_genes_constant": 0,
    }


def test_param_values_are_json_when_they_parse(table):
    parsed = table.parse_params(["histosge.encoder=handcrafted", "histosge.lr=0.003", "hggef.max_epochs=5"])
    assert parsed == {"histosge": {"encoder": "handcrafted", "lr": 0.003}, "hggef": {"max_epochs": 5}}
    with pytest.raises(SystemExit, match="METHOD.KEY=VALUE"):
        table.parse_params(["histosge=3"])


def test_gene_mean_row_is_constant_for_every_gene_and_section(table):
    row = table.gene_mean_row(_row())
    assert row["method"] == "gene_mean"
    assert np.isnan(row["pearson_gene_mean"])
    assert row["pearson_spot_mean"] == 0.6
    assert row["genes_constant"] == 10 * 6
    assert (row["dep_genes_constant"], row["ind_genes_constant"]) == (6 * 6, 4 * 6)
    assert row["dep_pcc_spot_mean"] == 0.55


def test_append_replaces_only_rows_measured_again(table, tmp_path):
    first = [_row(), _row("histosge_tiny", "paper", "max_epochs=60", value=0.1)]
    table.write_tables(table.combined(None, first), tmp_path)
    again = [_row("histosge_tiny", "paper", "max_epochs=60", value=0.15), _row("histosge", "paper", "", "C2")]
    frame = table.combined(table.previous_rows(tmp_path), again)
    assert len(frame) == 3
    by_method = frame.set_index("method")
    assert by_method.loc["histosge_tiny", "pearson_gene_mean"] == 0.15
    assert by_method.loc["ridge", "pearson_gene_mean"] == 0.2
    assert by_method.loc["histosge", "folds"] == "C2"


def test_markdown_shows_counts_as_integers_and_undefined_as_dash(table, tmp_path):
    rows = [table.gene_mean_row(_row()), _row()]
    text = table.write_tables(table.combined(None, rows), tmp_path)
    assert text.startswith("### synthetic (patient held out)")
    gene_mean_line = next(line for line in text.splitlines() if line.startswith("| gene_mean"))
    assert "| – |" in gene_mean_line and "| 36 |" in gene_mean_line
    assert (tmp_path / "benchmark_table.csv").exists() and (tmp_path / "benchmark_table.md").read_text() == text


def test_learning_curves_of_every_member_are_collected_and_drawn(table, tmp_path):
    import json

    import sthisto

    adata = sthisto.datasets.synthetic(n_sections=4, n_patients=1, n_spots=40, n_genes=4, seed=3)
    model = sthisto.tl.train(
        adata, "histosge_tiny", recipe="small_data", n_members=2, max_epochs=3, store=False, progress=False
    )
    info = {"history": json.dumps(model.history), "member_histories": json.dumps([model.members[0].history])}
    curves = table.member_curves(info)
    assert curves == [model.history["val_pearson_gene"], model.members[0].history["val_pearson_gene"]]
    assert all(len(curve) == len(model.history["epoch"]) for curve in curves[:1])
    path = tmp_path / "learning_curves.json"
    # the current layout (a list of member curves per fold) and the earlier one (one curve per fold)
    path.write_text(
        json.dumps({"synthetic/histosge_tiny/small_data/whole sections": {"S01": curves, "S02": [0.1, 0.2]}})
    )
    png = table.plot_learning_curves(path)
    assert png == tmp_path / "learning_curves.png" and png.stat().st_size > 5_000
