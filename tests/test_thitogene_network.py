"""THItoGene network: parameter counts, contract, layers against their equations, memory paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from torch.nn import functional as F

from sthisto._errors import InputError
from sthisto.models.layers.capsules import SelfAttentionRouting, norm_relu_conv, squash
from sthisto.models.layers.graph_attention import GraphAttention
from sthisto.models.layers.odconv import ODConv2d
from sthisto.models.layers.transformer import dropout, keep_mask, quantised_keep
from sthisto.models.thitogene import THItoGeneNet


def make_section(n_spots: int, *, seed: int = 0, side: int = 40, k: int = 4):
    """Random uint8 patches on distinct grid positions with the directed k-NN graph."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)
    positions = grid[rng.choice(len(grid), n_spots, replace=False)]
    _, neighbours = cKDTree(positions).query(positions, k=k + 1)
    src = neighbours[:, 1:].reshape(-1)
    dst = np.repeat(np.arange(n_spots), k)
    patches = torch.from_numpy(rng.integers(0, 256, (n_spots, 3, 112, 112), dtype=np.uint8))
    return {
        "patches": patches,
        "positions": torch.from_numpy(positions).long(),
        "edge_index": torch.from_numpy(np.stack([src, dst])).long(),
    }


def n_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- the network ------------------------------------------------------------------------------
# Paper eq. (16) adds, per head of both graph-attention layers, ω_h (width, 2·width) and β_h:
# 8 · (1024 · 2048 + 1024) + (512 · 1024 + 512) = 17,310,208 parameters.
EQ16_PARAMETERS = 8 * (1024 * 2048 + 1024) + (512 * 1024 + 512)


def test_parameter_counts():
    with torch.device("meta"):
        reference = THItoGeneNet(785, variant="reference")
        reference_cscc = THItoGeneNet(171, depth=8, variant="reference")
        paper = THItoGeneNet(785)
        paper_cscc = THItoGeneNet(171, depth=8)
    # The authors' modules (neighbour aggregate only).
    assert n_parameters(reference) == 63_586_712
    assert n_parameters(reference_cscc) == 109_136_690
    # The paper default: the same plus eq. (16)'s weights and biases.
    assert EQ16_PARAMETERS == 17_310_208
    assert n_parameters(paper) == 80_896_920 == 63_586_712 + EQ16_PARAMETERS
    assert n_parameters(paper_cscc) == 126_446_898 == 109_136_690 + EQ16_PARAMETERS
    assert n_parameters(paper.gat) - n_parameters(reference.gat) == 8 * (1024 * 2048 + 1024)
    assert n_parameters(paper.gat_out) - n_parameters(reference.gat_out) == 512 * 1024 + 512
    assert n_parameters(THItoGeneNet(785, variant="reference", gat_self_term=True)) == 80_896_920


def test_contract_and_output_shape():
    assert THItoGeneNet.input_keys == ("patches", "positions", "edge_index")
    torch.manual_seed(0)
    net = THItoGeneNet.tiny(9).eval()
    batch = make_section(14)
    with torch.no_grad():
        out = net(**batch)
        as_float = net(batch["patches"].float(), batch["positions"], batch["edge_index"])
    assert set(out) == {"prediction"}
    assert out["prediction"].shape == (14, 9) and out["prediction"].dtype == torch.float32
    assert torch.isfinite(out["prediction"]).all()
    torch.testing.assert_close(out["prediction"], as_float["prediction"], rtol=1e-5, atol=1e-6)


def test_positions_beyond_the_table_fail_clearly():
    net = THItoGeneNet.tiny(3, n_positions=16)
    batch = make_section(6, side=16)
    batch["positions"][2, 0] = 16
    with pytest.raises(InputError, match=r"n_positions >= 17"):
        net(**batch)
    batch["positions"][2, 0] = -1
    with pytest.raises(InputError, match="grid positions"):
        net(**batch)


