"""The encoder registry: handcrafted features, timm models with local checkpoints, hubs, callables."""

from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

import sthisto.encoders._registry as _registry
from sthisto._errors import InputError, MissingKeyError
from sthisto.encoders import (
    HANDCRAFTED_FEATURE_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    get_encoder,
    list_encoders,
    register_encoder,
)

TINY_VIT = {"depth": 2, "img_size": 32}


def _he_patches(colour, n=4, size=48, seed=0):
    """Noisy uniform-colour patches (uint8) with a few dark 'nuclei' blobs."""
    rng = np.random.default_rng(seed)
    base = np.asarray(colour, dtype=float)[:, None, None]
    patches = base + rng.normal(0, 12, (n, 3, size, size))
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for _ in range(5):
            cy, cx = rng.integers(4, size - 4, 2)
            patches[i, :, (yy - cy) ** 2 + (xx - cx) ** 2 < 9] *= 0.6
    return torch.from_numpy(np.clip(patches, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- handcrafted
def test_handcrafted_follows_squidpy_and_skimage_definitions():
    from skimage.feature import graycomatrix, graycoprops

    from sthisto.encoders._handcrafted import TEXTURE_ANGLES, TEXTURE_PROPERTIES, HandcraftedFeatures

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 3, 23, 29)).astype(np.uint8)
    images[1, 2] = 7  # a constant channel: correlation defined as 1, like scikit-image
    ours = HandcraftedFeatures()(torch.from_numpy(images).float()).numpy()
    assert ours.shape == (2, len(HANDCRAFTED_FEATURE_NAMES)) == (2, 93)
    for b in range(2):
        expected = []
        for c in range(3):
            values = images[b, c].ravel()
            expected += [np.quantile(values, q) for q in (0.9, 0.5, 0.1)] + [values.mean(), values.std()]
        for c in range(3):
            counts, _ = np.histogram(images[b, c], bins=10, range=(0, 255))
            expected += list(counts / values.size)
        for c in range(3):
            glcm = graycomatrix(images[b, c], distances=[1], angles=list(TEXTURE_ANGLES), levels=256)
            for prop in TEXTURE_PROPERTIES:
                expected += list(graycoprops(glcm, prop)[0])
        np.testing.assert_allclose(ours[b], np.asarray(expected), rtol=1e-6, atol=1e-9)
    assert HANDCRAFTED_FEATURE_NAMES[0] == "summary_ch-0_quantile-0.9"
    assert HANDCRAFTED_FEATURE_NAMES[15] == "histogram_ch-0_bin-0"
    assert HANDCRAFTED_FEATURE_NAMES[-1] == "texture_ch-2_correlation_dist-1_angle-2.36"


def test_handcrafted_is_deterministic_and_tells_purple_from_pink():
    encoder = get_encoder("handcrafted", input_size=48)
    assert encoder.output_dim == 93 and encoder.input_range == "0-255"
    purple = _he_patches((120, 70, 160), seed=0)
    pink = _he_patches((235, 150, 200), seed=1)
    batch = torch.cat([purple, pink])
    first, second = encoder.encode(batch), encoder.encode(batch)
    assert torch.equal(first, second)
    # one patch at a time gives the same numbers as the batch
    torch.testing.assert_close(encoder.encode(batch[:1]), first[:1])
    standardised = (first - first.mean(0)) / (first.std(0) + 1e-6)
    within = torch.cdist(standardised[:4], standardised[:4]).max()
    between = torch.cdist(standardised[:4], standardised[4:]).min()
    assert between > 2 * within
    red_mean = HANDCRAFTED_FEATURE_NAMES.index("summary_ch-0_mean")
    assert first[:4, red_mean].max() + 50 < first[4:, red_mean].min()


# ----------------------------------------------------------------------------- timm / checkpoints
def _tiny_vit(seed=3, **overrides):
    from sthisto._compat import import_timm

    timm = import_timm()
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, **{**TINY_VIT, **overrides}
    ).eval()


def test_local_checkpoint_gives_the_in_memory_models_features(tmp_path):
    from safetensors.torch import save_file

    model = _tiny_vit()
    state = model.state_dict()
    as_safetensors = tmp_path / "vit.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(as_safetensors))  # DDP prefix
    as_torch = tmp_path / "vit.pth"
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in state.items()}}, as_torch)

    patches = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        expected = model((patches.float() / 255 - 0.5) / 0.5)  # timm's mean/std for this model: 0.5
    for path in (as_safetensors, as_torch):
        encoder = get_encoder("vit_tiny_patch16_224", weights=path, **TINY_VIT)
        assert encoder.weights == str(path) and encoder.output_dim == 192 and encoder.input_size == 32
        torch.testing.assert_close(encoder.encode(patches), expected, rtol=1e-5, atol=1e-5)


