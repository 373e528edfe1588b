"""Model cards of the named encoders: architecture, parameter count, output width, pooling, loading."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch

import sthisto
from sthisto._errors import InputError
from sthisto.encoders import get_encoder, list_encoders
from sthisto.encoders._cards import CARDS, POOLING_RULES
from sthisto.encoders._zoo import build_network, count_parameters, wrap_card_network

# The handcrafted features have no network; HistoSPACE's is the user-trained module.
_NO_NETWORK = {"handcrafted", "histospace"}
NETWORK_CARDS = sorted(name for name in CARDS if name not in _NO_NETWORK)


def _random_fill(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Materialise a meta-device module with small random values (faster than timm's init)."""
    module.to_empty(device="cpu")
    for child in module.modules():  # index buffers (Swin) are not in the state dict
        if hasattr(child, "init_non_persistent_buffers"):
            child.init_non_persistent_buffers()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith(("running_var", ".weight")) and tensor.ndim == 1:
                tensor.fill_(1.0)  # norms and BN variances at 1 keep activations finite
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    return module.eval()


def test_every_required_model_family_has_a_card():
    required = {
        "uni", "uni2_h", "conch_v1", "conch_v1_5", "virchow", "virchow2", "hoptimus0", "hoptimus1",
        "h0_mini", "gigapath", "phikon", "phikon_v2", "hibou_b", "hibou_l", "ctranspath",
        "lunit_vits8", "resnet50_imagenet", "handcrafted", "histospace",
    }  # fmt: skip
    assert required <= set(CARDS)
    for card in CARDS.values():
        assert card.pooling in POOLING_RULES
        assert card.license and card.citation and card.param_count_source
        assert card.mean and card.std and card.input_size > 0
        if card.fov_um is None or card.target_mpp is None:
            assert card.notes, f"{card.name}: a missing scale must be explained in the notes"


@pytest.mark.parametrize("name", NETWORK_CARDS)
def test_card_architecture_parameter_count_and_output_width(name):
    card = CARDS[name]
    # Full network on the meta device: no memory, exact count against the card.
    with torch.device("meta"):
        full, _ = build_network(card)
    assert count_parameters(full) == card.param_count
    assert all(p.is_meta for p in full.parameters())
    # Forward pass at the card's input size on the scaled-down network (tiny_kwargs: the same
    # widths with one block per stage — the full ViT-H/ViT-g networks are too heavy for CI).
    with torch.device("meta"):
        tiny, _ = build_network(card, tiny=True)
    assert count_parameters(tiny) < card.param_count
    encoder = wrap_card_network(card, _random_fill(tiny), weights="random fill")
    patches = torch.randint(0, 256, (1, 3, card.input_size, card.input_size), dtype=torch.uint8)
    features = encoder.encode(patches)
    assert features.shape == (1, card.output_dim)
    assert torch.isfinite(features).all()


def test_virchow2_pools_class_token_and_mean_patch_token_without_registers():
    encoder = get_encoder("virchow2", tiny=True, seed=1)
    backbone = encoder.model.backbone
    assert backbone.num_prefix_tokens == 5  # class token + 4 registers
    patches = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    images = encoder.preprocess(patches)
    with torch.inference_mode():
        tokens = backbone.forward_features(images)
        pooled = encoder(images)
    assert tokens.shape == (2, 5 + 16 * 16, 1280)
    by_hand = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=1)
    assert pooled.shape == (2, 2560)
    torch.testing.assert_close(pooled, by_hand)
    # registers are not patches: averaging them in would give a different vector
    assert not torch.allclose(tokens[:, 1:].mean(dim=1), tokens[:, 5:].mean(dim=1), atol=1e-4)


