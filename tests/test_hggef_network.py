"""HGGEF network: layers, hyperedges, parameter count, determinism, chunking, training, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from sthisto._compat import import_torchvision
from sthisto._errors import InputError
from sthisto.models.hggef import (
    TINY_CONFIG,
    GradientEnhancement,
    HGGEFNet,
    augment_patches,
    hggef_loss,
    sample_augmentations,
    self_distillation_loss,
)
from sthisto.models.layers.central_difference import CentralDifferenceConv2d
from sthisto.models.layers.hypergraph import HypergraphAssociation, build_hyperedges, incidence_scores

N_GENES = 12


def _section(n_spots: int = 24, side: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    index = torch.arange(n_spots)
    positions = torch.stack((index % side, index // side), dim=1)
    coarse = torch.rand(n_spots, 3, 7, 7, generator=generator)
    patches = F.interpolate(coarse, size=(112, 112), mode="bilinear", align_corners=False) * 220 + 20
    patches = patches.to(torch.uint8)
    # 8 nearest neighbours pruned to ≤ 2 grid units, directed, no self-loops (HGGEF's graph).
    distance = torch.cdist(positions.float(), positions.float())
    distance.fill_diagonal_(float("inf"))
    nearest = distance.topk(8, largest=False)
    target_spot = index.repeat_interleave(8)
    keep = nearest.values.reshape(-1) <= 2.0
    edge_index = torch.stack((nearest.indices.reshape(-1)[keep], target_spot[keep]))
    # Expression that depends on the image (mean colour), so a network can learn it.
    colour = patches.float().mean(dim=(2, 3)) / 255.0
    rates = torch.exp(colour @ torch.rand(3, N_GENES, generator=generator) * 3)
    counts = torch.poisson(rates, generator=generator)
    library = counts.sum(1, keepdim=True)
    target = torch.log10(1 + counts / library.clamp_min(1) * 1e4)
    return {
        "patches": patches,
        "positions": positions,
        "edge_index": edge_index,
        "target": target,
        "counts": counts,
        "size_factors": library.squeeze(1) / library.median(),
    }


@pytest.fixture(scope="module")
def section():
    return _section()


def _tiny(**overrides) -> HGGEFNet:
    torch.manual_seed(0)
    return HGGEFNet(N_GENES, **{**TINY_CONFIG, **overrides})


# ---------------------------------------------------------------- central-difference convolution
@pytest.mark.parametrize("kernel", ["full", "cross"])
def test_cdc_theta_zero_is_plain_convolution(kernel):
    torch.manual_seed(0)
    layer = CentralDifferenceConv2d(3, 4, stride=2, theta=0.0, kernel=kernel)
    x = torch.rand(2, 3, 17, 17)
    plain = F.conv2d(x, layer.spatial_kernel(), layer.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), plain)
    corners = layer.spatial_kernel()[:, :, [0, 0, 2, 2], [0, 2, 0, 2]]
    assert (corners == 0).all() == (kernel == "cross")


@pytest.mark.parametrize("kernel", ["full", "cross"])
def test_cdc_theta_one_ignores_constant_images(kernel):
    torch.manual_seed(0)
    layer = CentralDifferenceConv2d(3, 4, stride=1, theta=1.0, kernel=kernel, bias=False)
    constant = torch.full((1, 3, 9, 9), 137.0)
    response = layer(constant)
    interior = response[..., 1:-1, 1:-1]  # the zero-padded border is not constant
    assert interior.abs().max() < 1e-3
    assert response.abs().max() > 1.0  # the layer is not trivially zero
    textured = layer(torch.rand(1, 3, 9, 9))[..., 1:-1, 1:-1]
    assert textured.abs().max() > 1e-2


def test_cdc_matches_its_definition_with_theta():
    torch.manual_seed(1)
    layer = CentralDifferenceConv2d(3, 2, stride=2, theta=0.7, kernel="full", bias=False)
    x = torch.rand(1, 3, 8, 8)
    w = layer.spatial_kernel()
    expected = F.conv2d(x, w, stride=2, padding=1) - 0.7 * F.conv2d(x, w.sum((2, 3), keepdim=True), stride=2)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_gem_output_sides():
    x = torch.rand(2, 3, 112, 112) * 255
    assert GradientEnhancement()(x).shape == (2, 3, 56, 56)
    assert GradientEnhancement(kernel="cross", activation="relu6", fuse_padding=1)(x).shape == (2, 3, 58, 58)


# ---------------------------------------------------------------- hyperedges
# Six spots on a line (x = 0…5) with scalar features f. Maximum distances: features 10, positions
# 5, so score(i, j) = |f_i − f_j| / 10 + |x_i − x_j| / 5 (all scores multiples of 0.1).
LINE_FEATURES = torch.tensor([[0.0, 0.0], [8.0, 0.0], [1.0, 0.0], [6.0, 0.0], [9.0, 0.0], [10.0, 0.0]])
LINE_POSITIONS = torch.tensor([[0, 0], [1, 0], [2, 0], [3, 0], [4, 0], [5, 0]])


def _members(hyperedge_index, n):
    nodes, edges = hyperedge_index.tolist()
    groups = {e: [] for e in range(n)}
    for node, edge in zip(nodes, edges):
        groups[edge].append(node)
    return groups


def test_paper_rule_hyperedges_by_hand():
    index, weight = build_hyperedges(LINE_FEATURES, LINE_POSITIONS, k=3, rule="nearest")
    groups = _members(index, 6)
    assert weight is None
    assert all(groups[spot][0] == spot for spot in range(6))  # the defining spot comes first
    expected = {
        0: {0, 2, 1, 3},  # 0.5, 1.0, 1.2 (spot 4: 1.7)
        1: {1, 3, 4, 2},  # 0.6, 0.7, 0.9 — spot 0, adjacent on the grid, is left out (1.0)
        2: {2, 0, 3, 1},  # 0.5, 0.7, 0.9
        3: {3, 4, 1, 2},  # 0.5, 0.6, 0.7
        4: {4, 5, 3, 1},  # 0.3, 0.5, 0.7 — spot 1 (3 units away, similar features) beats spot 2
        5: {5, 4, 3, 1},  # 0.3, 0.8, 1.0
    }
    assert {spot: set(members) for spot, members in groups.items()} == expected
    assert all(len(members) == 4 for members in groups.values())


def test_reference_rule_hyperedges_by_hand():
    # Graph: neighbours within 2 grid units, both directions, plus a duplicate edge (counted once).
    pairs = [(i, j) for i in range(6) for j in range(6) if i != j and abs(i - j) <= 2]
    pairs.append((4, 2))
    edge_index = torch.tensor(pairs).T  # row 0 = neighbour, row 1 = spot
    index, weight = build_hyperedges(LINE_FEATURES, LINE_POSITIONS, k=3, rule="reference", edge_index=edge_index)
    # r(i, j) = A[i, j] / degree(i) + |f_i - f_j| / Σ_l |f_i - f_l|; degrees 2, 3, 4, 4, 3, 2;
    # feature-distance row sums 34, 20, 30, 20, 22, 26. top(i): the 4 largest, decreasing.
    top = {
        0: [1, 2, 5, 4],  # 1/2 + 8/34, 1/2 + 1/34, 10/34, 9/34
        1: [0, 2, 3, 5],  # 1/3 + 8/20, 1/3 + 7/20, 1/3 + 2/20, 2/20
        2: [4, 1, 3, 5],  # 1/4 + 8/30, 1/4 + 7/30, 1/4 + 5/30, 9/30: non-neighbour 5 beats neighbour 0
        3: [2, 5, 4, 1],  # 1/4 + 5/20, 1/4 + 4/20, 1/4 + 3/20, 1/4 + 2/20
        4: [2, 3, 0, 5],  # 1/3 + 8/22, 1/3 + 3/22, 9/22, 1/3 + 1/22
        5: [3, 4, 0, 2],  # 1/2 + 4/26, 1/2 + 1/26, 10/26, 9/26
    }
    assert index.tolist() == [[i for i in range(6) for _ in range(4)], [j for i in range(6) for j in top[i]]]
    # Hyperedge j = {i : j in top(i)}: the spots that chose j; j itself is never among them here.
    assert {e: sorted(m) for e, m in _members(index, 6).items()} == {
        0: [1, 4, 5],
        1: [0, 2, 3],
        2: [0, 1, 3, 4, 5],
        3: [1, 2, 4, 5],
        4: [0, 2, 3, 5],
        5: [0, 1, 2, 3, 4],
    }
    # The chosen scores, spot by spot, handed over as if they were per-hyperedge weights.
    expected_weights = [
        *(1 / 2 + 8 / 34, 1 / 2 + 1 / 34, 10 / 34, 9 / 34),
        *(1 / 3 + 8 / 20, 1 / 3 + 7 / 20, 1 / 3 + 2 / 20, 2 / 20),
        *(1 / 4 + 8 / 30, 1 / 4 + 7 / 30, 1 / 4 + 5 / 30, 9 / 30),
        *(1 / 4 + 5 / 20, 1 / 4 + 4 / 20, 1 / 4 + 3 / 20, 1 / 4 + 2 / 20),
        *(1 / 3 + 8 / 22, 1 / 3 + 3 / 22, 9 / 22, 1 / 3 + 1 / 22),
        *(1 / 2 + 4 / 26, 1 / 2 + 1 / 26, 10 / 26, 9 / 26),
    ]
    np.testing.assert_allclose(weight.numpy(), expected_weights, rtol=1e-5)
    # Row chunks change nothing.
    chunked = build_hyperedges(
        LINE_FEATURES, LINE_POSITIONS, k=3, rule="reference", edge_index=edge_index, max_entries=6
    )
    assert torch.equal(chunked[0], index) and torch.allclose(chunked[1], weight)


def test_reference_hypergraph_weights_reach_the_convolution():
    """Hyperedge j gets the j-th chosen score: the node degrees of HypergraphConv follow it."""
    from torch_geometric.nn import HypergraphConv

    pairs = [(i, j) for i in range(6) for j in range(6) if i != j and abs(i - j) <= 2]
    edge_index = torch.tensor(pairs).T
    torch.manual_seed(0)
    module = HypergraphAssociation(4, 8, rule="reference", dropout=0.0).eval()
    x = torch.randn(6, 4)
    index, weight = build_hyperedges(x, LINE_POSITIONS, k=3, rule="reference", edge_index=edge_index)
    conv1, conv2 = HypergraphConv(4, 8), HypergraphConv(8, 4)
    conv1.load_state_dict(module.conv1.state_dict())
    conv2.load_state_dict(module.conv2.state_dict())
    hidden = module.norm(torch.relu(conv1(x, index, weight[:6])))
    expected = x + conv2(hidden, index, weight[:6])
    with torch.no_grad():
        torch.testing.assert_close(module(x, LINE_POSITIONS, edge_index), expected)
        unweighted = x + conv2(module.norm(torch.relu(conv1(x, index))), index)
    assert not torch.allclose(expected, unweighted)


def test_reference_rule_needs_a_graph():
    with pytest.raises(InputError, match="edge_index"):
        build_hyperedges(LINE_FEATURES, LINE_POSITIONS, rule="reference")


def test_chunked_construction_matches_single_block():
    torch.manual_seed(3)
    features = torch.randn(57, 16)
    positions = torch.randint(0, 20, (57, 2))
    whole, _ = build_hyperedges(features, positions, max_entries=1 << 20)
    chunked, _ = build_hyperedges(features, positions, max_entries=100)  # one row per chunk
    assert torch.equal(whole, chunked)
    # Scores of the chosen pairs agree with a dense, exact evaluation.
    rows, cols = whole[:, whole[0] != whole[1]]

    def exact(a):
        return torch.cdist(a, a, compute_mode="donot_use_mm_for_euclid_dist")

    dense = exact(features) / exact(features).max() + exact(positions.float()) / exact(positions.float()).max()
    scores = incidence_scores(features, positions, rows, cols)
    torch.testing.assert_close(scores, dense[rows, cols], rtol=1e-5, atol=1e-5)


def test_hypergraph_module_is_residual_and_deterministic_in_eval():
    torch.manual_seed(0)
    module = HypergraphAssociation(8, 4).eval()
    x = torch.randn(10, 8)
    positions = torch.randint(0, 5, (10, 2))
    out = module(x, positions)
    assert out.shape == x.shape and torch.equal(out, module(x, positions))


# ---------------------------------------------------------------- whole network
# Parameters of the authors' modules at 785 genes, module by module (measured on their code):
# the total alone hides differences that cancel.
AUTHORS_PARAMETERS = {
    "gem": 168,  # 3×3 conv + bias 84, BN 6; bias-free plus-shaped CDC 45, BN 6; 1×1 fuse 21, BN 6
    "trunk": 341_792,  # shufflenet_v2_x0_5 without its classifier
    "stages": 1_399_081,  # 17,443 + 198,819 + 1,182,819 (CBAM with a biased 7×7 conv)
    "position": 2 * 64 * 1024,
    "transformers": 3 * 4 * 6_298_624,
    "hypergraph": 524_800 + 1024 + 525_312,
    "lstm": 4 * 4 * (2 * 1024 * 1024 + 2 * 1024),
    "head": 2 * 1024 + 1024 * 785 + 785,
    "zinb": 3 * (1024 * 785 + 785),
    "view_weight": 1024 * 1024 + 1024 + 1024 + 1,
}


def _module_counts(net) -> dict[str, int]:
    return {name: sum(p.numel() for p in module.parameters()) for name, module in net.named_children()}


def test_parameter_count_matches_the_authors_modules():
    with torch.device("meta"):
        paper = HGGEFNet(785, backbone_weights=None)
        reference = HGGEFNet(785, variant="reference", backbone_weights=None)
        full_kernel = HGGEFNet(785, cdc_kernel="full", backbone_weights=None)
    assert _module_counts(paper) == AUTHORS_PARAMETERS
    assert _module_counts(reference) == AUTHORS_PARAMETERS
    assert sum(AUTHORS_PARAMETERS.values()) == 116_365_110
    assert sum(p.numel() for p in paper.parameters()) == 116_365_110
    # CDCN's full 3 × 3 kernel learns 3 · 3 · (9 − 5) = 36 more weights.
    assert _module_counts(full_kernel) == {**AUTHORS_PARAMETERS, "gem": 168 + 36}


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_shapes_and_deterministic_evaluation(section, variant):
    net = _tiny(variant=variant).eval()
    args = (section["patches"], section["positions"], section["edge_index"])
    with torch.no_grad():
        first, second = net(*args), net(*args)
    n = section["patches"].shape[0]
    assert set(first) == {"prediction", "mean", "dispersion", "dropout"}
    for key, value in first.items():
        assert value.shape == (n, N_GENES)
        assert torch.equal(value, second[key]), key
    assert (first["mean"] > 0).all() and (first["dispersion"] > 0).all()
    assert ((first["dropout"] > 0) & (first["dropout"] < 1)).all()


def test_distillation_outputs_in_training(section):
    net = _tiny(distillation=True, n_views=2, checkpointing=True, chunk_size=16).train()
    out = net(section["patches"], section["positions"], section["edge_index"])
    n = section["patches"].shape[0]
    assert out["view_predictions"].shape == (2, n, N_GENES)  # the augmented views only
    torch.testing.assert_close(out["view_weights"].sum(0), torch.ones(n))
    losses = hggef_loss(out, section)
    assert losses["distillation"] > 0
    losses["loss"].backward()
    assert net.view_weight[0].weight.grad.abs().sum() > 0  # the weight head learns


def test_self_distillation_is_the_codes_term_by_hand():
    # Two views, two spots, one gene: weighted views' prediction against the main prediction.
    views = torch.tensor([[[1.0], [4.0]], [[3.0], [0.0]]])
    weights = torch.tensor([[0.25, 0.5], [0.75, 0.5]])
    prediction = torch.tensor([[2.0], [1.0]], requires_grad=True)
    loss = self_distillation_loss(views, weights, prediction)
    # weighted: spot 0 → 0.25·1 + 0.75·3 = 2.5, spot 1 → 0.5·4 + 0.5·0 = 2; (0.5² + 1²) / 2
    torch.testing.assert_close(loss, torch.tensor(0.625))
    loss.backward()  # not detached: the main prediction is pulled towards the views too
    torch.testing.assert_close(prediction.grad, torch.tensor([[-0.5], [-1.0]]))
    # The term enters HGGEF's loss with weight 0.5 beside MSE (and ZINB, off here).
    outputs = {"prediction": prediction.detach(), "view_predictions": views, "view_weights": weights}
    target = torch.tensor([[2.0], [3.0]])
    losses = hggef_loss(outputs, {"target": target}, zinb_weight=0.0)
    torch.testing.assert_close(losses["loss"], torch.tensor(2.0 + 0.5 * 0.625))


def test_one_augmentation_draw_per_view_for_the_whole_section():
    generator = torch.Generator().manual_seed(0)
    draws = [sample_augmentations(7, generator=generator) for _ in range(200)]
    for params in draws:
        assert params.shape == (7, 3) and torch.equal(params, params[:1].expand(7, 3))
    angles = torch.stack([params[0, 1] for params in draws])
    assert angles.min() >= -90 and angles.max() <= 90 and angles.std() > 30
    grayscale = torch.stack([params[0, 0] for params in draws]).mean()
    flips = torch.stack([params[0, 2] for params in draws]).mean()
    assert 0.03 < grayscale < 0.2 and 0.1 < flips < 0.3


def test_training_schedule_is_the_papers():
    from sthisto.models.hggef import HGGEF

    model = HGGEF([f"g{i}" for i in range(N_GENES)], network_params=dict(TINY_CONFIG))
    assert model.training_params["lr"] == 1e-5 and model.training_params["max_epochs"] == 400
    optimiser = model.configure_optimizers(model.network)
    assert isinstance(optimiser, torch.optim.Adam)  # no scheduler: the rate stays 1e-5
    assert optimiser.param_groups[0]["lr"] == 1e-5


def test_reference_variant_runs_the_codes_500_epochs():
    import sthisto
    from sthisto.models.hggef import HGGEF

    adata = sthisto.datasets.synthetic(n_sections=1, n_spots=20, n_genes=4, seed=0)
    genes = list(adata.var_names)
    train_index = np.arange(adata.n_obs)
    reference = HGGEF.configure(
        adata, genes=genes, train_index=train_index, params={**TINY_CONFIG, "variant": "reference"}
    )
    paper = HGGEF.configure(adata, genes=genes, train_index=train_index, params=dict(TINY_CONFIG))
    assert reference.training_params["max_epochs"] == 500 and paper.training_params["max_epochs"] == 400
    assert isinstance(reference.configure_optimizers(reference.network), torch.optim.Adam)


def test_chunked_forward_equals_whole_section(section):
    chunked = _tiny(chunk_size=5).eval()
    whole = _tiny(chunk_size=None).eval()
    whole.load_state_dict(chunked.state_dict())
    args = (section["patches"], section["positions"], section["edge_index"])
    with torch.no_grad():
        a, b = chunked(*args), whole(*args)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_checkpointing_keeps_gradients_and_batchnorm_statistics(section):
    kwargs = {"dropout": 0.0, "hypergraph_dropout": 0.0}
    stored = _tiny(checkpointing=False, **kwargs).train()
    recomputed = _tiny(checkpointing=True, chunk_size=None, **kwargs).train()  # image, transformers, LSTM
    recomputed.load_state_dict(stored.state_dict())
    for net in (stored, recomputed):
        out = net(section["patches"], section["positions"], section["edge_index"])
        hggef_loss(out, section)["loss"].backward()
    for (name, p), q in zip(stored.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Recomputation in the backward pass must not update running statistics a second time.
    for name, buffer in stored.state_dict().items():
        if "running" in name or "num_batches" in name:
            torch.testing.assert_close(buffer, recomputed.state_dict()[name], msg=name)


def test_recomputation_plan_follows_the_budget():
    with torch.device("meta"):
        net = HGGEFNet(785, backbone_weights=None).train()
    none = {"image": False, "transformers": False, "lstm": False}
    assert net.recomputation_plan(300) == none  # ≈1.5 GB stored: like the reference
    assert net.recomputation_plan(700) == {**none, "image": True}
    assert net.recomputation_plan(6 * 300) == {"image": True, "transformers": True, "lstm": False}
    assert net.recomputation_plan(6 * 700) == {"image": True, "transformers": True, "lstm": True}
    assert net.eval().recomputation_plan(6 * 700) == none


def test_chunked_checkpointed_training_step(section):
    net = _tiny(checkpointing=True, chunk_size=10).train()
    out = net(section["patches"], section["positions"], section["edge_index"])
    hggef_loss(out, section)["loss"].backward()
    assert int(net.trunk.conv1[1].num_batches_tracked) == 3  # 24 spots in chunks of 8: one update each
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert len(grads) > 0.9 * len(list(net.parameters())) and all(torch.isfinite(g).all() for g in grads)


def test_tiny_network_trains(section):
    net = _tiny().train()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        out = net(section["patches"], section["positions"], section["edge_index"])
        loss = hggef_loss(out, section)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_inputs_are_refused(section):
    net = _tiny().eval()
    with pytest.raises(InputError, match="patch_size"):
        net(section["patches"][:, :, :64, :64], section["positions"])
    with pytest.raises(InputError, match="position table"):
        net(section["patches"], section["positions"] + 100)
    with pytest.raises(InputError, match="positions"):
        net(section["patches"], section["positions"].float())
    with pytest.raises(InputError, match="edge_index"):
        _tiny(variant="reference")(section["patches"], section["positions"])
    with pytest.raises(InputError, match="counts"):
        hggef_loss({"prediction": section["target"]}, {"target": section["target"]})


def test_augmentations():
    x = torch.rand(3, 3, 16, 16)
    identity = torch.zeros(3, 3)
    torch.testing.assert_close(augment_patches(x, identity), x)
    flipped = augment_patches(x, torch.tensor([[0.0, 0.0, 1.0]] * 3))
    torch.testing.assert_close(flipped, x.flip(-1))
    gray = augment_patches(x, torch.tensor([[1.0, 0.0, 0.0]] * 3))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    quarter = augment_patches(x, torch.tensor([[0.0, 90.0, 0.0]] * 3))
    assert torch.equal(quarter, torch.rot90(x, 1, dims=(2, 3)))  # counter-clockwise, as torchvision


# ---------------------------------------------------------------- backbone weights
def _saved_shufflenet(path):
    torchvision = import_torchvision()
    torch.manual_seed(123)
    reference = torchvision.models.shufflenet_v2_x0_5(weights=None)
    torch.save(reference.state_dict(), path)
    return reference


def test_backbone_weights_load_from_a_local_file(tmp_path):
    reference = _saved_shufflenet(tmp_path / "shufflenet.pth")
    net = _tiny(backbone_weights=tmp_path / "shufflenet.pth")
    assert net.trunk.weights_source == str(tmp_path / "shufflenet.pth")
    for name, value in net.trunk.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name


def test_backbone_weights_from_the_torch_cache_or_a_warning(tmp_path, monkeypatch):
    from sthisto.encoders import RandomWeightsWarning

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.warns(RandomWeightsWarning, match="backbone_weights=") as caught:
        random_net = _tiny(backbone_weights="auto")
    assert random_net.trunk.weights_source is None
    assert "never downloads" in str(caught[0].message)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    reference = _saved_shufflenet(cache / "shufflenetv2_x0.5-0123456789.pth")
    cached_net = _tiny(backbone_weights="auto")
    assert cached_net.trunk.weights_source.endswith("shufflenetv2_x0.5-0123456789.pth")
    assert torch.equal(cached_net.trunk.conv1[0].weight, reference.conv1[0].weight)


def test_backbone_weights_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        _tiny(backbone_weights=tmp_path / "missing.pth")
    torch.save({"conv1.0.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pth")
    with pytest.raises(InputError, match="lacks"):
        _tiny(backbone_weights=tmp_path / "wrong.pth")