def test_mismatched_checkpoint_lists_the_mismatches(tmp_path):
    deeper = tmp_path / "deeper.pth"
    torch.save(_tiny_vit(depth=3).state_dict(), deeper)
    with pytest.raises(InputError, match=r"unexpected key\(s\): blocks\.2\.") as info:
        get_encoder("vit_tiny_patch16_224", weights=deeper, **TINY_VIT)
    assert "do not fit" in str(info.value)
    wider = tmp_path / "wider.pth"
    torch.save(_tiny_vit(embed_dim=96, num_heads=3).state_dict(), wider)
    with pytest.raises(InputError, match="shape mismatch"):
        get_encoder("vit_tiny_patch16_224", weights=wider, **TINY_VIT)
    with pytest.raises(MissingKeyError, match="does not exist"):
        get_encoder("vit_tiny_patch16_224", weights=tmp_path / "absent.pth", **TINY_VIT)
    not_weights = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(InputError, match="state dict"):
        get_encoder("vit_tiny_patch16_224", weights=not_weights, **TINY_VIT)


def test_checkpoint_for_model_with_non_persistent_buffers(tmp_path):
    # Swin keeps relative position indices outside its state dict: weights must still load right
    from sthisto._compat import import_timm

    config = {"depths": (1, 1), "num_heads": (1, 2), "embed_dim": 16, "img_size": 32, "window_size": 4, "patch_size": 4}
    torch.manual_seed(0)
    model = import_timm().create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, **config)
    path = tmp_path / "swin.pth"
    torch.save(model.eval().state_dict(), path)
    encoder = get_encoder("swin_tiny_patch4_window7_224", weights=path, **config)
    patches = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        expected = model(encoder.preprocess(patches))
    torch.testing.assert_close(encoder.encode(patches), expected)


def test_random_weights_are_seeded_and_said_to_be_random(caplog):
    patches = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="sthisto"):
        first = get_encoder("vit_tiny_patch16_224", **TINY_VIT)
    assert "RANDOM weights" in caplog.text
    assert first.weights == "random (seed 0)"
    again = get_encoder("timm:vit_tiny_patch16_224", **TINY_VIT)
    other = get_encoder("vit_tiny_patch16_224", seed=1, **TINY_VIT)
    torch.testing.assert_close(first.encode(patches), again.encode(patches))
    assert not torch.allclose(first.encode(patches), other.encode(patches))
    assert first.weights_fingerprint == again.weights_fingerprint != other.weights_fingerprint


def test_uni_preset_has_unis_preprocessing():
    # depth=1 keeps the test fast; the preset's configuration is what is checked
    encoder = get_encoder("uni", depth=1)
    assert encoder.name == "uni" and encoder.output_dim == 1024 and encoder.input_size == 224
    assert encoder.mean == IMAGENET_MEAN and encoder.std == IMAGENET_STD and encoder.input_range == "0-1"
    assert encoder.patch_size_um == pytest.approx(50 * 0.69)
    assert encoder.model.blocks[0].ls1.gamma.shape == (1024,)  # LayerScale, as in UNI
    patches = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    features = encoder.encode(patches)
    assert features.shape == (2, 1024)


def test_uni_preset_loads_a_local_checkpoint(tmp_path):
    random_uni = get_encoder("uni", depth=1, seed=4)
    path = tmp_path / "uni.bin"
    torch.save(random_uni.model.state_dict(), path)
    loaded = get_encoder("uni", weights=path, depth=1)
    assert loaded.weights == str(path) and loaded.mean == IMAGENET_MEAN
    patches = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    torch.testing.assert_close(loaded.encode(patches), random_uni.encode(patches))


def test_hub_offline_fails_fast_telling_to_use_a_local_path(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for spec, kwargs in (("hf-hub:MahmoodLab/UNI", {}), ("uni", {"weights": "hf-hub:MahmoodLab/UNI"})):
        started = time.perf_counter()
        with pytest.raises(InputError, match="offline") as info:
            get_encoder(spec, token="hf_dummy", cache_dir=tmp_path, **kwargs)
        assert time.perf_counter() - started < 10
        assert "weights='/path/to/" in str(info.value)


def test_hub_model_loads_from_the_local_hub_cache_offline(monkeypatch, tmp_path):
    # the real hub code path (config.json → timm architecture → weights, strict), fed from a
    # cache laid out as huggingface_hub writes it; pytorch_model.bin exercises the fallback
    import json

    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--lab--tiny-vit"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = _tiny_vit(seed=5)
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": 0,
        "model_args": TINY_VIT,
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    }
    (snapshot / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), snapshot / "pytorch_model.bin")

    encoder = get_encoder("hf-hub:lab/tiny-vit", cache_dir=tmp_path)
    assert encoder.weights == "hf-hub:lab/tiny-vit" and encoder.weights_fingerprint.endswith(commit)
    assert encoder.mean == IMAGENET_MEAN and encoder.input_size == 32 and encoder.name == "tiny-vit"
    patches = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        expected = model(encoder.preprocess(patches))
    torch.testing.assert_close(encoder.encode(patches), expected)