def test_conch_pools_all_tokens_with_one_learned_query_then_layernorm():
    encoder = get_encoder("conch_v1", tiny=True, seed=2)
    tower = encoder.model
    with torch.no_grad():  # non-trivial norms so that a missed LayerNorm would show
        for norm in (tower.attn_pool_contrast.ln_q, tower.attn_pool_contrast.ln_k, tower.ln_contrast):
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
    patches = torch.randint(0, 256, (2, 3, 448, 448), dtype=torch.uint8)
    images = encoder.preprocess(patches)
    assert images.shape[-1] == 448
    # OpenAI CLIP normalisation, as CONCH v1 publishes
    assert encoder.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    with torch.inference_mode():
        tokens = tower.tokens(images)
        pooled = encoder(images)
        assert tokens.shape == (2, 1 + 28 * 28, 768)  # class token included
        pool = tower.attn_pool_contrast
        heads, dim = 8, 512
        query = pool.to_q(torch.nn.functional.layer_norm(pool.query, (dim,), pool.ln_q.weight, pool.ln_q.bias))
        context = torch.nn.functional.layer_norm(tokens, (768,), pool.ln_k.weight, pool.ln_k.bias)
        key, value = (context @ pool.to_kv.weight.T).split(dim, dim=-1)
        q = query.reshape(1, heads, dim // heads)
        k = key.reshape(2, -1, heads, dim // heads)
        v = value.reshape(2, -1, heads, dim // heads)
        attention = torch.einsum("qhd,bnhd->bhqn", q, k).div(math.sqrt(dim // heads)).softmax(dim=-1)
        mixed = torch.einsum("bhqn,bnhd->bqhd", attention, v).reshape(2, 1, dim)
        latent = (mixed @ pool.to_out.weight.T)[:, 0]
        by_hand = torch.nn.functional.layer_norm(latent, (dim,), tower.ln_contrast.weight, tower.ln_contrast.bias)
    assert pooled.shape == (2, 512)
    torch.testing.assert_close(pooled, by_hand, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_round_trip_and_key_report(tmp_path, suffix, caplog):
    from safetensors.torch import save_file

    source = get_encoder("lunit_vits8", tiny=True, seed=5)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    path = tmp_path / f"lunit{suffix}"

    def write(mapping, target):
        save_file(mapping, str(target)) if suffix == ".safetensors" else torch.save(mapping, target)

    write(state, path)
    loaded = get_encoder("lunit_vits8", weights=path, tiny=True)
    patches = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    torch.testing.assert_close(loaded.encode(patches), source.encode(patches))
    assert loaded.provenance["source"] == "file" and len(loaded.provenance["sha256"]) == 64
    assert loaded.weights == str(path) and loaded.mean == CARDS["lunit_vits8"].mean

    broken = dict(state)
    del broken["blocks.0.attn.qkv.weight"]
    broken["blocks.0.attn.extra.weight"] = torch.zeros(3)
    bad = tmp_path / f"broken{suffix}"
    write(broken, bad)
    with pytest.raises(InputError) as info:
        get_encoder("lunit_vits8", weights=bad, tiny=True)
    message = str(info.value)
    assert "1 missing key(s): blocks.0.attn.qkv.weight" in message
    assert "1 unexpected key(s): blocks.0.attn.extra.weight" in message


def test_conch_checkpoint_keeps_the_vision_tower_and_reports_what_it_ignores(tmp_path, caplog):
    source = get_encoder("conch_v1", tiny=True, seed=6)
    full = {f"visual.{k}": v for k, v in source.model.state_dict().items()}
    full["visual.proj_contrast"] = torch.zeros(512, 512)
    full["visual.attn_pool_caption.query"] = torch.zeros(256, 768)
    full["text.token_embedding.weight"] = torch.zeros(10, 768)
    path = tmp_path / "conch.bin"
    torch.save(full, path)
    with caplog.at_level(logging.INFO, logger="sthisto"):
        loaded = get_encoder("conch_v1", weights=path, tiny=True)
    assert "ignored 1 other key(s)" in caplog.text  # the text tower
    assert "attn_pool_caption.query" in caplog.text and "proj_contrast" in caplog.text
    patches = torch.randint(0, 256, (1, 3, 448, 448), dtype=torch.uint8)
    torch.testing.assert_close(loaded.encode(patches), source.encode(patches))


def _timm_vit_to_transformers(state):
    """The inverse renaming, written out for one ViT block (what a transformers checkpoint holds)."""
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    prefix = "encoder.layer.0."
    for kind in ("weight", "bias"):
        query, key, value = state[f"blocks.0.attn.qkv.{kind}"].chunk(3)
        out[prefix + f"attention.attention.query.{kind}"] = query
        out[prefix + f"attention.attention.key.{kind}"] = key
        out[prefix + f"attention.attention.value.{kind}"] = value
        out[prefix + f"attention.output.dense.{kind}"] = state[f"blocks.0.attn.proj.{kind}"]
        out[prefix + f"layernorm_before.{kind}"] = state[f"blocks.0.norm1.{kind}"]
        out[prefix + f"layernorm_after.{kind}"] = state[f"blocks.0.norm2.{kind}"]
        out[prefix + f"intermediate.dense.{kind}"] = state[f"blocks.0.mlp.fc1.{kind}"]
        out[prefix + f"output.dense.{kind}"] = state[f"blocks.0.mlp.fc2.{kind}"]
    return out


def test_transformers_checkpoint_is_converted_to_timm_names(tmp_path):
    source = get_encoder("phikon", tiny=True, seed=7)
    hf_state = _timm_vit_to_transformers(source.model.state_dict())
    assert len(hf_state) == len(source.model.state_dict()) + 4  # qkv split in three (weight, bias)
    path = tmp_path / "phikon.bin"
    torch.save(hf_state, path)
    loaded = get_encoder("phikon", weights=path, tiny=True)
    patches = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    torch.testing.assert_close(loaded.encode(patches), source.encode(patches))


def test_card_hub_download_offline_fails_fast_with_the_fix(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="offline") as info:
        get_encoder("virchow2", weights="hub", token="hf_dummy", tiny=True, cache_dir=tmp_path)
    assert "paige-ai/Virchow2" in str(info.value) and "weights='/path/to/" in str(info.value)
    with pytest.raises(InputError, match="no hub id"):
        get_encoder("ctranspath", weights="hub")


def test_list_encoders_shows_the_cards():
    table = list_encoders().set_index("name")
    assert {"description", "builtin", "output_dim", "param_count", "license", "gated", "pooling"} <= set(table.columns)
    assert table.loc["virchow2", "output_dim"] == 2560 and table.loc["virchow2", "pooling"] == "cls+mean_patch"
    assert bool(table.loc["uni", "gated"]) and not bool(table.loc["phikon_v2", "gated"])
    assert table.loc["uni", "patch_size_um"] == pytest.approx(34.5)  # kept for backwards compatibility
    assert table.loc["conch_v1", "input_size"] == 448


def test_embed_by_card_name_uses_the_cards_field_of_view_and_records_the_weights(tmp_path):
    adata = sthisto.datasets.synthetic(n_sections=1, n_spots=6, n_genes=3, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sthisto.pp.embed(adata, encoder="lunit_vits8", encoder_kwargs={"tiny": True}, progress=False)
    assert any("RANDOM weights" in str(w.message) for w in caught)
    record = adata.uns["sthisto"]["embed"]["X_lunit_vits8"]
    assert record["patch_size_um"] == pytest.approx(CARDS["lunit_vits8"].fov_um)
    assert record["weights_provenance"]["source"] == "random"
    assert list(record["mean"]) == pytest.approx(CARDS["lunit_vits8"].mean)
    assert adata.obsm["X_lunit_vits8"].shape == (adata.n_obs, 384)
    assert np.isfinite(adata.obsm["X_lunit_vits8"]).all()
    with pytest.raises(InputError, match="no default field of view"):
        sthisto.pp.embed(adata, encoder="conch_v1", encoder_kwargs={"tiny": True}, progress=False)


def test_committed_docs_table_matches_list_encoders():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "docs" / "_scripts" / "encoder_table.py"
    spec = importlib.util.spec_from_file_location("encoder_table", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = module.OUT.read_text(encoding="utf-8")
    assert committed == module.render(), "docs table is stale: run python docs/_scripts/encoder_table.py"
    assert "| `virchow2` | Virchow | 2560 |" in committed


def test_card_lookup_by_name_and_unknown_name_lists_the_cards():
    from sthisto.encoders import EncoderCard

    assert EncoderCard.from_name("virchow2") is CARDS["virchow2"]
    with pytest.raises(InputError, match="virchow2"):
        EncoderCard.from_name("virchow3")
    with pytest.raises(InputError, match="virchow2"):
        get_encoder("virchow3")


def test_card_weights_load_from_the_hub_cache_offline_and_are_fingerprinted(monkeypatch, tmp_path):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    source = get_encoder("lunit_vits8", tiny=True, seed=8)
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "models--1aurent--vit_small_patch8_224.lunit_dino"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(snapshot / "model.safetensors"))
    loaded = get_encoder("lunit_vits8", weights="hub", tiny=True, cache_dir=tmp_path)
    assert loaded.weights_fingerprint == f"hub:1aurent/vit_small_patch8_224.lunit_dino@{commit}"
    assert loaded.provenance["source"] == "hub" and loaded.provenance["revision"] == commit
    assert len(loaded.provenance["sha256"]) == 64
    patches = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    torch.testing.assert_close(loaded.encode(patches), source.encode(patches))


def test_position_embedding_saved_for_another_grid_is_resampled_on_loading(tmp_path, caplog):
    # a CONCH v1.5 tower saved at 224 px (14 × 14 patches) loads into the card's 448 px network
    small, _ = build_network("conch_v1_5", tiny=True, trunk_kwargs={"img_size": 224})
    state = small.state_dict()
    assert state["trunk.pos_embed"].shape == (1, 1 + 14 * 14, 1024)
    path = tmp_path / "conch_v1_5.bin"
    torch.save(state, path)
    with caplog.at_level(logging.INFO, logger="sthisto"):
        loaded = get_encoder("conch_v1_5", weights=path, tiny=True)
    assert "resampled trunk.pos_embed from a 14×14 to a 28×28 patch grid" in caplog.text
    assert loaded.model.trunk.pos_embed.shape == (1, 1 + 28 * 28, 1024)
    torch.testing.assert_close(loaded.model.trunk.cls_token, small.trunk.cls_token)
    features = loaded.encode(torch.randint(0, 256, (1, 3, 448, 448), dtype=torch.uint8))
    assert features.shape == (1, 768)