def test_bad_inputs_are_refused():
    net = THItoGeneNet.tiny(3)
    batch = make_section(6)
    with pytest.raises(InputError, match=r"\(N, 3, 112, 112\)"):
        net(batch["patches"][:, :, :100, :100], batch["positions"], batch["edge_index"])
    with pytest.raises(InputError, match="outside"):
        net(batch["patches"], batch["positions"], batch["edge_index"] + 1)
    with pytest.raises(InputError, match="positions must be integer"):
        net(batch["patches"], batch["positions"].float(), batch["edge_index"])
    with pytest.raises(InputError, match="variant"):
        THItoGeneNet(10, variant="authors")


def test_gradient_reaches_every_parameter():
    torch.manual_seed(1)
    net = THItoGeneNet.tiny(5).train()
    batch = make_section(16)
    target = torch.rand(16, 5)
    F.mse_loss(net(**batch)["prediction"], target).backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_tiny_network_learns_a_fixed_section():
    torch.manual_seed(2)
    net = THItoGeneNet.tiny(4).train()
    batch = make_section(20)
    target = torch.rand(20, 4)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        optimiser.zero_grad()
        loss = F.mse_loss(net(**batch)["prediction"], target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_evaluation_is_deterministic_and_training_is_seeded():
    net = THItoGeneNet.tiny(6)
    batch = make_section(12)
    net.eval()
    with torch.no_grad():
        first, second = net(**batch)["prediction"], net(**batch)["prediction"]
    assert torch.equal(first, second)
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(7)
    a = net(**batch)["prediction"]
    net.load_state_dict(state)  # BatchNorm running statistics moved
    torch.manual_seed(7)
    b = net(**batch)["prediction"]
    torch.manual_seed(8)
    c = net(**batch)["prediction"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # dropout is on in training


def test_chunked_encoder_equals_unchunked_in_evaluation():
    torch.manual_seed(3)
    net = THItoGeneNet.tiny(5).eval()
    batch = make_section(23)
    with torch.no_grad():
        whole = net(**batch)["prediction"]
        net.encoder_chunk_size = 5  # 5 balanced chunks
        chunked = net(**batch)["prediction"]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_checkpointed_chunks_in_training_match_plain_chunks():
    """Activation checkpointing changes nothing: same outputs, gradients, running statistics."""
    torch.manual_seed(4)
    net = THItoGeneNet.tiny(3, encoder_chunk_size=7).train()
    patches = make_section(20)["patches"]
    state = {k: v.clone() for k, v in net.state_dict().items()}

    checkpointed = net.encode(patches)
    checkpointed.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.encoder.named_parameters()}
    stats = {n: b.clone() for n, b in net.encoder.named_buffers()}

    net.zero_grad()
    net.load_state_dict(state)
    plain = torch.cat([net.encoder(chunk) for chunk in torch.tensor_split(patches, 3)])
    plain.square().sum().backward()

    torch.testing.assert_close(checkpointed, plain)
    for name, parameter in net.encoder.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, msg=name)
    for name, buffer in net.encoder.named_buffers():
        torch.testing.assert_close(stats[name], buffer, msg=name)  # updated once per chunk
    assert int(stats["capsnet.norms.0.num_batches_tracked"]) == 3


