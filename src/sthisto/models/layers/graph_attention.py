"""Multi-head graph attention (Veličković et al., ICLR 2018) on torch-geometric's ``GATConv``.

For a directed graph with edges ``j → i`` (``edge_index[0] = j`` the neighbour / source,
``edge_index[1] = i`` the target) and head ``h``:

* ``e[i, j] = LeakyReLU(a_hᵀ [W_h x_i ‖ W_h x_j])`` — the first half of ``a_h`` (``att_dst``)
  scores the target, the second (``att_src``) the neighbour;
* ``α[i, j] = softmax_j e[i, j]`` over the incoming edges of ``i`` only;
* ``m[i, h] = Σ_j α[i, j] W_h x_j``, the neighbour aggregate;
* ``out[i, h] = m[i, h]`` (Veličković et al.; the THItoGene authors' code), or, with
  ``self_term=True`` (THItoGene's eq. 16), ``out[i, h] = ω_h [W_h x_i ‖ m[i, h]] + β_h``: the
  spot's own projected feature concatenated with the aggregate, through a weight and a bias;
* heads concatenated (or averaged, ``concat=False``).

The scores, the softmax, the attention dropout and the aggregation are
:class:`torch_geometric.nn.GATConv` with ``add_self_loops=False, bias=False``: a node attends
to its graph neighbours only, and a node without incoming edges gets a zero aggregate (with the
self term its output still carries its own feature). The projection ``W`` stays outside the
convolution (``lin``, GATConv's own projection is an identity) because eq. 16 needs ``W_h x_i``
too, which GATConv does not return; computing it a second time would add the layer's largest
matrix product. Dropout acts on the input features (here) and on the attention coefficients
(in GATConv).

Cost is linear in the number of edges; nothing ``N × N`` is formed. GATConv gathers one
``edges × heads × width`` message tensor per layer (for THItoGene's 4-NN graph, four copies of
the 8192-wide features). sthisto's earlier sparse-CSR kernel avoided that copy;
``benchmarks/thitogene_step.py --own-kernels-src`` measured it on the real step (785 genes, 180
spots, 2 threads): the library step took 7.17 CPU s against 8.10 with the own kernels, and
2.08 GB peak RSS against 1.91 GB (own 1.09× leaner); at 1200 spots 37.0 against 33.4 CPU s
and 2.86 against 2.38 GB (own 1.20× leaner). Neither reached 1.3×, so the maintained library
serves (benchmarks/README.md has the table; the memory gap grows with the section).

A batch of sections is one graph: concatenate the nodes and offset each section's
``edge_index`` by the nodes before it (block-diagonal adjacency); the softmax runs per target
node, so sections do not mix. From a dense adjacency ``A[i, j] = 1`` meaning "``i`` attends to
``j``", the edge index is ``A.nonzero().T.flip(0)`` (``torch_geometric.utils.dense_to_sparse``
of ``A.T``), not ``dense_to_sparse(A)``, which reverses every edge of a directed graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class _Projected(nn.Identity):
    """Stands in for GATConv's projection: its input is already ``W x``."""

    def reset_parameters(self) -> None:
        """Nothing to reset (GATConv calls this on its projection)."""


def _gat_conv(out_dim: int, heads: int, negative_slope: float, dropout: float) -> nn.Module:
    from torch_geometric.nn import GATConv

    conv = GATConv(
        heads * out_dim,
        out_dim,
        heads=heads,
        concat=True,
        negative_slope=negative_slope,
        dropout=dropout,
        add_self_loops=False,
        bias=False,
    )
    conv.lin = _Projected()
    return conv


