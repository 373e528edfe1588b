"""THItoGene's building blocks against the maintained libraries they stand on.

Graph attention against torch-geometric's ``GATConv(add_self_loops=False, bias=False)`` with the
same weights; the transformer block against timm's ``Attention`` + ``Mlp`` and against the
block's equations; state dicts of the earlier own layers still load.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from sthisto._compat import import_timm
from sthisto.models.layers.graph_attention import GraphAttention
from sthisto.models.layers.transformer import Transformer, TransformerBlock
from sthisto.models.thitogene import THItoGeneNet

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.nn import GATConv  # noqa: E402
from torch_geometric.utils import dense_to_sparse  # noqa: E402


def directed_knn(n: int, k: int, *, seed: int) -> torch.Tensor:
    """Directed k-NN edge index (row 0 neighbour, row 1 target) of random 2-D points: not symmetric."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(n, 2, generator=generator)
    distance = torch.cdist(points, points).fill_diagonal_(math.inf)
    neighbours = distance.topk(k, largest=False).indices
    return torch.stack([neighbours.reshape(-1), torch.arange(n).repeat_interleave(k)])


def stock_gatconv(layer: GraphAttention) -> GATConv:
    """A plain ``GATConv`` carrying ``layer``'s weights."""
    conv = GATConv(
        layer.in_dim,
        layer.out_dim,
        heads=layer.heads,
        concat=layer.concat,
        negative_slope=layer.negative_slope,
        add_self_loops=False,
        bias=False,
    )
    with torch.no_grad():
        conv.lin.weight.copy_(layer.lin.weight)
        conv.att_src.copy_(layer.conv.att_src)
        conv.att_dst.copy_(layer.conv.att_dst)
    return conv.eval()


@pytest.mark.parametrize(("heads", "concat"), [(3, True), (1, False), (4, False)])
def test_graph_attention_equals_gatconv(heads, concat):
    """Without eq. 16 the layer is GATConv: outputs within 4e-7 in float32, attention alike."""
    torch.manual_seed(0)
    edge_index = directed_knn(40, 4, seed=1)
    layer = GraphAttention(24, 16, heads=heads, concat=concat, negative_slope=0.01).eval()
    conv = stock_gatconv(layer)
    x = torch.randn(40, 24)
    ours, alpha = layer(x, edge_index, return_attention=True)
    theirs, (edges, their_alpha) = conv(x, edge_index, return_attention_weights=True)
    assert ours.shape == theirs.shape == (40, heads * 16 if concat else 16)
    assert (ours - theirs).abs().max().item() <= 4e-7
    assert torch.equal(edges, edge_index)
    assert (alpha - their_alpha).abs().max().item() <= 4e-7


def test_graph_attention_keeps_the_own_feature_beside_gatconv():
    """Eq. 16 on top of GATConv: ω_h [W_h x_i ‖ GATConv_h(x)_i] + β_h per head."""
    torch.manual_seed(1)
    edge_index = directed_knn(30, 4, seed=2)
    layer = GraphAttention(12, 8, heads=2, negative_slope=0.01, self_term=True).eval()
    with torch.no_grad():
        layer.self_bias.normal_()
    conv = stock_gatconv(layer)
    x = torch.randn(30, 12)
    aggregate = conv(x, edge_index).view(30, 2, 8)
    own = (x @ layer.lin.weight.T).view(30, 2, 8)
    expected = torch.einsum("nhc,hoc->nho", torch.cat([own, aggregate], -1), layer.self_weight) + layer.self_bias
    torch.testing.assert_close(layer(x, edge_index), expected.reshape(30, 16), atol=1e-6, rtol=1e-6)


