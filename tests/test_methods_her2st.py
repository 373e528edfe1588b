"""Every registered method trains and predicts on real her2st sections (skipped without the data).

Real counts hold what synthetic ones do not, e.g. her2st C2 has a spot with no counts in the
785 published genes (library size 0, size factor 0). One short epoch per method is enough to
show that training stays finite on such data and that predictions come out for a new section.
"""

from __future__ import annotations

import numpy as np
import pytest

import sthisto

pytestmark = pytest.mark.real_data

TINY = sorted(name for name in sthisto.models.list_models() if name.endswith("_tiny"))


@pytest.fixture(scope="module")
def her2st_c2_c3(her2st_dir):
    adata = sthisto.io.read_her2st(her2st_dir, sections=["C2", "C3"])
    sthisto.pp.select_genes(adata, genes=sthisto.datasets.her2st_785_genes())
    adata = adata[:, adata.var["sthisto_selected"]].copy()
    library_size = np.asarray(adata[adata.obs["library_id"] == "C2"].X.sum(axis=1)).ravel()
    assert (library_size == 0).any(), "the edge case this module is about: a C2 spot without counts"
    return adata


@pytest.mark.parametrize("method", TINY)
def test_trains_on_c2_and_predicts_c3(her2st_c2_c3, method):
    adata = her2st_c2_c3.copy()
    model = sthisto.tl.train(adata, method, train_mask=["C2"], max_epochs=1, seed=0, progress=False)
    if model.network is not None:
        assert np.isfinite(model.history["train_loss"]).all(), model.history
    test = adata[adata.obs["library_id"] == "C3"].copy()
    sthisto.tl.predict(test, model, key_added="predicted")
    predicted = np.asarray(test.layers["predicted"])
    assert predicted.shape == test.shape and np.isfinite(predicted).all()
    assert predicted.std(axis=0).max() > 0  # varies across spots: not a constant
