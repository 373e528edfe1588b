"""Weight provenance: every encoder, backbone, model and metrics table says where its weights came from.

A results table made on random weights must say so in its own columns; random weights where the
paper uses pretrained ones warn (once per call); super-resolution embeds new spots with exactly
the training encoder's weights; precomputed HisToSGE features are used as given.
"""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch

import sthisto
from sthisto._errors import MissingKeyError
from sthisto.encoders import RandomWeightsWarning, get_encoder, provenance_label, weights_label, weights_provenance

torch.set_num_threads(1)

# A ViT shaped like UNI's (same factory, same preprocessing) but tiny, so tests run in seconds.
TINY_UNI = {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 1.0}


@pytest.fixture(scope="module")
def cohort():
    return sthisto.datasets.synthetic(n_sections=3, n_spots=30, n_genes=6, seed=4)


def _random_warnings(caught) -> list:
    return [w for w in caught if issubclass(w.category, RandomWeightsWarning)]


def _train(adata, method, **params):
    libraries = list(adata.obs["library_id"].cat.categories)
    return sthisto.tl.train(adata, method, train_mask=libraries[:2], max_epochs=1, progress=False, **params)


def test_records_and_labels(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"a": torch.arange(4.0)}, path)
    record = weights_provenance("file", path=path)
    assert record == {
        "source": "file",
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    assert provenance_label(record) == f"file:{record['sha256'][:12]}"
    hub = weights_provenance("hub", hub_id="hf-hub:MahmoodLab/UNI", revision="abc123")
    assert provenance_label(hub) == "hub:MahmoodLab/UNI@abc123"
    assert provenance_label(weights_provenance("random", seed=3)) == "random"
    assert weights_label(None) == "unknown" and weights_label({}) == "none"
    assert weights_label({"features": {"encoder": "uni", "weights": hub}}) == "hub:MahmoodLab/UNI@abc123"


def test_every_encoder_records_its_weights(tmp_path):
    assert get_encoder("handcrafted").provenance == {"source": "none"}
    random_uni = get_encoder("uni", **TINY_UNI)
    assert random_uni.provenance["source"] == "random" and random_uni.provenance["seed"] == 0
    path = tmp_path / "uni.pth"
    torch.save(random_uni.model.state_dict(), path)
    loaded = get_encoder("uni", weights=path, **TINY_UNI)
    assert loaded.provenance["source"] == "file"
    assert loaded.provenance["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.config()["weights_provenance"] == loaded.provenance


def test_embedding_with_random_uni_warns_once_and_records_it(cohort):
    adata = cohort.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sthisto.pp.embed(adata, encoder="uni", encoder_kwargs=TINY_UNI, progress=False)
    found = _random_warnings(caught)
    assert len(found) == 1 and "weights=" in str(found[0].message)  # names the fix
    assert adata.uns["sthisto"]["embed"]["X_uni"]["weights_provenance"]["source"] == "random"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sthisto.pp.embed(adata, encoder="handcrafted", progress=False)
    assert not _random_warnings(caught)


def test_histosge_on_random_uni_warns_once_per_call_and_its_table_says_random(cohort):
    adata = cohort.copy()
    for call in range(2):  # the first call embeds, the second reuses the cached features
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = _train(adata, "histosge_tiny", encoder="uni", encoder_kwargs=TINY_UNI, overwrite=call > 0)
        assert len(_random_warnings(caught)) == 1, f"call {call}"
    assert model.provenance["features"]["weights"]["source"] == "random"
    manifest = json.loads(adata.uns["sthisto"]["models"]["histosge_tiny"]["manifest"])
    assert manifest["weights_provenance"]["features"]["encoder"] == "uni"
    test = adata[adata.obs["library_id"] == adata.obs["library_id"].cat.categories[2]].copy()
    sthisto.tl.predict(test, "histosge_tiny", key_added="pred")
    table = sthisto.tl.evaluate(test, predicted="pred")
    assert set(table["weights"]) == {"random"} and table["random_weights"].all()
    assert set(sthisto.tl.get_metrics(test, "pred", per_gene=True)["weights"]) == {"random"}


def test_hggef_without_imagenet_weights_warns_and_stores_the_trunk_provenance(cohort, tmp_path, monkeypatch):
    torchvision = sthisto._compat.import_torchvision()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty download cache
    adata = cohort.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _train(adata, "hggef_tiny", backbone_weights="auto")
    found = _random_warnings(caught)
    assert len(found) == 1 and "backbone_weights=" in str(found[0].message)
    assert model.provenance == {"trunk": {"source": "random", "architecture": "shufflenet_v2_x0_5"}}
    manifest = json.loads(adata.uns["sthisto"]["models"]["hggef_tiny"]["manifest"])
    assert manifest["weights_provenance"]["trunk"]["source"] == "random"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = sthisto.tl.get_model(adata, "hggef_tiny")  # its weights are stored: nothing to warn about
    assert not _random_warnings(caught) and rebuilt.provenance == model.provenance
    assert rebuilt.network_params["backbone_weights"] == "auto"

    # torchvision's cached checkpoint: source "cache" with its SHA-256
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    checkpoint = cache / "shufflenetv2_x0.5-test.pth"
    torch.save(torchvision.models.shufflenet_v2_x0_5(weights=None).state_dict(), checkpoint)
    model = _train(adata, "hggef_tiny", backbone_weights="auto", key_added="cached")
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert model.provenance["trunk"] == {"source": "cache", "path": str(checkpoint.resolve()), "sha256": digest}
    test = adata[adata.obs["library_id"] == adata.obs["library_id"].cat.categories[2]].copy()
    sthisto.tl.predict(test, "cached", key_added="pred")
    table = sthisto.tl.evaluate(test, predicted="pred")
    assert set(table["weights"]) == {f"cache:{digest[:12]}"} and not table["random_weights"].any()


def test_cross_validate_table_carries_the_weights(cohort):
    adata = cohort.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = sthisto.tl.cross_validate(
            adata, "ridge_tiny", split="section", encoder="uni", encoder_kwargs=TINY_UNI, progress=False
        )
    assert len(_random_warnings(caught)) == 1  # once per call, not once per fold
    assert set(table["weights"]) == {"random"} and table["random_weights"].all()
    record = adata.uns["sthisto"]["cross_validate"]["cv_ridge_tiny"]
    assert record["weights"] == "random"
    assert all(fold["weights"] == "random" for fold in record["folds"].values())
    spots = sthisto.tl.cross_validate(
        adata, "ridge_tiny", split="spots", key_added="spots", progress=False, encoder="handcrafted"
    )
    assert set(spots["evaluated_on"]) == {"held_out", "training_reference"}
    assert set(spots["weights"]) == {"none"} and not spots["random_weights"].any()


def test_histosge_uses_precomputed_features_as_given(cohort):
    adata = cohort.copy()
    given = np.random.default_rng(0).normal(size=(adata.n_obs, 16)).astype(np.float32)
    adata.obsm["X_mine"] = given.copy()
    model = _train(adata, "histosge_tiny", features_key="X_mine")
    np.testing.assert_array_equal(adata.obsm["X_mine"], given)  # not re-embedded, not overwritten
    assert model.data_params["features_dim"] == 16 + 5  # the paper's coordinates and RGB means appended
    extra = adata.obsm["X_mine_extra"]
    np.testing.assert_allclose(extra[:, :2], adata.obsm["spatial"], rtol=1e-6)
    assert ((extra[:, 2:] >= 0) & (extra[:, 2:] <= 255)).all() and extra[:, 2:].std() > 0
    assert "X_mine" not in adata.uns["sthisto"].get("embed", {})  # no claim that sthisto made them
    assert model.provenance["features"]["weights"] == {"source": "unknown"}


def _file_encoder_model(adata, tmp_path):
    from sthisto.models import histospace

    path = tmp_path / "encoder.pth"
    torch.save(histospace.HistoSPACEEncoder().state_dict(), path)
    sthisto.pp.embed(adata, encoder="histospace", weights=path, patch_size_um=100.0, progress=False, key_added="X_hs")
    model = sthisto.tl.train(adata, "ridge_tiny", features_key="X_hs", progress=False, store=False)
    return model, path


def test_superresolve_keeps_the_training_weights_file_and_refuses_a_missing_one(tmp_path):
    adata = sthisto.datasets.synthetic(n_sections=1, n_spots=12, n_genes=4, seed=2)
    model, path = _file_encoder_model(adata, tmp_path)
    fine = sthisto.tl.superresolve(adata, model, factor=4)
    assert np.isfinite(fine.X).all()
    path.rename(tmp_path / "moved.pth")
    with pytest.raises(MissingKeyError, match="no longer exists"):
        sthisto.tl.superresolve(adata, model, factor=4, key_added="again")


def test_superresolve_keeps_a_hub_id_and_its_revision(cohort):
    from sthisto.tl._superresolve import _prepare_model

    adata = cohort.copy()
    model = _train(adata, "ridge_tiny", encoder="handcrafted", store=False)
    hub = weights_provenance("hub", hub_id="hf-hub:MahmoodLab/UNI", revision="0123abcd")
    model.provenance = {"features": {"key": "X_uni", "encoder": "uni", "patch_size_um": 34.5, "weights": hub}}
    before = dict(model.data_params)
    restore = _prepare_model(adata, model, [], adata.obsm["spatial"], adata.obs["library_id"].to_numpy())
    assert model.data_params["encoder"] == "uni"
    assert model.data_params["encoder_weights"] == "hf-hub:MahmoodLab/UNI"
    assert model.data_params["encoder_kwargs"] == {"revision": "0123abcd"}
    restore()
    assert model.data_params == before


def test_new_spots_are_embedded_with_the_training_features_weights(tmp_path):
    adata = sthisto.datasets.synthetic(n_sections=2, n_spots=12, n_genes=4, seed=6)
    model, _ = _file_encoder_model(adata, tmp_path)
    expected = model.predict(adata, device="cpu")
    bare = adata.copy()
    del bare.obsm["X_hs"]
    del bare.uns["sthisto"]["embed"]
    # its own encoder setting (ridge's default) is not what made X_hs: only its provenance knows
    assert model.data_params["encoder"] != "histospace"
    np.testing.assert_array_equal(model.predict(bare, device="cpu"), expected)
    assert bare.uns["sthisto"]["embed"]["X_hs"]["weights_provenance"] == model.provenance["features"]["weights"]


def _fake_hub_cache(root, repo_id: str, commit: str):
    """A Hugging Face cache holding one timm repository, as hf_hub_download leaves it (offline use)."""
    from safetensors.torch import save_file

    encoder = get_encoder("uni", **TINY_UNI)
    folder = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    config = {"architecture": "vit_large_patch16_224", "model_args": TINY_UNI}
    (snapshot / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in encoder.model.state_dict().items()}
    save_file(state, str(snapshot / "model.safetensors"))


def test_hub_weights_are_recorded_and_new_spots_use_the_same_revision(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path, "lab/tiny-uni", commit)
    adata = sthisto.datasets.synthetic(n_sections=2, n_spots=12, n_genes=4, seed=8)
    hub = {"encoder": "uni", "encoder_weights": "hf-hub:lab/tiny-uni", "encoder_kwargs": {"cache_dir": str(tmp_path)}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sthisto.tl.train(adata, "ridge_tiny", progress=False, store=False, **hub)
    assert not _random_warnings(caught)
    weights = model.provenance["features"]["weights"]
    assert weights["source"] == "hub" and weights["hub_id"] == "hf-hub:lab/tiny-uni" and weights["revision"] == commit
    assert weights_label(model.provenance) == f"hub:lab/tiny-uni@{commit}"
    fine = sthisto.tl.superresolve(adata, model, factor=4)
    assert np.isfinite(fine.X).all()
    # the new spots were embedded from the same hub revision (an error otherwise: the cache has no other)
    bare = adata.copy()
    del bare.obsm["X_uni"], bare.uns["sthisto"]["embed"]
    np.testing.assert_allclose(model.predict(bare, device="cpu"), model.predict(adata, device="cpu"), rtol=1e-5)