def dense_attention(layer: GraphAttention, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
    """The method's graph attention on a dense adjacency: row i attends over the columns j with A[i, j]."""
    wh = (x @ layer.lin.weight.T).view(x.shape[0], layer.heads, layer.out_dim)
    scores = (wh * layer.att_dst).sum(-1)[:, None, :] + (wh * layer.att_src).sum(-1)[None, :, :]
    scores = F.leaky_relu(scores, layer.negative_slope).masked_fill(~adjacency[..., None], -math.inf)
    alpha = torch.softmax(scores, dim=1).nan_to_num(0.0)  # (i, j, h)
    return torch.einsum("ijh,jhc->ihc", alpha, wh).reshape(x.shape[0], -1)


def test_dense_adjacency_and_a_batch_of_sections():
    """edge_index from the dense adjacency handles a directed graph and a batch of sections.

    The method's adjacency has A[i, j] = 1 when spot i attends to its neighbour j; GATConv's
    edge_index names the source (neighbour) first, so the edge index is dense_to_sparse(Aᵀ).
    Taking dense_to_sparse(A) reverses every edge of the directed k-NN graph and gives another
    result. Two sections batched as one graph (block-diagonal adjacency, offset indices) give
    each section's own result.
    """
    torch.manual_seed(2)
    layer = GraphAttention(10, 6, heads=2, negative_slope=0.01).eval()
    sections = []
    for seed, n in ((3, 25), (4, 18)):
        edge_index = directed_knn(n, 4, seed=seed)
        adjacency = torch.zeros(n, n, dtype=torch.bool)
        adjacency[edge_index[1], edge_index[0]] = True
        assert not torch.equal(adjacency, adjacency.T)  # directed: orientation matters
        sections.append((torch.randn(n, 10), adjacency))

    for x, adjacency in sections:
        edges, _ = dense_to_sparse(adjacency.T.to(torch.float32))
        torch.testing.assert_close(layer(x, edges), dense_attention(layer, x, adjacency), atol=1e-6, rtol=1e-6)
        reversed_edges, _ = dense_to_sparse(adjacency.to(torch.float32))
        assert (layer(x, reversed_edges) - dense_attention(layer, x, adjacency)).abs().max() > 1e-3

    batched_adjacency = torch.block_diag(*(a.T for _, a in sections)).to(torch.float32)
    batched_edges, _ = dense_to_sparse(batched_adjacency)
    batched = layer(torch.cat([x for x, _ in sections]), batched_edges)
    separate = torch.cat([layer(x, dense_to_sparse(a.T.float())[0]) for x, a in sections])
    torch.testing.assert_close(batched, separate, atol=1e-6, rtol=1e-6)


def test_graph_attention_dropout_follows_the_layer_flag():
    """Monte-Carlo dropout switches the layer alone; the attention coefficients are dropped too."""
    torch.manual_seed(3)
    edge_index = directed_knn(50, 4, seed=5)
    layer = GraphAttention(8, 4, heads=2, dropout=0.5).eval()
    x = torch.randn(50, 8)
    layer.conv.eval()
    layer.training = True  # as tl's active_dropout does: the layer's flag only
    _, alpha = layer(x, edge_index, return_attention=True)
    assert 0.3 < (alpha == 0).float().mean().item() < 0.7


def explicit_block(block: TransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's equations with an explicit softmax (evaluation mode)."""
    heads, width = block.attn.num_heads, block.attn.head_dim
    batch, tokens, _ = x.shape
    h = F.layer_norm(x, x.shape[-1:], block.attn_norm.weight, block.attn_norm.bias)
    q, k, v = (h @ block.attn.qkv.weight.T).view(batch, tokens, 3, heads, width).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width), dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, heads * width)
    x = x + attended @ block.attn.proj.weight.T + block.attn.proj.bias
    h = F.layer_norm(x, x.shape[-1:], block.mlp_norm.weight, block.mlp_norm.bias)
    return x + F.linear(
        F.gelu(F.linear(h, block.mlp.fc1.weight, block.mlp.fc1.bias)), block.mlp.fc2.weight, block.mlp.fc2.bias
    )


def test_transformer_block_is_timm_attention_and_mlp():
    """Bit-identical to timm's modules applied by hand; equal to the equations up to float rounding.

    Against timm the operations are the same calls in the same order, so the result is exact.
    The explicit softmax sums in another order than the fused attention kernel: float tolerance.
    """
    timm = import_timm()
    torch.manual_seed(4)
    block = TransformerBlock(40, heads=4, dim_head=16, mlp_dim=72, dropout=0.2).eval()
    attention = timm.layers.Attention(40, num_heads=4, attn_head_dim=16, qkv_bias=False).eval()
    mlp = timm.layers.Mlp(40, hidden_features=72).eval()
    attention.load_state_dict(block.attn.state_dict())
    mlp.load_state_dict(block.mlp.state_dict())
    x = torch.randn(2, 33, 40)
    x_mid = x + attention(block.attn_norm(x))
    by_hand = x_mid + mlp(block.mlp_norm(x_mid))
    assert torch.equal(block(x), by_hand)
    torch.testing.assert_close(block(x), explicit_block(block, x), atol=2e-6, rtol=1e-5)


def test_transformer_padding_mask_hides_padded_tokens():
    torch.manual_seed(5)
    transformer = Transformer(16, 2, heads=2, dim_head=8, mlp_dim=32).eval()
    x = torch.randn(2, 12, 16)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    padded = x.clone()
    padded[1, 7:] = 100.0  # padding must not leak into the real tokens
    out = transformer(padded, mask)
    torch.testing.assert_close(out[1, :7], transformer(x[1:2, :7])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], transformer(x[:1])[0], atol=1e-6, rtol=1e-6)


# Parameter names sthisto used before the library blocks (stored models carry them).
_OLD_NAMES = {
    "attn.qkv.": "attn.to_qkv.",
    "attn.proj.": "attn.to_out.",
    "mlp.fc1.": "mlp.net.0.",
    "mlp.fc2.": "mlp.net.3.",
    "conv.att_dst": "att_dst",
    "conv.att_src": "att_src",
}


def earlier_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``net``'s state dict under the earlier own layers' names and shapes."""
    old = {}
    for key, value in net.state_dict().items():
        for new, before in _OLD_NAMES.items():
            if new in key:
                key = key.replace(new, before)
                if before.startswith("att_"):
                    value = value[0]  # the own layer kept (heads, width)
                break
        old[key] = value.clone()
    return old


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_models_stored_with_the_earlier_layers_still_load(variant):
    torch.manual_seed(6)
    net = THItoGeneNet.tiny(7, variant=variant).eval()
    stored = earlier_state_dict(net)
    assert "transformer.layers.0.attn.to_qkv.weight" in stored and stored["gat.att_src"].dim() == 2
    assert not any("qkv.weight" in k and "to_qkv" not in k for k in stored)
    fresh = THItoGeneNet.tiny(7, variant=variant)
    fresh.load_state_dict(stored)  # strict: every key maps
    fresh.eval()
    generator = torch.Generator().manual_seed(1)
    batch = {
        "patches": torch.randint(0, 256, (20, 3, 112, 112), dtype=torch.uint8, generator=generator),
        "positions": torch.stack([torch.arange(20) % 5, torch.arange(20) // 5], 1),
        "edge_index": directed_knn(20, 4, seed=7),
    }
    with torch.no_grad():
        assert torch.equal(fresh(**batch)["prediction"], net(**batch)["prediction"])