class GraphAttention(nn.Module):
    """One multi-head graph attention layer (Veličković et al.), optionally with THItoGene's eq. 16.

    Parameters
    ----------
    in_dim
        Input feature width.
    out_dim
        Width per head.
    heads
        Number of heads.
    concat
        Concatenate the heads (``(N, heads · out_dim)``) or average them (``(N, out_dim)``).
    negative_slope
        LeakyReLU slope in the attention scores.
    dropout
        Dropout on the input features and on the attention coefficients.
    self_term
        Combine each node's own projected feature with its neighbour aggregate (THItoGene's
        eq. 16, see the module docstring) instead of returning the aggregate alone.

    Notes
    -----
    Parameters: ``lin.weight`` ``(heads · out_dim, in_dim)`` (the per-head ``W_h``, no bias),
    ``conv.att_dst`` and ``conv.att_src`` ``(1, heads, out_dim)`` (GATConv's two halves of each
    ``a_h``); with ``self_term``, ``self_weight`` ``(heads, out_dim, 2 · out_dim)`` (each
    ``ω_h``; its first ``out_dim`` columns act on the own feature) and ``self_bias``
    ``(heads, out_dim)``. State dicts of the earlier own layer (``att_dst`` / ``att_src`` of
    shape ``(heads, out_dim)``) load unchanged. Glorot initialisation, zero bias. The layer
    applies no non-linearity; the caller applies its activation. Its training flag governs
    both dropouts (the GATConv inside follows it), so switching this module alone to training
    mode (Monte-Carlo dropout) drops attention coefficients too.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        heads: int = 1,
        concat: bool = True,
        negative_slope: float = 0.2,
        dropout: float = 0.0,
        self_term: bool = False,
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.heads = in_dim, out_dim, heads
        self.concat = concat
        self.negative_slope = negative_slope
        self.dropout = dropout
        self.lin = nn.Linear(in_dim, heads * out_dim, bias=False)
        self.conv = _gat_conv(out_dim, heads, negative_slope, dropout)
        self.self_term = bool(self_term)
        if self.self_term:
            self.self_weight = nn.Parameter(torch.empty(heads, out_dim, 2 * out_dim))
            self.self_bias = nn.Parameter(torch.empty(heads, out_dim))
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_earlier_attention_vectors)

    @property
    def att_dst(self) -> torch.Tensor:
        """Target halves of the attention vectors, ``(heads, out_dim)`` (a view)."""
        return self.conv.att_dst[0]

    @property
    def att_src(self) -> torch.Tensor:
        """Neighbour halves of the attention vectors, ``(heads, out_dim)`` (a view)."""
        return self.conv.att_src[0]

    def reset_parameters(self) -> None:
        """Glorot-uniform weights and attention vectors (per head)."""
        nn.init.xavier_uniform_(self.lin.weight)
        bound = math.sqrt(6.0 / (2 * self.out_dim + 1))  # each a_h maps 2·out_dim values to one score
        nn.init.uniform_(self.conv.att_dst, -bound, bound)
        nn.init.uniform_(self.conv.att_src, -bound, bound)
        if self.self_term:
            bound = math.sqrt(6.0 / (3 * self.out_dim))  # each ω_h maps 2·out_dim values to out_dim
            nn.init.uniform_(self.self_weight, -bound, bound)
            nn.init.zeros_(self.self_bias)

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, *, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend over the incoming edges of every node.

        Parameters
        ----------
        x
            Node features ``(N, in_dim)``.
        edge_index
            int64 ``(2, E)``: row 0 source (neighbour), row 1 target.
        return_attention
            Also return the attention coefficients ``(E, heads)`` (after dropout in training).

        Returns
        -------
        ``(N, heads · out_dim)`` if ``concat`` else ``(N, out_dim)``; with ``return_attention``
        a tuple ``(out, alpha)``.
        """
        num_nodes = x.shape[0]
        self.conv.training = self.training  # one flag for both dropouts (see Notes)
        projected = self.lin(F.dropout(x, self.dropout, self.training))
        size = (num_nodes, num_nodes)  # nodes without any edge still get an output row
        if return_attention:
            out, (_, alpha) = self.conv(projected, edge_index, size=size, return_attention_weights=True)
        else:
            out, alpha = self.conv(projected, edge_index, size=size), None
        out = out.view(num_nodes, self.heads, self.out_dim)
        if self.self_term:
            own = projected.view(num_nodes, self.heads, self.out_dim)
            w_own, w_neighbours = self.self_weight[..., : self.out_dim], self.self_weight[..., self.out_dim :]
            out = torch.einsum("nhc,hoc->nho", own, w_own) + torch.einsum("nhc,hoc->nho", out, w_neighbours)
            out = out + self.self_bias
        out = out.reshape(num_nodes, self.heads * self.out_dim) if self.concat else out.mean(dim=1)
        return (out, alpha) if return_attention else out


def _earlier_attention_vectors(module, state_dict, prefix, *_args) -> None:
    """Map the earlier own layer's ``att_dst`` / ``att_src`` ``(heads, width)`` onto GATConv's."""
    for name in ("att_dst", "att_src"):
        old = state_dict.pop(prefix + name, None)
        if old is not None and prefix + "conv." + name not in state_dict:
            state_dict[prefix + "conv." + name] = old.unsqueeze(0)
