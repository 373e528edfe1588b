"""HisToSGE network, paper features and the spot-sequence layer (chunking, padding, inverse)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sthisto._errors import InputError
from sthisto.models.histosge import HisToSGENet, coordinate_frame, paper_features
from sthisto.models.layers.sequences import SpotSequences, chunk_spots


@pytest.fixture(autouse=True)
def single_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    # workers spinning against other processes make each small matmul ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Tiny configuration used for behaviour tests (the full network has 8.4 M parameters).
TINY = dict(in_features=12, n_positions=16, heads=2, dim_head=4, mlp_dim=16, head_hidden=24)


def n_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def hex_grid(n_rows=40, n_cols=40, seed=0):
    """Visium-like hexagonal spot lattice (pixel coordinates, spacing 100) cut to a blob, shuffled."""
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    x = cols * 100.0 + (rows % 2) * 50.0
    y = rows * 100.0 * np.sqrt(3) / 2
    xy = np.stack([x.ravel(), y.ravel()], axis=1)
    centre = xy.mean(0)
    radius = np.linalg.norm((xy - centre) / [1.0, 0.7], axis=1)
    xy = xy[radius < 0.5 * n_cols * 100]
    return xy[np.random.default_rng(seed).permutation(len(xy))]


def max_pairwise_distance(points):
    diff = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((diff**2).sum(-1)).max())


# -- parameter counts ------------------------------------------------------------------------


def test_parameter_counts_at_1000_genes():
    reference = HisToSGENet(1000, variant="reference")
    paper = HisToSGENet(1000, variant="paper")
    assert reference.in_features == 1024 and paper.in_features == 1029
    # The authors' code: ~8.4 M trainable parameters with 1024-d features.
    assert n_params(reference, trainable_only=True) == 8_353_768
    assert n_params(paper, trainable_only=True) == 8_384_518
    assert HisToSGENet(1000).variant == "paper"


def test_bad_arguments_raise():
    with pytest.raises(InputError, match="variant"):
        HisToSGENet(10, variant="code")
    with pytest.raises(InputError, match="n_genes"):
        HisToSGENet(0)


# -- forward contract --------------------------------------------------------------------------


def test_shapes_single_and_batched():
    torch.manual_seed(0)
    net = HisToSGENet(7, **TINY).eval()
    out = net(torch.randn(30, 12), torch.randint(0, 16, (30, 2)))["prediction"]
    assert out.shape == (30, 7) and (out >= 0).all()
    batched = net(torch.randn(3, 20, 12), torch.randint(0, 16, (3, 20, 2)), torch.ones(3, 20, dtype=torch.bool))
    assert batched["prediction"].shape == (3, 20, 7)
    with pytest.raises(InputError, match="features"):
        net(torch.randn(30, 11), torch.randint(0, 16, (30, 2)))
    with pytest.raises(InputError, match="positions"):
        net(torch.randn(30, 12), torch.randint(0, 16, (30, 3)))
    with pytest.raises(InputError, match="mask"):
        net(torch.randn(2, 5, 12), torch.randint(0, 16, (2, 5, 2)), torch.ones(2, 4, dtype=torch.bool))


def test_positions_outside_table_fail_but_padding_positions_are_ignored():
    net = HisToSGENet(3, **TINY).eval()
    features = torch.randn(1, 4, 12)
    positions = torch.tensor([[[1, 2], [3, 4], [5, 6], [99, 99]]])
    with pytest.raises(InputError, match="n_positions"):
        net(features, positions)
    mask = torch.tensor([[True, True, True, False]])
    out = net(features, positions, mask)["prediction"]
    assert torch.isfinite(out).all() and (out[0, 3] == 0).all()


def test_position_embedding_changes_prediction():
    torch.manual_seed(1)
    net = HisToSGENet(5, **TINY).eval()
    features = torch.randn(10, 12)
    a = net(features, torch.zeros(10, 2, dtype=torch.long))["prediction"]
    b = net(features, torch.full((10, 2), 7, dtype=torch.long))["prediction"]
    assert not torch.allclose(a, b)


def test_padding_never_changes_real_predictions():
    torch.manual_seed(2)
    net = HisToSGENet(6, **TINY).eval()
    long_f, long_p = torch.randn(9, 12), torch.randint(0, 16, (9, 2))
    short_f, short_p = torch.randn(5, 12), torch.randint(0, 16, (5, 2))
    alone_long = net(long_f, long_p)["prediction"]
    alone_short = net(short_f, short_p)["prediction"]

    features = torch.zeros(2, 9, 12)
    features[0], features[1, :5] = long_f, short_f
    features[1, 5:] = 1e3 * torch.randn(4, 12)  # garbage at padding must not leak
    positions = torch.zeros(2, 9, 2, dtype=torch.long)
    positions[0], positions[1, :5] = long_p, short_p
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0], mask[1, :5] = True, True
    batched = net(features, positions, mask)["prediction"]
    torch.testing.assert_close(batched[0], alone_long, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1, :5], alone_short, atol=1e-5, rtol=1e-5)
    assert (batched[1, 5:] == 0).all()


def test_fully_padded_sequence_gives_zeros_not_nan():
    net = HisToSGENet(4, **TINY).eval()
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = net(torch.randn(2, 3, 12), torch.zeros(2, 3, 2, dtype=torch.long), mask)["prediction"]
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_eval_is_deterministic_and_seeded_construction_repeats():
    torch.manual_seed(3)
    a = HisToSGENet(5, **TINY, dropout=0.3).eval()
    torch.manual_seed(3)
    b = HisToSGENet(5, **TINY, dropout=0.3).eval()
    features, positions = torch.randn(2, 8, 12), torch.randint(0, 16, (2, 8, 2))
    out = a(features, positions)["prediction"]
    assert torch.equal(out, a(features, positions)["prediction"])
    assert torch.equal(out, b(features, positions)["prediction"])


def test_gradients_reach_every_parameter_and_skip_padding():
    torch.manual_seed(4)
    net = HisToSGENet(5, **TINY)
    features = torch.randn(2, 6, 12, requires_grad=True)
    positions = torch.randint(0, 16, (2, 6, 2))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    net(features, positions, mask)["prediction"].sum().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert (features.grad[1, 4:] == 0).all()
    assert (features.grad[1, :4] != 0).any()


def test_tiny_network_learns_on_padded_sequences():
    torch.manual_seed(5)
    n_spots, n_genes = 130, 4
    features = torch.randn(n_spots, 12)
    positions = torch.randint(0, 16, (n_spots, 2))
    target = torch.relu(features[:, :n_genes] * 0.8 + 0.5)
    seqs = SpotSequences.from_spots(n_spots, chunk_size=50)  # 3 chunks of 43-44 spots
    net = HisToSGENet(n_genes, **TINY)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    mask = seqs.mask_tensor()
    losses = []
    for _ in range(40):
        out = net(seqs.pad(features), seqs.pad(positions), mask)["prediction"]
        loss = torch.nn.functional.mse_loss(seqs.gather(out), target[seqs.spot_indices()])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# -- paper features ----------------------------------------------------------------------------


def test_paper_features_scale_coordinates_per_section():
    rng = np.random.default_rng(0)
    coords = np.concatenate([rng.uniform(1000, 9000, (20, 2)), rng.uniform(200, 500, (10, 2))])
    groups = np.array(["A"] * 20 + ["B"] * 10)
    embeddings = rng.normal(size=(30, 1024))
    rgb = rng.uniform(0, 255, (30, 3))
    out = paper_features(embeddings, coords, rgb, groups=groups)
    assert out.shape == (30, 1029) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, :1024], embeddings.astype(np.float32))
    scaled = out[:, 1024:1026]
    for label in ("A", "B"):
        part = scaled[groups == label]
        assert part.min() >= 0 and part.max() <= 1 + 1e-6
        assert np.isclose(part.max(), 1.0)  # the longer side spans [0, 1]
    np.testing.assert_allclose(out[:, 1026:], rgb / 255.0, rtol=1e-6)
    # Aspect ratio is kept: one scale for x and y.
    x0, y0, extent = coordinate_frame(coords[:20])[""]
    np.testing.assert_allclose(scaled[:20], (coords[:20] - [x0, y0]) / extent, rtol=1e-5)
    # New spots reuse the training frame.
    frame = coordinate_frame(coords, groups)
    new = paper_features(embeddings[:2], coords[:2] + 10, rgb[:2], groups=groups[:2], frame=frame)
    np.testing.assert_allclose(new[:, 1024:1026], (coords[:2] + 10 - frame["A"][:2]) / frame["A"][2], rtol=1e-5)
    with pytest.raises(InputError, match="missing from frame"):
        paper_features(embeddings[:2], coords[:2], rgb[:2], groups=["C", "C"], frame=frame)
    with pytest.raises(InputError, match="rgb_mean"):
        paper_features(embeddings, coords, rgb[:, :2])


# -- sequences -------------------------------------------------------------------------------


def test_order_chunks_split_unequal_sections():
    groups = np.array(["s1"] * 120 + ["s2"] * 37 + ["s1"] * 3)
    chunks = chunk_spots(160, groups=groups, chunk_size=50)
    lengths = [len(c) for c in chunks]
    assert lengths == [41, 41, 41, 37]  # s1: 123 spots → 3 chunks; s2: 37 → 1
    flat = np.concatenate(chunks)
    assert np.array_equal(np.sort(flat), np.arange(160))
    for chunk in chunks:
        assert len(set(groups[chunk])) == 1
    # Order mode keeps storage order within a section.
    assert np.array_equal(chunks[0], np.arange(41))


def test_spatial_chunks_are_contiguous():
    xy = hex_grid()
    extent = float(np.ptp(xy, axis=0).max())
    spatial = chunk_spots(len(xy), coords=xy, chunk_size=50, mode="spatial")
    ordered = chunk_spots(len(xy), chunk_size=50, mode="order")
    assert len(spatial) == len(ordered) == int(np.ceil(len(xy) / 50))
    assert max(len(c) for c in spatial) <= 50 and min(len(c) for c in spatial) >= 40
    assert np.array_equal(np.sort(np.concatenate(spatial)), np.arange(len(xy)))
    spatial_diameters = np.array([max_pairwise_distance(xy[c]) for c in spatial])
    order_diameters = np.array([max_pairwise_distance(xy[c]) for c in ordered])
    # 50 hexagonal spots fill a patch ~8 spacings across; the section is ~40 spacings.
    assert spatial_diameters.max() < 0.35 * extent
    assert np.median(spatial_diameters) < 0.25 * extent
    assert np.median(order_diameters) > 0.8 * extent  # shuffled storage order: chunks span the section


def test_sequences_pad_and_inverse_are_exact():
    rng = np.random.default_rng(1)
    xy = hex_grid(12, 12, seed=1)
    n = len(xy)
    seqs = SpotSequences.from_spots(n, coords=xy, chunk_size=17, mode="spatial")
    assert seqs.mask.sum() == n and seqs.covers_all
    values = rng.normal(size=(n, 3))
    padded = seqs.pad(values, fill=np.nan)
    assert padded.shape == (len(seqs), seqs.index.shape[1], 3)
    assert np.isnan(padded[~seqs.mask]).all()
    assert np.array_equal(seqs.unpad(padded), values)
    tensor = torch.from_numpy(values).requires_grad_(True)
    padded_t = seqs.pad(tensor)
    assert (padded_t[torch.from_numpy(~seqs.mask)] == 0).all()
    back = seqs.unpad(padded_t)
    assert torch.equal(back, tensor)
    back.sum().backward()
    assert torch.equal(tensor.grad, torch.ones_like(tensor))
    # A subset of sequences: trimmed width, gather ↔ spot_indices.
    rows = np.array([2, 0])
    sub = seqs.pad(values, rows=rows)
    assert sub.shape[1] == seqs.lengths[rows].max()
    assert np.array_equal(seqs.gather(sub, rows=rows), values[seqs.spot_indices(rows=rows)])
    batches = list(seqs.row_batches(3, shuffle=True, seed=0))
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(len(seqs)))


def test_sequences_reject_bad_input():
    with pytest.raises(InputError, match="more than one sequence"):
        SpotSequences([np.array([0, 1]), np.array([1, 2])])
    partial = SpotSequences([np.array([0, 2])], n_spots=4)
    with pytest.raises(InputError, match="gather"):
        partial.unpad(np.zeros((1, 2)))
    with pytest.raises(InputError, match="coords"):
        chunk_spots(10, mode="spatial")
    with pytest.raises(InputError, match="mode"):
        chunk_spots(10, mode="random")
    with pytest.raises(InputError, match="chunk_size"):
        chunk_spots(10, chunk_size=0)
    with pytest.raises(InputError, match="rows"):
        SpotSequences.from_spots(10).pad(np.zeros((9, 2)))


@pytest.mark.real_data
def test_spatial_chunks_on_a_her2st_section(her2st_dir):
    import pandas as pd

    spots = pd.read_csv(her2st_dir / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    xy = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    spatial = chunk_spots(len(xy), coords=xy, chunk_size=50, mode="spatial")
    ordered = chunk_spots(len(xy), chunk_size=50, mode="order")
    spatial_diameters = [max_pairwise_distance(xy[c]) for c in spatial]
    order_diameters = [max_pairwise_distance(xy[c]) for c in ordered]
    # Storage order is row by row: order chunks are strips across the section.
    assert np.median(spatial_diameters) < 0.8 * np.median(order_diameters)
    seqs = SpotSequences(spatial, len(xy))
    assert np.array_equal(seqs.unpad(seqs.pad(xy)), xy)
