"""Every method learns what the image shows and nothing else (synthetic data, short CPU runs).

The synthetic generator draws counts whose means depend on the drawn morphology for the
``SYN_DEP_*`` genes and on nothing for the ``SYN_IND_*`` genes. A method that learns from the
image must predict the first on a section it never saw, and cannot predict the second. Each
method trains briefly on two sections and predicts a third; the test asserts a margin between
the mean per-gene Pearson correlation (:func:`sthisto.tl.evaluate`) of the two gene groups.

The runs are far shorter than the papers' (hundreds of epochs on GPUs), so the absolute
correlations are modest; the margin is what a working method must show even then.
"""

from __future__ import annotations

import pytest

import sthisto

# Short CPU schedules: one optimisation step per section and epoch for the section-wide methods.
SCHEDULES = {
    "ridge": {},
    "histosge_tiny": {"max_epochs": 100, "lr": 3e-3},
    "histospace_tiny": {"max_epochs": 10, "lr": 1e-3},
    "thitogene_tiny": {"max_epochs": 80, "lr": 3e-3},
    "hggef_tiny": {"max_epochs": 50, "lr": 1e-3},
}
MARGIN = 0.15  # mean Pearson r, image-dependent minus independent genes
NOISE = 0.1  # |mean Pearson r| of the independent genes: nothing to learn there


@pytest.fixture(scope="module")
def cohort():
    adata = sthisto.datasets.synthetic(n_sections=3, n_patients=1, n_spots=300, n_genes=20, seed=5)
    sthisto.pp.normalize(adata)
    libraries = list(adata.obs["library_id"].cat.categories)
    return adata, libraries[:2], libraries[2]


def _train_and_score(cohort, method, **options):
    """Train on two sections, predict the third; the model, metrics table and per-gene Pearson r."""
    adata, train_libraries, test_library = cohort
    adata = adata.copy()
    model = sthisto.tl.train(
        adata, method, train_mask=train_libraries, layer="sthisto_target", seed=0, progress=False, **options
    )
    test = adata[adata.obs["library_id"] == test_library].copy()
    sthisto.tl.predict(test, model, key_added="predicted")
    table = sthisto.tl.evaluate(test, predicted="predicted", observed="sthisto_target")
    per_gene = sthisto.tl.get_metrics(test, "predicted", per_gene=True).set_index("gene")
    # A gene predicted as a constant has no correlation: count it as none (0).
    r = per_gene["pearson"].reindex(test.var_names).fillna(0.0).to_numpy()
    return model, table, r, test.var["synthetic_dependent"].to_numpy()


def _assert_learns_only_the_image(method, r, dependent):
    summary = f"{method}: dependent {r[dependent].mean():.3f}, independent {r[~dependent].mean():.3f}"
    assert r[dependent].mean() - r[~dependent].mean() > MARGIN, summary
    assert abs(r[~dependent].mean()) < NOISE, summary


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(SCHEDULES))
def test_learns_the_image_dependent_genes_only(cohort, method):
    _, _, r, dependent = _train_and_score(cohort, method, **SCHEDULES[method])
    _assert_learns_only_the_image(method, r, dependent)


# The small-data recipe (issue 14): the same networks, optimised to learn from few sections.
# Validation on held-aside training spots stops the runs early, so the epoch caps are generous.
# HisToSGE and HistoSPACE run as users get them (an ensemble of four); the section-wide
# networks as one member each, which is what every member of their ensemble does (four would
# take several CPU minutes here; the ensemble itself is tested in test_recipes.py).
SMALL_DATA = {
    "histosge_tiny": {"max_epochs": 100, "lr": 3e-3},
    "histospace_tiny": {"max_epochs": 10, "lr": 1e-3},
    "thitogene_tiny": {"max_epochs": 80, "lr": 3e-3, "n_members": 1},
    # Sub-sections (engine/_subsections.py) made it learn under this recipe: with one step per
    # section and epoch it reached only r = 0.04 on the dependent genes.
    "hggef_tiny": {"max_epochs": 50, "lr": 1e-3, "n_members": 1},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(SMALL_DATA))
def test_small_data_recipe_learns_the_image_dependent_genes_only(cohort, method):
    model, table, r, dependent = _train_and_score(cohort, method, recipe="small_data", **SMALL_DATA[method])
    assert model.trained_on["recipe"] == "small_data" and model.trained_on["n_validation_spots"] > 0
    _assert_learns_only_the_image(method, r, dependent)
    constant = table.query("scope == 'overall' and metric == 'n_genes_constant_predicted'")["value"].iloc[0]
    assert constant == 0, f"{method}: {constant:.0f} genes predicted as a constant"
