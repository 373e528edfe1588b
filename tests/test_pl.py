"""sthisto.pl: image comparisons against committed baselines, plus behaviour checks.

Baselines live in ``tests/baseline_images/`` (60 dpi PNGs). They are drawn from small data built
here (no generator or model of other modules), with matplotlib's test settings (bundled DejaVu
fonts, no hinting). To regenerate them after an intended change of a plot::

    STHISTO_UPDATE_BASELINES=1 python -m pytest tests/test_pl.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.testing.compare import compare_images

import sthisto
from sthisto._errors import InputError, MissingKeyError

BASELINES = Path(__file__).parent / "baseline_images"
DPI = 60
TOLERANCE = 2.0  # RMS over 0-255 pixel values


@pytest.fixture(autouse=True)
def _matplotlib_test_settings():
    from matplotlib.testing import setup

    with matplotlib.rc_context():
        setup()  # rc defaults, bundled fonts without hinting, reproducible output
        yield
    plt.close("all")


def _check_image(fig, name: str, tmp_path: Path) -> None:
    expected = BASELINES / f"{name}.png"
    if os.environ.get("STHISTO_UPDATE_BASELINES"):
        BASELINES.mkdir(exist_ok=True)
        fig.savefig(expected, dpi=DPI)
        return
    actual = tmp_path / f"{name}.png"
    fig.savefig(actual, dpi=DPI)
    assert expected.exists(), f"missing baseline {expected}; create it with STHISTO_UPDATE_BASELINES=1"
    result = compare_images(str(expected), str(actual), tol=TOLERANCE)
    assert result is None, result


def _section(library="L1", seed=0, shift=0.0):
    """An 8 x 6 grid of spots over a small synthetic 'H&E', with three annotated domains."""
    rng = np.random.default_rng(seed)
    cols, rows = np.meshgrid(np.arange(8), np.arange(6))
    xy = np.c_[cols.ravel() * 20 + 30, rows.ravel() * 20 + 30].astype(float)
    n = len(xy)
    yy, xx = np.mgrid[0:80, 0:100]
    hires = np.stack([230 - xx // 2, 180 - yy // 2, 220 - (xx + yy) // 4], axis=-1).astype(np.uint8)
    domain = np.digitize(xy[:, 0], [85, 145])
    labels = np.array(["tumour", "stroma", "immune"], dtype=object)[domain]
    labels[:2] = ["undetermined", "Undetermined"]
    base = np.c_[xy[:, 0] / 100, xy[:, 1] / 80, np.eye(3)[domain] * 2, np.sin(xy[:, 0] / 30) + 1]
    observed = base + rng.normal(scale=0.15, size=base.shape) + shift
    predicted = 0.7 * observed + rng.normal(scale=0.25, size=observed.shape) + 0.2
    genes = [f"G{j}" for j in range(observed.shape[1])]
    adata = ad.AnnData(
        X=np.zeros((n, len(genes)), dtype=np.float32),
        obs=pd.DataFrame(
            {"library_id": pd.Categorical([library] * n), "label": pd.Categorical(labels)},
            index=[f"{library}_{i}" for i in range(n)],
        ),
        var=pd.DataFrame(index=genes),
        layers={
            "observed": observed,
            "predicted": predicted,
            "other": predicted + rng.normal(scale=0.4, size=base.shape),
        },
        obsm={"spatial": xy},
    )
    adata.uns["spatial"] = {
        library: {
            "images": {"hires": hires},
            "scalefactors": {"tissue_hires_scalef": 0.5, "spot_diameter_fullres": 14.0, "microns_per_pixel": 1.0},
        }
    }
    return adata


def _superresolved(adata):
    """Spots half-way between horizontal neighbours, valued by the mean of the two."""
    xy = adata.obsm["spatial"]
    left = np.flatnonzero(np.isin(xy[:, 0], np.arange(30, 170, 20)))
    right = left + 1
    values = (adata.layers["predicted"][left] + adata.layers["predicted"][right]) / 2
    new = ad.AnnData(
        X=values.astype(np.float32),
        obs=pd.DataFrame(
            {"library_id": pd.Categorical(["L1"] * len(left))}, index=[f"sr{i}" for i in range(len(left))]
        ),
        var=pd.DataFrame(index=adata.var_names),
        layers={"superres": values},
        obsm={"spatial": (xy[left] + xy[right]) / 2},
    )
    new.uns["spatial"] = {"L1": {"scalefactors": {"spot_diameter_fullres": 7.0}}}
    return new


@pytest.fixture
def two_sections():
    adata = ad.concat([_section("L1", 0), _section("L2", 1, shift=0.3)], uns_merge="unique")
    for key, layer in (("pred_a", "predicted"), ("pred_b", "other")):
        adata.layers[key] = adata.layers[layer]
        sthisto.tl.evaluate(adata, predicted=key, observed="observed", kmeans_n_init=2)
    return adata


# --- image comparisons ---------------------------------------------------------------------------------
def test_gene_maps_image(tmp_path):
    adata = _section()
    fig = sthisto.pl.gene_maps(
        adata,
        ["G0", "G3"],
        layers=["observed", "predicted", (_superresolved(adata), "superres")],
        titles=["observed", "predicted", "super-resolved"],
        panel_size=1.6,
        show=False,
    )
    _check_image(fig, "gene_maps", tmp_path)


def test_metric_distribution_image(two_sections, tmp_path):
    ax = sthisto.pl.metric_distribution(
        two_sections, ["pred_a", "pred_b"], palette=["tab:blue", "tab:orange"], show=False
    )
    _check_image(ax.figure, "metric_distribution", tmp_path)


def test_metrics_heatmap_image(tmp_path):
    table = pd.DataFrame(
        {
            "method": ["ridge"] * 3 + ["thitogene"] * 3,
            "group": ["A", "B", "overall"] * 2,
            "metric": ["pearson_gene_mean"] * 6,
            "value": [0.11, 0.19, 0.15, 0.21, 0.33, 0.27],
        }
    )
    ax = sthisto.pl.metrics_heatmap(table, show=False)
    _check_image(ax.figure, "metrics_heatmap", tmp_path)


def test_training_curves_image(tmp_path):
    history = {
        "epoch": [0, 1, 2, 3, 4],
        "train_loss": [1.0, 0.7, 0.5, 0.42, 0.4],
        "val_loss": [1.1, 0.8, 0.65, 0.66, 0.7],
    }
    ax = sthisto.pl.training_curves(history, show=False)
    _check_image(ax.figure, "training_curves", tmp_path)


def test_domain_maps_image(tmp_path):
    fig = sthisto.pl.domain_maps(
        _section(), predicted="predicted", labels_key="label", kmeans_n_init=2, panel_size=2.2, show=False
    )
    _check_image(fig, "domain_maps", tmp_path)


# --- behaviour ------------------------------------------------------------------------------------------------
def test_gene_maps_share_one_colour_scale_per_gene():
    adata = _section()
    adata.layers["predicted"][5, 0] = np.nan  # drawn in the missing colour, ignored by the scale
    fig = sthisto.pl.gene_maps(adata, ["G0", "G2"], layers=["observed", "predicted"], img_key=None, show=False)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 4
    for row, gene in enumerate(["G0", "G2"]):
        j = adata.var_names.get_loc(gene)
        values = np.concatenate([adata.layers["observed"][:, j], adata.layers["predicted"][:, j]])
        for ax in panels[2 * row : 2 * row + 2]:
            norm = ax.collections[0].norm
            assert norm.vmin == pytest.approx(np.nanmin(values)) and norm.vmax == pytest.approx(np.nanmax(values))
    assert panels[0].get_ylabel() == "G0" and panels[0].get_title() == "observed"


def test_gene_maps_refuse_bad_input_before_drawing():
    adata = ad.concat([_section("L1"), _section("L2", 1)], uns_merge="unique")
    opened = plt.get_fignums()
    with pytest.raises(InputError, match="library_id"):
        sthisto.pl.gene_maps(adata, "G0", layers=["observed"])
    with pytest.raises(MissingKeyError, match="NOPE"):
        sthisto.pl.gene_maps(adata, "NOPE", layers=["observed"], library_id="L1")
    with pytest.raises(MissingKeyError, match="absent"):
        sthisto.pl.gene_maps(adata, "G0", layers=["absent"], library_id="L1")
    with pytest.raises(InputError, match="layers"):
        sthisto.pl.gene_maps(adata, "G0", layers=[3], library_id="L1")
    with pytest.raises(MissingKeyError, match="lowres"):
        sthisto.pl.gene_maps(adata, "G0", layers=["observed"], library_id="L1", img_key="lowres")
    assert plt.get_fignums() == opened


def test_axes_and_save(two_sections, tmp_path):
    fig, axes = plt.subplots(1, 3)
    assert sthisto.pl.metric_distribution(two_sections, "pred_a", kind="violin", ax=axes[0]) is axes[0]
    assert sthisto.pl.metrics_heatmap(two_sections, ["pred_a", "pred_b"], metric="mse", ax=axes[1]) is axes[1]
    history = {"epoch": [0, 1], "train_loss": [2.0, 1.0], "val_loss": [np.nan, np.nan]}
    assert sthisto.pl.training_curves(history, ax=axes[2], save=tmp_path / "curves.png") is axes[2]
    assert (tmp_path / "curves.png").stat().st_size > 0
    rows = [t.get_text() for t in axes[1].get_yticklabels()]
    assert rows == ["pred_a", "pred_b"]
    columns = [t.get_text() for t in axes[1].get_xticklabels()]
    assert columns == ["L1", "L2", "overall"]
    sthisto.pl.gene_maps(_section(), "G1", layers=["observed"], save=tmp_path / "maps.pdf")
    assert (tmp_path / "maps.pdf").read_bytes().startswith(b"%PDF")
    with pytest.raises(InputError, match="extension"):
        sthisto.pl.gene_maps(_section(), "G1", layers=["observed"], save=tmp_path / "maps")


def test_metric_distribution_draws_the_per_gene_values(two_sections):
    ax = sthisto.pl.metric_distribution(two_sections, ["pred_a", "pred_b"], metric="ssim", show=False)
    per_gene = sthisto.tl.get_metrics(two_sections, "pred_a", per_gene=True)
    medians = sorted(
        line.get_ydata()[0] for line in ax.lines if len(line.get_ydata()) == 2 and line.get_color() == "black"
    )
    expected = sorted(per_gene.groupby("group")["ssim"].median())
    assert all(any(abs(m - e) < 1e-9 for m in medians) for e in expected)
    with pytest.raises(InputError, match="per-gene"):
        sthisto.pl.metric_distribution(two_sections, "pred_a", metric="pearson_gene_mean")
    with pytest.raises(MissingKeyError, match="no stored metrics"):
        sthisto.pl.metric_distribution(two_sections, "missing")


def test_training_curves_from_stored_records():
    adata = _section()
    history = {"epoch": [0, 1, 2], "train_loss": [3.0, 2.0, 1.5], "val_loss": [3.2, 2.5, 2.6]}
    adata.uns["sthisto"] = {
        "models": {"m": {"manifest": json.dumps({"history": history})}},
        "cross_validate": {
            "cv": {"folds": {f: {"history": json.dumps(history)} for f in ("A", "B")}, "genes": np.array(["G0"])}
        },
    }
    ax = sthisto.pl.training_curves(adata, "m", show=False)
    assert [tuple(line.get_ydata()) for line in ax.lines[:2]] == [(3.0, 2.0, 1.5), (3.2, 2.5, 2.6)]
    assert ax.lines[2].get_xdata()[0] == 1  # the kept epoch (lowest validation loss) is marked
    ax = sthisto.pl.training_curves(adata, "cv", show=False)
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"A", "B"}
    with pytest.raises(MissingKeyError):
        sthisto.pl.training_curves(adata, "nothing")
    with pytest.raises(InputError, match="no per-epoch"):
        sthisto.pl.training_curves({"epoch": [], "train_loss": [], "val_loss": []})


def test_domain_map_ari_equals_evaluate():
    adata = _section()
    table = sthisto.tl.evaluate(adata, predicted="predicted", observed="observed", labels_key="label",
                                kmeans_n_init=3, leiden_connectivities="gauss", n_neighbors=8)  # fmt: skip
    ari = table.query("group == 'L1' and metric == 'ari_kmeans'")["value"].iloc[0]
    fig = sthisto.pl.domain_maps(adata, predicted="predicted", labels_key="label", kmeans_n_init=3, show=False)
    assert fig.axes[1].get_title().endswith(f"ARI = {ari:.3f}")
    fig = sthisto.pl.domain_maps(
        adata,
        predicted="predicted",
        labels_key="label",
        method="leiden",
        leiden_connectivities="gauss",
        n_neighbors=8,
        show=False,
    )
    leiden = table.query("group == 'L1' and metric == 'ari_leiden'")["value"].iloc[0]
    assert fig.axes[1].get_title().endswith(f"ARI = {leiden:.3f}")
    # undetermined spots are grey in both panels
    faces = fig.axes[0].collections[0].get_facecolors()
    assert np.allclose(faces[0], matplotlib.colors.to_rgba("lightgrey"))


# --- scanpy's show= / return_fig= -------------------------------------------------------------------
def _calls(two_sections):
    history = {"epoch": [0, 1], "train_loss": [2.0, 1.0], "val_loss": [2.5, 1.5]}
    return {
        "gene_maps": lambda **kw: sthisto.pl.gene_maps(_section(), "G1", layers=["observed"], img_key=None, **kw),
        "domain_maps": lambda **kw: sthisto.pl.domain_maps(
            _section(), predicted="predicted", labels_key="label", kmeans_n_init=2, **kw
        ),
        "metric_distribution": lambda **kw: sthisto.pl.metric_distribution(two_sections, "pred_a", **kw),
        "metrics_heatmap": lambda **kw: sthisto.pl.metrics_heatmap(two_sections, ["pred_a", "pred_b"], **kw),
        "training_curves": lambda **kw: sthisto.pl.training_curves(history, **kw),
    }


@pytest.mark.parametrize(
    "name", ["gene_maps", "domain_maps", "metric_distribution", "metrics_heatmap", "training_curves"]
)
def test_plots_show_once_and_return_none_by_default(name, two_sections, monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(plt.get_fignums()))
    call = _calls(two_sections)[name]
    plt.close("all")
    # A notebook cell ending in the call: shown by plt.show, and no Figure returned for IPython to show again.
    assert call() is None and len(shown) == 1 and len(shown[0]) == 1
    drawn = call(show=False)
    assert len(shown) == 1 and isinstance(drawn, (matplotlib.figure.Figure, matplotlib.axes.Axes))
    fig = call(return_fig=True)
    assert len(shown) == 1 and isinstance(fig, matplotlib.figure.Figure)
    plt.close("all")


def test_plots_into_given_axes_are_not_shown_unless_asked(two_sections, monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(True))
    fig, axes = plt.subplots(1, 2)
    assert sthisto.pl.metric_distribution(two_sections, "pred_a", ax=axes[0]) is axes[0]
    assert (
        sthisto.pl.training_curves({"epoch": [0], "train_loss": [1.0], "val_loss": [1.2]}, ax=axes[1], return_fig=True)
        is fig
    )
    assert not shown
    assert sthisto.pl.metrics_heatmap(two_sections, ["pred_a"], ax=axes[1], show=True) is None and shown
    plt.close("all")