def test_encoder_blocks_change_nothing_in_training():
    """Blocks run layer by layer with BatchNorm over the whole batch: same as one block."""
    torch.manual_seed(13)
    net = THItoGeneNet.tiny(3, encoder_block_size=1000).train().double()  # compare beyond float rounding
    patches = make_section(17)["patches"]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    results = []
    for block_size in (1000, 4):
        net.load_state_dict(state)
        net.zero_grad()
        net.encoder.block_size = block_size
        capsules = net.encode(patches)
        weights = torch.linspace(-1, 1, capsules.numel(), dtype=capsules.dtype).view_as(capsules)
        (capsules * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in net.encoder.named_parameters()}
        results.append((capsules.detach(), grads, {n: b.clone() for n, b in net.encoder.named_buffers()}))
    (whole, whole_grads, whole_stats), (blocked, blocked_grads, blocked_stats) = results
    torch.testing.assert_close(blocked, whole)
    for name in whole_grads:
        torch.testing.assert_close(blocked_grads[name], whole_grads[name], msg=name)
    for name in whole_stats:
        torch.testing.assert_close(blocked_stats[name], whole_stats[name], msg=name)
    # ...and the same as the plain modules on the whole batch.
    net.load_state_dict(state)
    encoder = net.encoder
    x = F.relu(encoder.odconv(patches))
    for conv, norm in zip(encoder.capsnet.convs, encoder.capsnet.norms):
        x = F.relu(norm(conv(x)))
    plain = encoder.capsnet.routing(encoder.capsnet.primary(x))
    torch.testing.assert_close(plain, whole)


def test_recomputed_transformer_and_graph_attention_match_stored():
    net = THItoGeneNet.tiny(3).train()
    batch = make_section(12)
    results = []
    for limit in (None, 5):
        net.checkpoint_above = limit
        net.zero_grad()
        torch.manual_seed(11)
        out = net(**batch)["prediction"]
        out.sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name in results[0][1]:
        if not name.startswith("encoder."):  # BatchNorm batches of the encoder are not recomputed twice
            torch.testing.assert_close(results[0][1][name], results[1][1][name], msg=name)


# --- graph attention ----------------------------------------------------------------------------
def dense_gat(layer: GraphAttention, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """Paper eqs. (13)-(16) with an explicit N × N adjacency (no dropout); eq. (16) if the layer has it."""
    n = x.shape[0]
    adjacency = torch.zeros(n, n, dtype=torch.bool)
    adjacency[edge_index[1], edge_index[0]] = True  # row: target i, column: neighbour j
    heads = []
    for h in range(layer.heads):
        w = layer.lin.weight[h * layer.out_dim : (h + 1) * layer.out_dim]
        wh = x @ w.T
        a = torch.cat([layer.att_dst[h], layer.att_src[h]])
        pair = torch.cat([wh[:, None, :].expand(n, n, -1), wh[None, :, :].expand(n, n, -1)], dim=-1)
        e = F.leaky_relu(pair @ a, layer.negative_slope)
        alpha = torch.softmax(e.masked_fill(~adjacency, -math.inf), dim=1).nan_to_num(0.0)
        aggregate = alpha @ wh
        if layer.self_term:  # eq. (16): ω [W h_i ‖ aggregate_i] + β
            aggregate = torch.cat([wh, aggregate], dim=1) @ layer.self_weight[h].T + layer.self_bias[h]
        heads.append(aggregate)
    return torch.cat(heads, dim=1) if layer.concat else torch.stack(heads).mean(0)


@pytest.mark.parametrize("self_term", [False, True])
def test_graph_attention_equals_the_dense_equations(self_term):
    torch.manual_seed(5)
    n = 9
    src = torch.tensor([1, 2, 3, 0, 4, 5, 6, 7, 8, 2, 1, 0, 5])
    dst = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 6, 7, 8])  # node 8 has one neighbour; all have ≥ 1
    edge_index = torch.stack([src, dst])
    edge_index_no_in = edge_index[:, dst != 4]  # node 4 then has no incoming edge
    first = GraphAttention(6, 5, heads=3, concat=True, negative_slope=0.01, self_term=self_term).double().eval()
    second = GraphAttention(15, 4, heads=1, concat=False, negative_slope=0.01, self_term=self_term).double().eval()
    if self_term:
        with torch.no_grad():
            first.self_bias.normal_()  # zero-initialised; make the bias visible to the comparison
    x = torch.randn(n, 6, dtype=torch.double)
    for edges in (edge_index, edge_index_no_in):
        hidden = F.elu(first(x, edges))
        torch.testing.assert_close(hidden, F.elu(dense_gat(first, x, edges)))
        torch.testing.assert_close(F.elu(second(hidden, edges)), F.elu(dense_gat(second, hidden, edges)))
    isolated = first(x, edge_index_no_in)[4].view(3, 5)  # node 4 without neighbours
    if self_term:  # its own feature still enters: ω_h[:, :width] W_h x_4 + β_h
        own = (first.lin.weight @ x[4]).view(3, 5)
        expected = torch.einsum("hc,hoc->ho", own, first.self_weight[..., :5]) + first.self_bias
        torch.testing.assert_close(isolated, expected)
    else:
        assert torch.all(isolated == 0)  # the neighbour aggregate alone: zero
    _, alpha = first(x, edge_index, return_attention=True)
    sums = torch.zeros(n, 3, dtype=torch.double).index_add(0, dst, alpha)
    torch.testing.assert_close(sums, torch.ones(n, 3, dtype=torch.double))


