"""pp.embed: streamed patch embeddings written to obsm, recorded, cached, refused on bad input."""

from __future__ import annotations

import copy
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import sthisto
from sthisto._errors import InputError, KeyExistsError, MissingKeyError, NoImageError
from sthisto.encoders import Encoder, get_encoder

PURPLE = (120, 70, 160)
PINK = (235, 150, 200)


def _slide(height, width, seed):
    """Left half purple (nuclei-rich), right half pink (stroma), with pixel noise."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=float)
    image[:, : width // 2] = PURPLE
    image[:, width // 2 :] = PINK
    image += rng.normal(0, 10, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _spatial_entry(image, mpp):
    return {
        "images": {"fullres": image},
        "scalefactors": {"microns_per_pixel": mpp, "spot_diameter_fullres": 20.0 / mpp},
        "metadata": {},
    }


def make_adata(with_imageless=False):
    """Two libraries at different resolutions (0.5 and 1.0 µm/px), spots on a grid over both halves."""
    blocks, coords = [], []
    uns = {}
    for library, (height, width, mpp, seed) in {"A": (160, 200, 0.5, 0), "B": (90, 110, 1.0, 1)}.items():
        xs = np.linspace(15, width - 15, 6)
        ys = np.linspace(15, height - 15, 3)
        grid = np.array([(x, y) for y in ys for x in xs])
        coords.append(grid)
        blocks.append(pd.DataFrame({"library_id": library}, index=[f"{library}_{i}" for i in range(len(grid))]))
        uns[library] = _spatial_entry(_slide(height, width, seed), mpp)
    if with_imageless:
        coords.append(np.array([[10.0, 10.0], [20.0, 10.0]]))
        blocks.append(pd.DataFrame({"library_id": "C"}, index=["C_0", "C_1"]))
        uns["C"] = {"images": {}, "scalefactors": {"microns_per_pixel": 1.0}, "metadata": {"has_image": False}}
    obs = pd.concat(blocks)
    obs["library_id"] = pd.Categorical(obs["library_id"])
    rng = np.random.default_rng(0)
    adata = ad.AnnData(X=rng.poisson(1.0, (len(obs), 5)).astype(np.float32), obs=obs)
    adata.obsm["spatial"] = np.concatenate(coords)
    adata.uns["spatial"] = uns
    return adata


def _is_purple(adata):
    widths = {"A": 200, "B": 110}
    return np.array(
        [x < widths[lib] / 2 for x, lib in zip(adata.obsm["spatial"][:, 0], adata.obs["library_id"].astype(str))]
    )


class CountingEncoder:
    """Channel means; remembers how many images it saw per call."""

    def __init__(self):
        self.batches = []

    def __call__(self, images):
        self.batches.append(images.shape[0])
        return images.mean(dim=(2, 3))


def _counting(input_size=16):
    counter = CountingEncoder()
    encoder = Encoder.from_module(counter, name="counting", input_size=input_size, output_dim=3, patch_size_um=20.0)
    return encoder, counter


def _snapshot(adata):
    return (
        sorted(adata.obsm.keys()),
        copy.deepcopy({k: v for k, v in adata.uns.items() if k != "spatial"}),
        adata.obs.copy(),
    )


def _assert_unchanged(adata, snapshot):
    keys, uns, obs = snapshot
    assert sorted(adata.obsm.keys()) == keys
    assert {k: v for k, v in adata.uns.items() if k != "spatial"}.keys() == uns.keys()
    assert repr({k: v for k, v in adata.uns.items() if k != "spatial"}) == repr(uns)
    pd.testing.assert_frame_equal(adata.obs, obs)


# ----------------------------------------------------------------------------- results and records
def test_embed_handcrafted_writes_features_and_configuration():
    adata = make_adata()
    sthisto.pp.embed(adata, encoder="handcrafted", patch_size_um=20.0, batch_size=7)
    features = adata.obsm["X_handcrafted"]
    assert features.dtype == np.float32 and features.shape == (adata.n_obs, 93)
    assert np.isfinite(features).all()
    rec = adata.uns["sthisto"]["embed"]["X_handcrafted"]
    assert rec["encoder"] == "handcrafted" and rec["output_dim"] == 93 and rec["batch_size"] == 7
    assert rec["weights"] == "none (deterministic features)"
    assert rec["microns_per_pixel"] == {"A": 0.5, "B": 1.0}
    # the same 20 µm field of view is 40 px on A and 20 px on B, both resampled to 112 px
    assert rec["crop_px"] == {"A": 40, "B": 20} and rec["patch_size_px"] == 112
    assert rec["patch_size_um"] == 20.0 and rec["image_key"] == "fullres" and rec["precision"] == "fp32"
    assert len(rec["feature_names"]) == 93
    # the features are those of the encoder on the very patches PatchDataset cuts
    dataset = sthisto.pp.PatchDataset(adata, spec=sthisto.pp.PatchSpec(size_px=112, size_um=20.0))
    patches, _ = dataset.read_batch([0, 10, 20])
    np.testing.assert_allclose(features[[0, 10, 20]], get_encoder("handcrafted").encode(patches).numpy(), rtol=1e-6)
    # purple and pink spots separate on the red channel mean, across both resolutions
    red = features[:, list(rec["feature_names"]).index("summary_ch-0_mean")]
    purple = _is_purple(adata)
    assert red[purple].max() + 50 < red[~purple].min()


def test_second_call_reuses_cache_and_other_config_needs_overwrite(caplog):
    adata = make_adata()
    encoder, counter = _counting()
    sthisto.pp.embed(adata, encoder=encoder, batch_size=5)
    # streamed: never more than one batch through the encoder at a time
    assert max(counter.batches) <= 5 and sum(counter.batches) == adata.n_obs
    first = adata.obsm["X_counting"].copy()
    counter.batches.clear()
    with caplog.at_level(logging.INFO, logger="sthisto"):
        sthisto.pp.embed(adata, encoder=encoder, batch_size=9)  # batch size does not change features
    assert counter.batches == []
    assert "reusing" in caplog.text
    np.testing.assert_array_equal(adata.obsm["X_counting"], first)

    snapshot = _snapshot(adata)
    with pytest.raises(KeyExistsError, match=r"patch_size_um.*overwrite=True"):
        sthisto.pp.embed(adata, encoder=encoder, patch_size_um=30.0)
    assert counter.batches == []
    _assert_unchanged(adata, snapshot)
    np.testing.assert_array_equal(adata.obsm["X_counting"], first)

    sthisto.pp.embed(adata, encoder=encoder, patch_size_um=30.0, overwrite=True)
    assert sum(counter.batches) == adata.n_obs
    assert adata.uns["sthisto"]["embed"]["X_counting"]["patch_size_um"] == 30.0
    assert not np.allclose(adata.obsm["X_counting"], first)  # wider field: more of the other colour


def test_cache_survives_h5ad_round_trip(tmp_path, caplog):
    adata = make_adata()
    sthisto.pp.embed(adata, encoder="handcrafted", patch_size_um=20.0, extra_features=("coords", "rgb_mean"))
    images = {lib: entry["images"].pop("fullres") for lib, entry in adata.uns["spatial"].items()}
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    for lib, image in images.items():
        back.uns["spatial"][lib]["images"]["fullres"] = image
    # a name-resolved encoder is rebuilt; the configuration read back from h5ad must still match
    caplog.clear()  # the first embedding logged "embedded ..." too
    with caplog.at_level(logging.INFO, logger="sthisto"):
        sthisto.pp.embed(back, encoder="handcrafted", patch_size_um=20.0, extra_features=("coords", "rgb_mean"))
    assert "reusing" in caplog.text and "embedded" not in caplog.text
    with pytest.raises(KeyExistsError, match="extra_features"):
        sthisto.pp.embed(back, encoder="handcrafted", patch_size_um=20.0)


def test_extra_features_and_histosge_descriptor():
    adata = make_adata()
    encoder, _ = _counting(input_size=24)
    sthisto.pp.embed(adata, encoder=encoder, key_added="X_feat", extra_features=("coords", "rgb_mean"))
    extra = adata.obsm["X_feat_extra"]
    rec = adata.uns["sthisto"]["embed"]["X_feat"]
    assert list(rec["extra_columns"]) == ["x_px", "y_px", "rgb_mean_r", "rgb_mean_g", "rgb_mean_b"]
    assert rec["extra_key"] == "X_feat_extra"
    np.testing.assert_allclose(extra[:, :2], adata.obsm["spatial"])
    dataset = sthisto.pp.PatchDataset(adata, spec=sthisto.pp.PatchSpec(size_px=24, size_um=20.0))
    patches, _ = dataset.read_batch(range(adata.n_obs))
    np.testing.assert_allclose(extra[:, 2:], patches.float().mean(dim=(2, 3)).numpy(), rtol=1e-5)
    purple = _is_purple(adata)
    assert extra[purple, 2].max() + 40 < extra[~purple, 2].min()

    descriptor = sthisto.models.histosge_features(adata, "X_feat")
    assert descriptor.shape == (adata.n_obs, 3 + 5) and descriptor.dtype == np.float32
    np.testing.assert_allclose(descriptor[:, :3], adata.obsm["X_feat"])
    np.testing.assert_allclose(descriptor[:, 5:], extra[:, 2:] / 255.0, rtol=1e-6)
    assert descriptor[:, 3:5].min() >= 0 and descriptor[:, 3:5].max() <= 1  # coordinates scaled per section
    sthisto.pp.embed(adata, encoder=encoder, key_added="X_plain")
    with pytest.raises(MissingKeyError, match="extra_features"):
        sthisto.models.histosge_features(adata, "X_plain")
    with pytest.warns(FutureWarning, match="moved to sthisto.models.histosge_features"):
        old_name = sthisto.pp.histosge_features
    assert old_name is sthisto.models.histosge_features


def test_copy_returns_new_object_and_leaves_input_alone():
    adata = make_adata()
    snapshot = _snapshot(adata)
    encoder, _ = _counting()
    out = sthisto.pp.embed(adata, encoder=encoder, copy=True)
    _assert_unchanged(adata, snapshot)
    assert "X_counting" in out.obsm and "X_counting" in out.uns["sthisto"]["embed"]
    assert sthisto.pp.embed(adata, encoder=encoder) is None and "X_counting" in adata.obsm


def test_timm_model_through_embed():
    adata = make_adata()
    sthisto.pp.embed(
        adata,
        encoder="vit_tiny_patch16_224",
        encoder_kwargs={"depth": 1, "img_size": 32},
        patch_size_um=20.0,
        key_added="X_vit",
        batch_size=16,
    )
    rec = adata.uns["sthisto"]["embed"]["X_vit"]
    assert adata.obsm["X_vit"].shape == (adata.n_obs, 192)
    assert rec["weights"] == "random (seed 0)" and rec["input_size"] == 32 and rec["patch_size_px"] == 32


# ----------------------------------------------------------------------------- refusals
def test_bad_input_is_refused_and_leaves_the_object_unchanged():
    adata = make_adata(with_imageless=True)
    snapshot = _snapshot(adata)
    encoder, counter = _counting()
    with pytest.raises(InputError, match=r"unknown encoder 'not_an_encoder'.*handcrafted.*uni"):
        sthisto.pp.embed(adata, encoder="not_an_encoder", libraries=["A", "B"])
    with pytest.raises(NoImageError, match=r"\['C'\].*libraries=\['A', 'B'\]"):
        sthisto.pp.embed(adata, encoder=encoder)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="batch_size"):
            sthisto.pp.embed(adata, encoder=encoder, batch_size=bad, libraries=["A", "B"])
    with pytest.raises(InputError, match="num_workers"):
        sthisto.pp.embed(adata, encoder=encoder, num_workers=-1, libraries=["A", "B"])
    with pytest.raises(InputError, match="extra_features"):
        sthisto.pp.embed(adata, encoder=encoder, extra_features=("texture",), libraries=["A", "B"])
    with pytest.raises(InputError, match="patch_size_um"):
        sthisto.pp.embed(adata, encoder=encoder, patch_size_um=-5, libraries=["A", "B"])
    with pytest.raises(MissingKeyError, match="'Z'"):
        sthisto.pp.embed(adata, encoder=encoder, libraries=["A", "Z"])
    with pytest.raises(InputError, match="patch_size_um="):
        sthisto.pp.embed(adata, encoder=encoder.replace(patch_size_um=None), libraries=["A", "B"])
    with pytest.raises(InputError, match="larger than library"):
        sthisto.pp.embed(adata, encoder=encoder, patch_size_um=500.0, libraries=["A", "B"])
    assert counter.batches == []
    _assert_unchanged(adata, snapshot)

    # restricting to the libraries with images works; the others get NaN rows
    sthisto.pp.embed(adata, encoder=encoder, libraries=["A", "B"])
    features = adata.obsm["X_counting"]
    imageless = adata.obs["library_id"].to_numpy() == "C"
    assert np.isnan(features[imageless]).all() and np.isfinite(features[~imageless]).all()
    assert list(adata.uns["sthisto"]["embed"]["X_counting"]["libraries"]) == ["A", "B"]


def test_workers_give_the_same_features():
    adata = make_adata()
    encoder, _ = _counting()
    sthisto.pp.embed(adata, encoder=encoder, batch_size=4, key_added="in_process")
    sthisto.pp.embed(adata, encoder=encoder, batch_size=4, num_workers=2, key_added="workers")
    np.testing.assert_array_equal(adata.obsm["in_process"], adata.obsm["workers"])


def test_device_auto_runs_on_cpu_here():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU default")
    adata = make_adata()
    encoder, _ = _counting()
    sthisto.pp.embed(adata, encoder=encoder, device="auto")
    rec = adata.uns["sthisto"]["embed"]["X_counting"]
    assert rec["device"] == "cpu" and rec["precision"] == "fp32" and rec["batch_size"] == 16
    with pytest.raises(InputError, match="CUDA"):
        sthisto.pp.embed(adata, encoder=encoder, device="cuda", key_added="X_gpu")
