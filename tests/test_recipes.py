"""tl.train(..., recipe=...): the small-data recipe (issue 14) and its pieces."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import sthisto
from sthisto._errors import InputError
from sthisto.engine._recipes import FINAL_LR_FRACTION, fold_output_scale, output_layer, prepare, with_schedule

torch.set_num_threads(1)


def test_folding_the_scale_into_a_relu_output_layer_is_exact():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.ReLU())
    model = SimpleNamespace(network=network, genes=["a", "b", "c"])
    assert output_layer(network, 3) is network[2]
    x = torch.randn(11, 5)
    before = network(x).detach()
    scale = np.array([0.5, 2.0, 3.0])
    fold_output_scale(model, scale)
    np.testing.assert_allclose(network(x).detach().numpy(), before.numpy() * scale, rtol=1e-6, atol=1e-7)


def test_schedule_warms_up_then_decays_to_its_floor():
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = with_schedule(optimizer, 100)["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] < rates[4] <= 1.0  # warm-up
    assert max(rates) == pytest.approx(1.0)
    assert np.all(np.diff(rates[5:]) <= 1e-12)  # then never rises
    assert rates[-1] == pytest.approx(FINAL_LR_FRACTION, abs=0.01)


@pytest.fixture(scope="module")
def cohort():
    adata = sthisto.datasets.synthetic(n_sections=3, n_patients=1, n_spots=80, n_genes=6, seed=4)
    sthisto.pp.normalize(adata)
    return adata


def test_output_bias_starts_at_the_scaled_training_mean(cohort):
    adata = cohort.copy()
    train = (adata.obs["library_id"] != "S03").to_numpy()
    index = np.flatnonzero(train)
    model = sthisto.tl.train(adata, "histosge_tiny", train_mask=train, max_epochs=1, store=False, progress=False)
    targets = np.asarray(adata.layers["sthisto_target"][index].toarray(), dtype=np.float64)
    fresh = type(model)(model.genes, network_params=model.network_params, data_params=model.data_params)
    scaled, scale = prepare(fresh, adata, index, targets, user_params={})
    layer = output_layer(fresh.network, len(fresh.genes))
    np.testing.assert_allclose(scale, targets.std(axis=0), rtol=1e-6)
    np.testing.assert_allclose(layer.bias.detach().numpy(), (targets / scale).mean(axis=0), rtol=1e-5)
    assert fresh.training_params["weight_decay"] == pytest.approx(1e-4)
    spec = fresh.data_params["input_standardization"]
    features = np.asarray(fresh._features_cache(adata))[index]
    np.testing.assert_allclose(features.mean(axis=0), 0, atol=1e-3)  # the network sees standardised inputs
    assert len(spec["mean"]) == features.shape[1]
    np.testing.assert_allclose(scaled.std(axis=0), 1.0, rtol=1e-4)  # every gene weighs the same in the loss


def test_small_data_recipe_is_recorded_reloads_identically_and_validates_on_training_data(cohort, tmp_path):
    adata = cohort.copy()
    before = {key: adata.layers[key].copy() for key in adata.layers}
    with pytest.raises(InputError, match="recipe"):
        sthisto.tl.train(adata, "histosge_tiny", recipe="fast")
    assert "sthisto" not in adata.uns or "models" not in adata.uns["sthisto"]
    model = sthisto.tl.train(
        adata, "histosge_tiny", train_mask=["S01", "S02"], max_epochs=3, recipe="small_data", progress=False
    )
    assert model.trained_on["recipe"] == "small_data" and model.trained_on["n_validation_spots"] > 0
    assert json.loads(adata.uns["sthisto"]["models"]["histosge_tiny"]["manifest"])["trained_on"]["recipe"] == (
        "small_data"
    )
    for key, value in before.items():  # the user's data are left as they were
        np.testing.assert_array_equal(adata.layers[key].toarray(), value.toarray())
    test = adata[adata.obs["library_id"] == "S03"].copy()
    sthisto.tl.predict(test, model, key_added="pred")
    loaded = sthisto.io.load_model(model.save(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.predict(test), np.asarray(test.layers["pred"]))
    table = sthisto.tl.evaluate(test, predicted="pred", leiden_connectivities="gauss", kmeans_n_init=2)
    assert set(table["recipe"]) == {"small_data"}
    paper = sthisto.tl.train(adata, "histosge_tiny", train_mask=["S01", "S02"], max_epochs=1, store=False)
    assert paper.trained_on["recipe"] == "paper" and "input_standardization" not in paper.data_params
    assert paper.trained_on["n_validation_spots"] == 0  # the papers' setting: no validation


def test_cross_validate_compares_recipes_on_identical_folds(cohort):
    adata = cohort.copy()
    fast = {"progress": False, "evaluate_params": {"leiden_connectivities": "gauss", "kmeans_n_init": 2}}
    paper = sthisto.tl.cross_validate(adata, "histosge_tiny", folds=["S03"], max_epochs=2, key_added="a", **fast)
    small = sthisto.tl.cross_validate(
        adata, "histosge_tiny", folds=["S03"], max_epochs=2, recipe="small_data", key_added="b", **fast
    )
    assert set(paper["recipe"]) == {"paper"} and set(small["recipe"]) == {"small_data"}
    assert list(paper["group"]) == list(small["group"])