def test_graph_attention_gradients():
    torch.manual_seed(6)
    edge_index = torch.tensor([[1, 2, 3, 0, 0, 4, 5, 2, 1], [0, 0, 0, 1, 2, 2, 3, 4, 5]])
    for self_term in (False, True):
        layer = GraphAttention(4, 3, heads=2, negative_slope=0.01, self_term=self_term).double().eval()
        x = torch.randn(6, 4, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(lambda v, layer=layer: layer(v, edge_index), (x,))


# --- capsules and dynamic convolution -------------------------------------------------------------
def test_squash():
    s = torch.randn(50, 7, 8) * torch.logspace(-3, 2, 7)[None, :, None]
    v = squash(s)
    norms, s_norms = torch.linalg.vector_norm(v, dim=-1), torch.linalg.vector_norm(s, dim=-1)
    assert torch.all(norms <= 1 + 1e-6) and torch.all(norms[s_norms < 10] < 1)  # 1 - e^-‖s‖ rounds to 1 beyond
    torch.testing.assert_close(norms, 1 - torch.exp(-s_norms))
    torch.testing.assert_close(F.normalize(v, dim=-1), F.normalize(s, dim=-1))  # direction kept
    zero = torch.zeros(2, 8, requires_grad=True)
    out = squash(zero)
    out.sum().backward()
    assert torch.all(out == 0) and torch.isfinite(zero.grad).all()


def test_self_attention_routing():
    torch.manual_seed(7)
    routing = SelfAttentionRouting(16, 8, 20, 64)
    assert routing.weight.shape == (20, 16, 8, 64) and routing.log_prior.shape == (20, 16, 1)
    with torch.no_grad():
        routing.log_prior.normal_()
    u = squash(torch.randn(5, 16, 8))
    v, coupling = routing(u, return_coupling=True)
    assert v.shape == (5, 20, 64) and coupling.shape == (5, 20, 16)
    torch.testing.assert_close(coupling.sum(dim=1), torch.ones(5, 16))  # softmax over output capsules
    assert torch.all(torch.linalg.vector_norm(v, dim=-1) <= 1 + 1e-6)
    # Direct evaluation with the in × in agreement matrix.
    u_hat = torch.einsum("bid,jide->bjie", u, routing.weight)
    agreement = (u_hat @ u_hat.transpose(-1, -2)).sum(-1) / 8.0
    c = torch.softmax(agreement, dim=1) + routing.log_prior[..., 0]
    torch.testing.assert_close(v, squash((c[..., None] * u_hat).sum(2)), rtol=1e-5, atol=1e-6)


def test_odconv_tile_path_equals_grouped_convolution():
    torch.manual_seed(8)
    conv = ODConv2d(3, 16, 4, stride=4).train()
    x = torch.randint(0, 256, (6, 3, 112, 112), dtype=torch.uint8)
    conv.eval()
    fast = conv(x)
    kernels = conv.sample_kernels(x.float().mean(dim=(2, 3)))
    grouped = conv._grouped_conv(x.float(), kernels)
    assert fast.shape == (6, 16, 28, 28)
    torch.testing.assert_close(fast, grouped, rtol=1e-4, atol=1e-3)
    att = conv.attentions(x.float().mean(dim=(2, 3)))
    assert att["spatial"].shape == (6, 4, 4) and att["channel"].shape == (6, 3) and att["filter"].shape == (6, 16)
    torch.testing.assert_close(att["kernel"].sum(1), torch.ones(6))
    # Gradients of the tile path equal those of the grouped convolution.
    conv.train()
    xf = x.double() / 255
    conv = conv.double()
    weights = torch.randn(6, 16, 28, 28, dtype=torch.double)
    (conv(xf) * weights).sum().backward()
    fast_grad = conv.weight.grad.clone()
    conv.zero_grad()
    pooled = xf.mean(dim=(2, 3))
    (conv._grouped_conv(xf, conv.sample_kernels(pooled)) * weights).sum().backward()
    torch.testing.assert_close(fast_grad, conv.weight.grad)


def test_fused_norm_relu_conv_equals_the_modules():
    torch.manual_seed(9)
    for norm_used in (True, False):
        for training in (True, False):
            norm, conv = torch.nn.BatchNorm2d(6).double(), torch.nn.Conv2d(6, 5, 3, stride=2).double()
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
            norm2, conv2 = (torch.nn.BatchNorm2d(6).double(), torch.nn.Conv2d(6, 5, 3, stride=2).double())
            norm2.load_state_dict(norm.state_dict())
            conv2.load_state_dict(conv.state_dict())
            norm.train(training), norm2.train(training)
            x = torch.randn(4, 6, 9, 9, dtype=torch.double).to(memory_format=torch.channels_last)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            y1 = norm_relu_conv(x1, norm if norm_used else None, conv)
            y2 = conv2(F.relu(norm2(x2) if norm_used else x2))
            grad = torch.randn_like(y1)
            y1.backward(grad), y2.backward(grad)
            torch.testing.assert_close(y1, y2)
            torch.testing.assert_close(x1.grad, x2.grad)
            for a, b in zip([*conv.parameters(), *norm.parameters()], [*conv2.parameters(), *norm2.parameters()]):
                if a.grad is not None or b.grad is not None:
                    torch.testing.assert_close(a.grad, b.grad)
            for a, b in zip(norm.buffers(), norm2.buffers()):
                torch.testing.assert_close(a, b)


# --- attention with dropout on the CPU, dropout masks -----------------------------------------------
def test_attention_weights_are_not_dropped_in_training():
    """Dropout acts after the output projection only (papers and authors' code), not on the weights."""
    from sthisto.models.layers.transformer import self_attention

    torch.manual_seed(10)
    attention = self_attention(16, heads=2, dim_head=8, dropout=0.5)
    x = torch.randn(1, 30, 16)
    expected = attention.eval()(x)
    trained = attention.train()(x)
    kept = trained != 0
    assert 0.3 < kept.float().mean() < 0.7
    # Every kept value is the evaluation value rescaled: nothing upstream of the projection changed.
    torch.testing.assert_close(trained[kept], expected[kept] / 0.5)
    with torch.no_grad():
        attention.proj_drop.p = 0.0
        torch.testing.assert_close(attention.train()(x), expected)


def test_keep_mask_and_dropout():
    assert quantised_keep(0.8) == 52429 / 65536
    torch.manual_seed(12)
    mask = keep_mask((400, 1000), 0.8)
    assert mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.8) < 0.005
    torch.manual_seed(12)
    assert torch.equal(mask, keep_mask((400, 1000), 0.8))
    assert keep_mask((3, 3), 1.0).all()
    x = torch.rand(300, 700, requires_grad=True)
    y = dropout(x, 0.2, training=True)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - 0.2) < 0.005
    torch.testing.assert_close(y[~dropped], x[~dropped] / quantised_keep(0.8))
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.01
    y.sum().backward()
    torch.testing.assert_close(x.grad, (~dropped).double().float() / quantised_keep(0.8))
    assert dropout(x, 0.2, training=False) is x
