"""HistoSPACE autoencoder, regressor and the tissue-tile sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sthisto._errors import InputError
from sthisto._images import ImageSource
from sthisto.models.histospace import (
    HistoSPACEAutoencoder,
    HistoSPACEEncoder,
    HistoSPACEFeatureExtractor,
    HistoSPACERegressor,
    TissueTileSampler,
    histospace_loss,
    reconstruction_loss,
    reconstruction_target,
    scale_patches,
    tissue_mask,
)


@pytest.fixture(autouse=True)
def single_thread():
    # Small convolutions gain little from threads; on a busy 2-core machine spinning OpenMP
    # workers slow them down by orders of magnitude.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def synthetic_tiles(n, seed=0):
    """H&E-like uint8 tiles: pink background with purple blobs of varying density."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:128, :128]
    tiles = np.empty((n, 3, 128, 128), dtype=np.uint8)
    density = rng.uniform(0.1, 0.9, n)
    for i in range(n):
        img = np.empty((128, 128, 3), dtype=np.float32)
        img[:] = (230, 170, 200)
        for _ in range(int(40 * density[i])):
            cy, cx, r = rng.uniform(0, 128), rng.uniform(0, 128), rng.uniform(3, 8)
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            img[inside] = (110, 60, 150)
        img += rng.normal(0, 6, img.shape)
        tiles[i] = np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(tiles), torch.from_numpy(density.astype(np.float32))


# -- parameter counts ------------------------------------------------------------------------


def test_parameter_counts():
    autoencoder = HistoSPACEAutoencoder()
    assert n_params(autoencoder) == 259_363
    assert n_params(autoencoder.encoder) == 93_696
    finetuned = HistoSPACERegressor(250)
    frozen = HistoSPACERegressor(250, freeze_encoder=True)
    # The frozen encoder stays part of the module: same total, fewer trainable.
    assert n_params(finetuned) == n_params(frozen) == 2_403_194
    assert n_params(finetuned, trainable_only=True) == 2_403_194
    assert n_params(frozen, trainable_only=True) == 2_403_194 - 93_696
    assert set(frozen.state_dict()) == set(finetuned.state_dict())


# -- contract ----------------------------------------------------------------------------------


def test_scaling_and_reconstruction_target():
    patches = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    torch.testing.assert_close(scale_patches(patches).view(-1), torch.tensor([-1.0, 1.0, -0.6]))
    torch.testing.assert_close(reconstruction_target(patches).view(-1), torch.tensor([0.0, 1.0, 0.2]))
    # Float input is taken as already in [-1, 1]; the target is the same affine map to [0, 1].
    torch.testing.assert_close(reconstruction_target(scale_patches(patches)), reconstruction_target(patches))
    with pytest.raises(InputError, match="dtype"):
        scale_patches(torch.zeros(1, 3, 4, 4, dtype=torch.int32))


def test_shapes_and_feature_extractor():
    tiles, _ = synthetic_tiles(3)
    autoencoder = HistoSPACEAutoencoder().eval()
    out = autoencoder(tiles)
    assert out["reconstruction"].shape == (3, 3, 128, 128)
    assert out["prediction"] is out["reconstruction"]
    assert (out["reconstruction"] > 0).all() and (out["reconstruction"] < 1).all()
    assert autoencoder.encoder(tiles).shape == (3, 128, 16, 16)
    assert autoencoder.features(tiles).shape == (3, 128 * 16 * 16)
    assert autoencoder.features(tiles, pooling="mean").shape == (3, 128)
    for pooling, width in (("mean", 128), ("flatten", 32768)):
        extractor = HistoSPACEFeatureExtractor(autoencoder, pooling=pooling).eval()
        assert extractor.out_features == width
        features = extractor(tiles)
        assert features.shape == (3, width)
        torch.testing.assert_close(features, autoencoder.features(tiles, pooling=pooling))
    regressor = HistoSPACERegressor(11).eval()
    assert regressor(tiles)["prediction"].shape == (3, 11)
    with pytest.raises(InputError, match="128"):
        regressor(torch.zeros(2, 3, 112, 112, dtype=torch.uint8))
    with pytest.raises(InputError, match="RGB"):
        regressor(torch.zeros(2, 1, 128, 128, dtype=torch.uint8))
    with pytest.raises(InputError, match="pooling"):
        HistoSPACEFeatureExtractor(autoencoder, pooling="max")


def test_eval_is_deterministic():
    tiles, _ = synthetic_tiles(2, seed=1)
    torch.manual_seed(0)
    regressor = HistoSPACERegressor(5).eval()
    a = regressor(tiles)["prediction"]
    assert torch.equal(a, regressor(tiles)["prediction"])


