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
    assert not layer.weight.detach().any()  # the first prediction is exactly the gene means
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


def _dihedral_group(patch: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rotations / reflections of one (C, H, H) patch, built independently of the code under test."""
    views = []
    for base in (patch, patch.flip(-1)):
        for turns in range(4):
            views.append(torch.rot90(base, turns, dims=(-2, -1)))
    return views


def test_dihedral_views_rotate_or_mirror_each_patch_and_leave_the_input_alone():
    from sthisto.engine._augment import augment_batch, dihedral_views

    generator = torch.Generator().manual_seed(0)
    patches = torch.randint(0, 256, (64, 3, 9, 9), generator=generator, dtype=torch.uint8)
    original = patches.clone()
    torch.manual_seed(1)
    out = dihedral_views(patches)
    torch.manual_seed(1)
    again = dihedral_views(patches)
    assert torch.equal(patches, original) and torch.equal(out, again)  # untouched input; seeded
    seen = set()
    for patch, view in zip(patches, out, strict=True):
        matches = [k for k, candidate in enumerate(_dihedral_group(patch)) if torch.equal(candidate, view)]
        assert matches, "an augmented patch is not a rotation or reflection of its input"
        seen.add(matches[0])
    assert len(seen) == 8  # every view is drawn (64 spots: missing one has probability < 1e-3)
    assert sorted(out.flatten().tolist()) == sorted(patches.flatten().tolist())  # no pixel value changes
    with pytest.raises(ValueError, match="square"):
        dihedral_views(torch.zeros(2, 3, 4, 5))
    features = {"features": torch.ones(3, 4)}
    assert augment_batch(features) is features  # feature methods are not augmented


def test_small_data_keeps_the_epoch_with_the_best_held_aside_pearson(cohort):
    adata = cohort.copy()
    kwargs = {"train_mask": ["S01", "S02"], "max_epochs": 8, "store": False, "progress": False}
    model = sthisto.tl.train(adata, "histosge_tiny", recipe="small_data", early_stopping=50, **kwargs)
    assert model.trained_on["selected_on"] == "val_pearson_gene"
    curve = model.history["val_pearson_gene"]
    assert len(curve) == 8 and model.trained_on["selected_epoch"] == int(np.argmax(curve))
    by_loss = sthisto.tl.train(
        adata, "histosge_tiny", recipe="small_data", monitor="val_loss", early_stopping=50, **kwargs
    )
    assert by_loss.trained_on["selected_on"] == "val_loss"
    assert by_loss.trained_on["selected_epoch"] == int(np.argmin(by_loss.history["val_loss"]))
    paper = sthisto.tl.train(adata, "histosge_tiny", validation=0.2, **kwargs)
    assert paper.trained_on["selected_on"] == "val_loss"  # the paper recipe selects on its loss
    with pytest.raises(InputError, match="monitor"):
        sthisto.tl.train(adata, "histosge_tiny", monitor="val_accuracy", **kwargs)


def test_small_data_ensemble_members_hold_aside_different_sections():
    adata = sthisto.datasets.synthetic(n_sections=5, n_patients=1, n_spots=40, n_genes=4, seed=2)
    model = sthisto.tl.train(
        adata,
        "histosge_tiny",
        train_mask=["S01", "S02", "S03", "S04"],
        recipe="small_data",
        n_members=3,
        max_epochs=2,
        store=False,
        progress=False,
    )
    held_aside = [m.trained_on["validation_libraries"] for m in [model, *model.members]]
    assert held_aside == [["S04"], ["S03"], ["S02"]]
    assert model.trained_on["ensemble"]["member_held_aside"] == held_aside
    for member in [model, *model.members]:
        assert set(member.trained_on["libraries"]) == {"S01", "S02", "S03", "S04"}  # fitted on the rest
    test = adata[adata.obs["library_id"] == "S05"].copy()
    each = np.stack([member.predict_network(test) for member in [model, *model.members]])
    assert not np.allclose(each[0], each[1])  # different members, different networks
    np.testing.assert_allclose(model.predict(test), each.mean(axis=0), rtol=1e-6)  # an ensemble predicts its mean
    sthisto.tl.predict(test, model, key_added="pred")
    np.testing.assert_allclose(np.asarray(test.layers["pred"]), each.mean(axis=0), rtol=1e-6)


def test_small_data_defaults_an_ensemble_and_the_methods_own_learning_rate(cohort):
    adata = cohort.copy()
    kwargs = {"train_mask": ["S01", "S02"], "max_epochs": 1, "store": False, "progress": False}
    small = sthisto.tl.train(adata, "histospace_tiny", recipe="small_data", **kwargs)
    assert len(small.members) == 3 and small.trained_on["ensemble"]["n_members"] == 4
    assert small.training_params["lr"] == pytest.approx(small.training_params["small_data_lr"]) == pytest.approx(1e-3)
    paper = sthisto.tl.train(adata, "histospace_tiny", **kwargs)
    assert paper.members == [] and paper.training_params["lr"] == pytest.approx(1e-4)  # the paper's
    given = sthisto.tl.train(adata, "histospace_tiny", recipe="small_data", n_members=1, lr=5e-4, **kwargs)
    assert given.members == [] and given.training_params["lr"] == pytest.approx(5e-4)  # the user's choice wins
    ridge = sthisto.tl.train(adata, "ridge", recipe="small_data", **kwargs)
    assert ridge.members == []  # closed form: nothing to ensemble by default


def test_hggef_log_expression_head_starts_at_the_gene_means_its_count_heads_untouched(cohort):
    from sthisto._method_registry import resolve_method
    from sthisto.tl._train import _targets

    adata = cohort.copy()
    cls, variant = resolve_method("hggef_tiny")
    index = np.flatnonzero((adata.obs["library_id"] != "S03").to_numpy())
    genes = list(adata.var_names)
    target = cls.all_data_defaults()["target"]
    targets, _, _ = _targets(adata, index, genes, layer=None, variant=target, need_counts=True)
    torch.manual_seed(0)
    model = cls.configure(adata, genes=genes, train_index=index, params=variant)
    counts_head = {k: v.clone() for k, v in model.network.zinb.state_dict().items()}
    fitted, scale = prepare(model, adata, index, targets, user_params=variant)
    assert scale is None and fitted is targets  # counts and their target are fitted as given
    head = model.prediction_layer()
    assert not head.weight.detach().any()
    dense = targets.toarray() if hasattr(targets, "toarray") else np.asarray(targets)
    np.testing.assert_allclose(head.bias.detach().numpy(), dense.mean(axis=0), rtol=1e-5, atol=1e-7)
    for key, value in model.network.zinb.state_dict().items():
        assert torch.equal(value, counts_head[key]), key
    assert model.training_params["lr"] == pytest.approx(3e-3)  # the tiny network's small_data_lr