# ----------------------------------------------------------------------------- callables / modules
def test_callable_encoder_is_wrapped_with_its_preprocessing():
    calls = []

    def channel_means(images):
        calls.append(images.shape)
        return images.mean(dim=(2, 3))

    encoder = get_encoder(channel_means, input_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert encoder.output_dim == 3 and encoder.name == "channel_means"  # D from a dry run
    patches = torch.full((2, 3, 16, 16), 255, dtype=torch.uint8)
    patches[1] = 0
    features = encoder.encode(patches)
    torch.testing.assert_close(features, torch.tensor([[2.0] * 3, [-2.0] * 3]))
    # other sizes are resized to input_size first
    encoder.encode(torch.zeros(1, 3, 40, 40, dtype=torch.uint8))
    assert calls[-1] == (1, 3, 16, 16)
    with pytest.raises(InputError, match="input_size"):
        get_encoder(channel_means)

    def feature_map(images):
        return images[:, :2]

    with pytest.raises(InputError, match="pool="):
        get_encoder(feature_map, input_size=8)
    pooled = get_encoder(feature_map, input_size=8, pool="avg")
    assert pooled.output_dim == 2


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3))

    def forward(self, x):
        return self.body(x)


def test_module_from_state_dict_and_registration(tmp_path, monkeypatch):
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    torch.manual_seed(0)
    trained = _SmallCNN().eval()
    with torch.no_grad():
        trained.body[1].running_mean.uniform_(-0.1, 0.1)
    path = tmp_path / "cnn.pth"
    torch.save({"model": trained.state_dict()}, path)

    def factory(*, weights=None, token=None, seed=0):
        return Encoder.from_state_dict(
            _SmallCNN(), weights, name="mini", input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, pool="avg"
        )

    register_encoder("mini", factory, description="a test CNN")
    assert "mini" in set(list_encoders()["name"])
    with pytest.raises(InputError, match="already registered"):
        register_encoder("mini", factory)
    encoder = get_encoder("mini", weights=str(path))
    patches = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        expected = trained((patches.float() / 255 - 0.5) / 0.5).mean(dim=(2, 3))
    torch.testing.assert_close(encoder.encode(patches), expected)
    assert encoder.output_dim == 16 and encoder.weights == str(path)

    # the in-memory route fingerprints the parameters: same weights, same fingerprint
    def wrap(module):
        return Encoder.from_module(module, name="mini", input_size=32, pool="avg").weights_fingerprint

    assert wrap(trained).startswith("params:")
    assert wrap(trained) == wrap(copy.deepcopy(trained)) != wrap(_SmallCNN().eval())


def test_histospace_encoder_from_saved_autoencoder(tmp_path):
    histospace = pytest.importorskip("sthisto.models.histospace")
    if not hasattr(histospace, "HistoSPACEFeatureExtractor"):
        pytest.skip("sthisto.models.histospace has no HistoSPACEFeatureExtractor yet")
    torch.manual_seed(0)
    autoencoder = histospace.HistoSPACEAutoencoder().eval()
    path = tmp_path / "histospace.pth"
    torch.save(autoencoder.state_dict(), path)
    encoder = get_encoder("histospace", weights=path)
    assert encoder.input_size == 128 and encoder.output_dim == 128
    patches = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    with torch.inference_mode():
        expected = autoencoder.features(patches, pooling="mean")
    torch.testing.assert_close(encoder.encode(patches), expected, rtol=1e-5, atol=1e-5)
    from_module = get_encoder("histospace", module=autoencoder)
    torch.testing.assert_close(from_module.encode(patches), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="module="):
        get_encoder("histospace")


def test_unknown_names_and_bad_configs_are_refused():
    with pytest.raises(InputError, match=r"unknown encoder 'not_a_model'.*handcrafted"):
        get_encoder("not_a_model")
    with pytest.raises(InputError, match="no weights"):
        get_encoder("handcrafted", weights="x.pth")
    with pytest.raises(InputError, match="std"):
        Encoder(model=lambda x: x, name="bad", output_dim=3, std=(0.0, 1.0, 1.0))
    with pytest.raises(InputError, match="input_range"):
        Encoder(model=lambda x: x, name="bad", output_dim=3, input_range="0-100")
    encoder = get_encoder("handcrafted")
    assert encoder.resolve_precision("auto") == "fp32"  # CPU
    with pytest.raises(InputError, match="precision"):
        encoder.resolve_precision("fp8")


def test_bf16_autocast_path_runs_and_stays_close():
    # the CUDA default; on CPU it can be forced, which exercises the same code path
    torch.manual_seed(0)
    model = _tiny_vit()
    encoder = Encoder.from_module(model, name="vit", input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    patches = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    full = encoder.encode(patches, precision="fp32")
    half = encoder.encode(patches, precision="bf16")
    assert half.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(full, half).min().item()
    assert math.isfinite(cosine) and cosine > 0.98