def test_regressor_copies_pretrained_encoder():
    torch.manual_seed(0)
    autoencoder = HistoSPACEAutoencoder()
    regressor = HistoSPACERegressor(4, encoder=autoencoder)
    for (name, mine), theirs in zip(regressor.encoder.state_dict().items(), autoencoder.encoder.state_dict().values()):
        assert torch.equal(mine, theirs), name
    with torch.no_grad():
        regressor.encoder.blocks[0][0].weight.add_(1.0)
    assert not torch.equal(regressor.encoder.blocks[0][0].weight, autoencoder.encoder.blocks[0][0].weight)
    encoder = HistoSPACEEncoder()
    assert HistoSPACERegressor(4, encoder=encoder).encoder is not encoder
    with pytest.raises(InputError, match="encoder"):
        HistoSPACERegressor(4, encoder=torch.nn.Linear(2, 2))


def test_huber_loss_is_delta_one():
    prediction, target = torch.randn(6, 4) * 3, torch.randn(6, 4)
    torch.testing.assert_close(histospace_loss(prediction, target), torch.nn.HuberLoss(delta=1.0)(prediction, target))


# -- training ----------------------------------------------------------------------------------


def test_frozen_encoder_stays_fixed_while_finetuned_one_moves():
    tiles, density = synthetic_tiles(4, seed=2)
    target = torch.stack([density, 1 - density], dim=1)
    for freeze in (True, False):
        torch.manual_seed(0)
        regressor = HistoSPACERegressor(2, freeze_encoder=freeze).train()
        assert regressor.encoder.training is not freeze
        before = {k: v.clone() for k, v in regressor.encoder.state_dict().items()}
        head_before = regressor.out.weight.clone()
        optimiser = torch.optim.Adam([p for p in regressor.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(2):
            loss = histospace_loss(regressor(tiles)["prediction"], target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        after = regressor.encoder.state_dict()
        unchanged = all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
        assert unchanged is freeze
        assert not torch.equal(head_before, regressor.out.weight)


def test_regressor_loss_decreases():
    tiles, density = synthetic_tiles(6, seed=3)
    target = torch.stack([density * 2, 1 - density, density**2], dim=1)
    torch.manual_seed(0)
    regressor = HistoSPACERegressor(3).train()
    # The 8192 → 256 → G linear stack has no activation: on a 6-tile batch Adam needs a small
    # step (1e-3 overshoots and the loss jumps by 10x).
    optimiser = torch.optim.Adam(regressor.parameters(), lr=1e-5)
    losses = []
    for _ in range(8):
        loss = histospace_loss(regressor(tiles)["prediction"], target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for name, param in regressor.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_autoencoder_reconstruction_improves():
    tiles, _ = synthetic_tiles(4, seed=4)
    torch.manual_seed(0)
    autoencoder = HistoSPACEAutoencoder().train()
    optimiser = torch.optim.Adam(autoencoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = reconstruction_loss(autoencoder(tiles), tiles)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# -- tissue tiles ----------------------------------------------------------------------------


class RecordingArray:
    """Array-like image that records the full-resolution regions read from it."""

    def __init__(self, array):
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.full_resolution_reads = []

    def __getitem__(self, key):
        rows, cols = key[0], key[1]
        if (rows.step or 1) == 1 and (cols.step or 1) == 1:
            self.full_resolution_reads.append((rows.stop - rows.start, cols.stop - cols.start))
        return self.array[key]


def slide_with_tissue(height=700, width=900, seed=0):
    """White slide with one elliptical tissue region (H&E colours with texture)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    inside = ((yy - 330) / 230.0) ** 2 + ((xx - 420) / 300.0) ** 2 < 1
    image = np.full((height, width, 3), 250, dtype=np.float32) + rng.normal(0, 2, (height, width, 3))
    tissue = np.array([205, 130, 180], dtype=np.float32) + rng.normal(0, 15, (height, width, 3))
    image[inside] = tissue[inside]
    return np.clip(image, 0, 255).astype(np.uint8), inside


def brute_force_tiles(mask, tile, threshold):
    keep = set()
    for r in range(0, mask.shape[0] - tile + 1, tile):
        for c in range(0, mask.shape[1] - tile + 1, tile):
            if mask[r : r + tile, c : c + tile].mean() >= threshold:
                keep.add((r, c))
    return keep


def test_tissue_mask_separates_glass_from_stain():
    rgb = np.array([[[250, 250, 250], [240, 235, 238], [200, 120, 170], [60, 30, 90]]], dtype=np.uint8)
    assert tissue_mask(rgb).tolist() == [[False, False, True, True]]


def test_tile_sampler_returns_only_tissue_tiles():
    image, inside = slide_with_tissue()
    expected = brute_force_tiles(tissue_mask(image), 128, 0.5)
    assert 4 <= len(expected) < 30  # the slide has both tissue and background tiles

    # Thumbnail at full resolution: the candidate set is exact.
    exact = TissueTileSampler(image, thumbnail_side=2000)
    assert {tuple(o) for o in exact.origins} == expected

    # Coarse thumbnail and a recording source: only tile-sized full-resolution reads.
    recording = RecordingArray(image)
    sampler = TissueTileSampler(ImageSource(recording), thumbnail_side=150, min_tissue_fraction=0.5)
    found = {tuple(o) for o in sampler.origins}
    assert len(found & expected) >= 0.8 * len(expected)
    assert recording.full_resolution_reads == []  # locating tiles read the thumbnail only
    batches = list(sampler.batches(4, seed=0))
    assert all(b.dtype == torch.uint8 and b.shape[1:] == (3, 128, 128) and 0 < len(b) <= 4 for b in batches)
    assert set(recording.full_resolution_reads) == {(128, 128)}
    tiles = torch.cat(batches)
    fractions = tissue_mask(tiles.permute(0, 2, 3, 1).numpy()).mean(axis=(1, 2))
    assert (fractions >= 0.5).all()
    assert len(tiles) >= 0.8 * len(expected)
    # No background tile: each returned tile is a grid tile lying mostly on the tissue region.
    grid = {
        (r, c): torch.from_numpy(image[r : r + 128, c : c + 128]).permute(2, 0, 1)
        for r in range(0, image.shape[0] - 127, 128)
        for c in range(0, image.shape[1] - 127, 128)
    }
    for tile in tiles:
        ((r, c),) = [origin for origin, crop in grid.items() if torch.equal(crop, tile)]
        assert inside[r : r + 128, c : c + 128].mean() > 0.4
    # Shuffling is seeded; max_tiles bounds the reads.
    again = torch.cat(list(sampler.batches(4, seed=0)))
    assert torch.equal(again, tiles)
    assert sum(len(b) for b in sampler.batches(4, seed=1, max_tiles=3)) <= 3


def test_tile_sampler_on_blank_slide_and_bad_input():
    blank = np.full((300, 300, 3), 248, dtype=np.uint8)
    sampler = TissueTileSampler(blank)
    assert len(sampler) == 0 and list(sampler.batches(8)) == []
    with pytest.raises(InputError, match="smaller"):
        TissueTileSampler(np.zeros((100, 300, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="min_tissue_fraction"):
        TissueTileSampler(blank, min_tissue_fraction=0)


@pytest.mark.real_data
def test_tile_sampler_on_a_her2st_slide(her2st_dir):
    from sthisto._images import open_image_file

    path = next((her2st_dir / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    sampler = TissueTileSampler(open_image_file(path))
    height, width = sampler.source.shape
    grid_tiles = (height // 128) * (width // 128)
    assert 0.02 * grid_tiles < len(sampler) < 0.9 * grid_tiles  # tissue, not the whole glass
    tiles = torch.cat(list(sampler.batches(32, seed=0, max_tiles=64)))
    assert len(tiles) >= 48
    fractions = tissue_mask(tiles.permute(0, 2, 3, 1).numpy()).mean(axis=(1, 2))
    assert (fractions >= 0.5).all()


def test_reference_variant_uses_the_codes_target():
    """The authors' code: counts / total over all genes × 1e4, then log10(1 + x)."""
    import sthisto
    from sthisto.models.histospace import HistoSPACE
    from sthisto.pp._normalize import normalize_counts

    adata = sthisto.datasets.synthetic(n_sections=1, n_spots=12, n_genes=5, seed=0)
    index = np.arange(adata.n_obs)
    genes = list(adata.var_names[:3])
    tiny = {"hidden": 16, "patch_size": 32}
    reference = HistoSPACE.configure(adata, genes=genes, train_index=index, params={**tiny, "variant": "reference"})
    paper = HistoSPACE.configure(adata, genes=genes, train_index=index, params=dict(tiny))
    assert reference.data_params["target"] == "log10_1e4_total"
    assert paper.data_params["target"] == "log1p_1e4_total"
    counts = np.array([[1.0, 3.0, 0.0, 6.0], [0.0, 0.0, 0.0, 0.0]])
    selected, totals = counts[:, :2], counts.sum(axis=1)
    target = normalize_counts(selected, "log10_1e4_total", library_size=totals)
    expected = np.array([[np.log10(1 + 1e4 / 10), np.log10(1 + 3e4 / 10)], [0.0, 0.0]])
    np.testing.assert_allclose(target, expected, rtol=1e-6)
    # pp.normalize writes the same values for the selected genes.
    frame = sthisto.datasets.synthetic(n_sections=1, n_spots=12, n_genes=5, seed=0)
    sthisto.pp.normalize(frame, variant="log10_1e4_total", genes=genes)
    raw = np.asarray(frame.X.toarray() if hasattr(frame.X, "toarray") else frame.X, dtype=np.float64)
    written = frame.layers["sthisto_target"]
    written = written.toarray() if hasattr(written, "toarray") else written
    manual = np.log10(1 + raw / raw.sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(written, manual, rtol=1e-5, atol=1e-6)
