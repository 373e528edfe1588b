"""Sparse multi-head graph attention (Veličković et al., ICLR 2018) over an ``edge_index``.

For a directed graph with edges ``j → i`` (``edge_index[0] = j`` the neighbour / source,
``edge_index[1] = i`` the target) and head ``h``:

* ``e[i, j] = LeakyReLU(a_hᵀ [W_h x_i ‖ W_h x_j])`` — the first half of ``a_h`` (``att_dst``)
  scores the target, the second (``att_src``) the neighbour;
* ``α[i, j] = softmax_j e[i, j]`` over the incoming edges of ``i`` only (masked softmax);
* ``m[i, h] = Σ_j α[i, j] W_h x_j``, the neighbour aggregate;
* ``out[i, h] = m[i, h]`` (Veličković et al.; the THItoGene authors' code), or, with
  ``self_term=True`` (THItoGene's eq. 16), ``out[i, h] = ω_h [W_h x_i ‖ m[i, h]] + β_h``: the
  spot's own projected feature concatenated with the aggregate, through a weight and a bias;
* heads concatenated (or averaged, ``concat=False``).

Dropout acts on the input features and on the attention coefficients. No self-loops are
added: a node attends to its graph neighbours only, and a node without incoming edges gets a
zero aggregate (with the self term, its output still carries its own feature).

Cost is linear in the number of edges. Nothing ``N × N`` is formed, and neither is an
``edges × heads × width`` tensor: neighbour aggregation is one sparse (CSR) matrix product
over all heads at once, and the gradient of the attention coefficients is computed in chunks
of edges.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from .transformer import dropout

# Edges per chunk when computing ⟨grad_out[i], W x_j⟩ in the backward pass: bounds the
# temporary at chunk × heads × width floats.
_SDDMM_CHUNK_ELEMENTS = 1 << 22


def segment_softmax(scores: torch.Tensor, index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Softmax of ``scores`` ``(E, H)`` over the edges sharing the same ``index`` (target node).

    Parameters
    ----------
    scores
        Edge scores, one column per head.
    index
        Target node of every edge, int64 ``(E,)``.
    num_nodes
        Number of nodes.

    Returns
    -------
    ``(E, H)`` coefficients summing to 1 over the incoming edges of every target.
    """
    heads = scores.shape[1]
    expand = index[:, None].expand(-1, heads)
    peak = scores.new_full((num_nodes, heads), -math.inf)
    peak = peak.scatter_reduce(0, expand, scores.detach(), reduce="amax", include_self=True)
    weights = torch.exp(scores - peak[index])
    total = weights.new_zeros((num_nodes, heads)).index_add(0, index, weights)
    return weights / total[index]


class _BlockCSR:
    """Sparse pattern of a multi-head adjacency: rows ``row·H + h``, columns ``col·H + h``.

    Holds the row pointers, column indices, and the permutation placing the ``(E, H)`` edge
    values into CSR order, so each forward builds the matrix with one gather.
    """

    def __init__(self, row: torch.Tensor, col: torch.Tensor, num_nodes: int, heads: int) -> None:
        n_edges = row.numel()
        order = torch.argsort(row, stable=True)
        degree = torch.bincount(row, minlength=num_nodes)
        start = torch.cumsum(degree, 0) - degree
        row_sorted = row[order]
        offset = torch.arange(n_edges, device=row.device) - start[row_sorted]
        head = torch.arange(heads, device=row.device)
        position = (start[row_sorted] * heads + offset)[:, None] + head[None, :] * degree[row_sorted][:, None]
        self.value_index = torch.empty(n_edges * heads, dtype=torch.int64, device=row.device)
        self.value_index[position.reshape(-1)] = (order[:, None] * heads + head[None, :]).reshape(-1)
        self.col_index = torch.empty(n_edges * heads, dtype=torch.int64, device=row.device)
        self.col_index[position.reshape(-1)] = (col[order][:, None] * heads + head[None, :]).reshape(-1)
        self.crow = torch.zeros(num_nodes * heads + 1, dtype=torch.int64, device=row.device)
        self.crow[1:] = torch.cumsum(degree.repeat_interleave(heads), 0)
        self.size = num_nodes * heads

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """The CSR matrix with edge values ``values`` ``(E, H)``."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            return torch.sparse_csr_tensor(
                self.crow,
                self.col_index,
                values.reshape(-1)[self.value_index],
                (self.size, self.size),
                check_invariants=False,
            )


class EdgeGraph:
    """Pre-processed ``edge_index`` reusable by every attention layer of one forward pass.

    Parameters
    ----------
    edge_index
        int64 ``(2, E)``: row 0 source (neighbour), row 1 target.
    num_nodes
        Number of nodes.
    """

    def __init__(self, edge_index: torch.Tensor, num_nodes: int) -> None:
        self.src, self.dst = edge_index[0], edge_index[1]
        self.num_nodes = num_nodes
        self._patterns: dict[tuple[int, bool], _BlockCSR] = {}

    def pattern(self, heads: int, *, transposed: bool) -> _BlockCSR:
        """CSR pattern gathering into targets (or, transposed, into sources) for ``heads`` heads."""
        key = (heads, transposed)
        if key not in self._patterns:
            row, col = (self.src, self.dst) if transposed else (self.dst, self.src)
            self._patterns[key] = _BlockCSR(row, col, self.num_nodes, heads)
        return self._patterns[key]


def _aggregate_forward(alpha: torch.Tensor, values: torch.Tensor, graph: EdgeGraph, *, transposed: bool):
    num_nodes, heads, width = values.shape
    pattern = graph.pattern(heads, transposed=transposed)
    flat = values.reshape(num_nodes * heads, width)
    return (pattern.matrix(alpha.to(values.dtype)) @ flat).view(num_nodes, heads, width)


class _EdgeAggregate(torch.autograd.Function):
    """``out[i, h] = Σ_{e: j → i} α[e, h] · values[j, h]`` with a memory-light backward."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, values: torch.Tensor, graph: EdgeGraph) -> torch.Tensor:
        ctx.save_for_backward(alpha, values)
        ctx.graph = graph
        return _aggregate_forward(alpha, values, graph, transposed=False)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        alpha, values = ctx.saved_tensors
        graph = ctx.graph
        grad_alpha = grad_values = None
        grad_out = grad_out.contiguous()
        if ctx.needs_input_grad[1]:
            grad_values = _aggregate_forward(alpha, grad_out, graph, transposed=True)
        if ctx.needs_input_grad[0]:
            n_edges, heads = alpha.shape
            width = values.shape[-1]
            grad_alpha = torch.empty_like(alpha)
            step = max(1, _SDDMM_CHUNK_ELEMENTS // (heads * width))
            for begin in range(0, n_edges, step):
                end = min(begin + step, n_edges)
                src, dst = graph.src[begin:end], graph.dst[begin:end]
                grad_alpha[begin:end] = torch.einsum("ehc,ehc->eh", grad_out[dst], values[src])
        return grad_alpha, grad_values, None


class GraphAttention(nn.Module):
    """One multi-head graph attention layer, paper equations of Veličković et al.

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
    ``att_dst`` and ``att_src`` ``(heads, out_dim)`` (the two halves of each ``a_h``); with
    ``self_term``, ``self_weight`` ``(heads, out_dim, 2 · out_dim)`` (each ``ω_h``; its first
    ``out_dim`` columns act on the own feature) and ``self_bias`` ``(heads, out_dim)``. Glorot
    initialisation, zero bias. The layer applies no non-linearity; the caller applies its
    activation.
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
        self.att_dst = nn.Parameter(torch.empty(heads, out_dim))
        self.att_src = nn.Parameter(torch.empty(heads, out_dim))
        self.self_term = bool(self_term)
        if self.self_term:
            self.self_weight = nn.Parameter(torch.empty(heads, out_dim, 2 * out_dim))
            self.self_bias = nn.Parameter(torch.empty(heads, out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform weights and attention vectors (per head)."""
        nn.init.xavier_uniform_(self.lin.weight)
        bound = math.sqrt(6.0 / (2 * self.out_dim + 1))  # each a_h maps 2·out_dim values to one score
        nn.init.uniform_(self.att_dst, -bound, bound)
        nn.init.uniform_(self.att_src, -bound, bound)
        if self.self_term:
            bound = math.sqrt(6.0 / (3 * self.out_dim))  # each ω_h maps 2·out_dim values to out_dim
            nn.init.uniform_(self.self_weight, -bound, bound)
            nn.init.zeros_(self.self_bias)

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor | EdgeGraph, *, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend over the incoming edges of every node.

        Parameters
        ----------
        x
            Node features ``(N, in_dim)``.
        edge_index
            int64 ``(2, E)`` (row 0 source, row 1 target) or a prepared :class:`EdgeGraph`.
        return_attention
            Also return the attention coefficients ``(E, heads)`` (before dropout).

        Returns
        -------
        ``(N, heads · out_dim)`` if ``concat`` else ``(N, out_dim)``; with ``return_attention``
        a tuple ``(out, alpha)``.
        """
        num_nodes = x.shape[0]
        graph = edge_index if isinstance(edge_index, EdgeGraph) else EdgeGraph(edge_index, num_nodes)
        x = dropout(x, self.dropout, self.training)
        projected = self.lin(x).view(num_nodes, self.heads, self.out_dim)
        score_dst = torch.einsum("nhc,hc->nh", projected, self.att_dst)
        score_src = torch.einsum("nhc,hc->nh", projected, self.att_src)
        scores = F.leaky_relu(score_dst[graph.dst] + score_src[graph.src], self.negative_slope)
        alpha = segment_softmax(scores, graph.dst, num_nodes)
        out = _EdgeAggregate.apply(dropout(alpha, self.dropout, self.training), projected, graph)
        if self.self_term:
            own, neighbours = self.self_weight[..., : self.out_dim], self.self_weight[..., self.out_dim :]
            out = torch.einsum("nhc,hoc->nho", projected, own) + torch.einsum("nhc,hoc->nho", out, neighbours)
            out = out + self.self_bias
        out = out.reshape(num_nodes, self.heads * self.out_dim) if self.concat else out.mean(dim=1)
        return (out, alpha) if return_attention else out
