"""HGGEF's hypergraph association module: hyperedges from feature + position proximity.

In the paper, every spot ``i`` defines one hyperedge: ``i`` itself plus ``k`` other spots
chosen by the incidence score ``s(i, j) = Norm(‖f_i − f_j‖) + Norm(‖p_i − p_j‖)`` (features
``f``, grid positions ``p``; ``Norm`` divides by the largest distance of the section, i.e.
min–max normalisation, the minimum being the zero self-distance). Two hypergraph convolutions
(torch-geometric's :class:`~torch_geometric.nn.HypergraphConv`) with a residual connection
then mix each spot's features with those of the spots sharing its hyperedges.

Two construction rules:

``"nearest"`` (the paper)
    hyperedge ``i`` = ``i`` plus the ``k`` spots with the *smallest* score ``s(i, ·)`` among
    all spots of the section; unit hyperedge weights.
``"reference"`` (the authors' code)
    a different score and a different incidence. Each spot ``i`` scores every spot ``j`` of
    the section with ``r(i, j) = A[i, j] / Σ_l A[i, l] + d(i, j) / Σ_l d(i, l)``, where ``A`` is
    the binary adjacency of the spatial graph (``A[i, j] = 1`` when ``j`` is a neighbour of
    ``i``) and ``d`` the Euclidean feature distance, each term divided by its row sum (a term
    whose row sum is 0 counts as 0; the code would give NaN). ``top(i)`` are the ``k + 1``
    spots with the *largest* ``r(i, ·)`` (ties: lower index first), in decreasing order. Spot
    ``i`` then joins hyperedge ``j`` for every ``j`` in ``top(i)``, so hyperedge ``j`` =
    ``{i : j ∈ top(i)}`` (possibly empty, possibly without ``j``). Positions do not enter.
    The ``N · (k + 1)`` chosen scores, in spot-then-rank order, are handed to the
    convolution as hyperedge weights, where one weight per hyperedge is expected, so
    hyperedge ``j`` is weighted by the ``j``-th chosen score.

Construction is tensor-only (no Python loop over spots): score matrices are built in row
chunks of bounded size and reduced chunk by chunk, so memory stays bounded for Visium-size
sections.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from ..._errors import InputError

#: Default bound on the number of score-matrix entries held at once (≈16 MB in float32).
DEFAULT_MAX_ENTRIES = 1 << 22


def _row_chunks(n_rows: int, n_cols: int, max_entries: int):
    rows = max(1, max_entries // max(n_cols, 1))
    for start in range(0, n_rows, rows):
        yield start, min(start + rows, n_rows)


def _feature_distances(rows: torch.Tensor, features: torch.Tensor, squared_norms: torch.Tensor, start: int):
    """Euclidean distances of ``rows`` to all ``features`` through one matrix product."""
    squared = squared_norms[start : start + rows.shape[0], None] + squared_norms[None, :] - 2.0 * rows @ features.T
    return squared.clamp_min_(0.0).sqrt_()


def _pair_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[:, None, :] - b[None, :, :]).square().sum(-1).sqrt()


def _distance_maxima(features, positions, squared_norms, max_entries):
    n = features.shape[0]
    max_feature = features.new_zeros(())
    max_position = positions.new_zeros(())
    for start, stop in _row_chunks(n, n, max_entries):
        max_feature = torch.maximum(
            max_feature, _feature_distances(features[start:stop], features, squared_norms, start).max()
        )
        max_position = torch.maximum(max_position, _pair_distances(positions[start:stop], positions).max())
    return _positive(max_feature), _positive(max_position)


def _positive(maximum: torch.Tensor) -> torch.Tensor:
    # A section whose spots coincide in feature or position space contributes zero, not NaN.
    return torch.where(maximum > 0, maximum, 1.0)


def incidence_scores(
    features: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    *,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> torch.Tensor:
    """Incidence scores ``s(rows[e], cols[e])`` for selected pairs, normalised over the section.

    Parameters
    ----------
    features
        Node features ``(N, D)``.
    positions
        Grid positions ``(N, 2)``.
    rows, cols
        Pair indices ``(E,)``.
    max_entries
        Bound on the score-matrix entries held at once while finding the section maxima.
    """
    features = features.float()
    positions = positions.float()
    squared_norms = features.square().sum(-1)
    max_feature, max_position = _distance_maxima(features, positions, squared_norms, max_entries)
    feature_distance = (features[rows] - features[cols]).norm(dim=-1)
    position_distance = (positions[rows] - positions[cols]).norm(dim=-1)
    return feature_distance / max_feature + position_distance / max_position


def _nearest_members(features, positions, k, max_entries):
    n = features.shape[0]
    squared_norms = features.square().sum(-1)
    if n * n <= max_entries:  # one block: compute the distances once
        feature_distance = _feature_distances(features, features, squared_norms, 0)
        position_distance = _pair_distances(positions, positions)
        scores = feature_distance / _positive(feature_distance.max()) + position_distance / _positive(
            position_distance.max()
        )
        scores.fill_diagonal_(float("inf"))  # a spot is added to its own hyperedge separately
        return scores.topk(k, dim=1, largest=False).indices
    max_feature, max_position = _distance_maxima(features, positions, squared_norms, max_entries)
    members = []
    for start, stop in _row_chunks(n, n, max_entries):
        scores = _feature_distances(features[start:stop], features, squared_norms, start) / max_feature
        scores += _pair_distances(positions[start:stop], positions) / max_position
        local = torch.arange(stop - start, device=features.device)
        scores[local, local + start] = float("inf")  # a spot is added to its own hyperedge separately
        members.append(scores.topk(k, dim=1, largest=False).indices)
    return torch.cat(members)


def build_hyperedges(
    features: torch.Tensor,
    positions: torch.Tensor,
    *,
    k: int = 3,
    rule: Literal["nearest", "reference"] = "nearest",
    edge_index: torch.Tensor | None = None,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Build one hyperedge per spot.

    Parameters
    ----------
    features
        Node features ``(N, D)`` (used without gradient).
    positions
        Grid positions ``(N, 2)``, columns (x, y).
    k
        HGGEF's K (3): ``"nearest"`` adds ``k`` spots to each spot's own hyperedge;
        ``"reference"`` lets each spot join ``k + 1`` hyperedges. Fewer when the section has
        fewer spots.
    rule
        ``"nearest"`` (paper) or ``"reference"`` (authors' code); see the module docstring.
    edge_index
        Directed spatial graph ``(2, E)``, row 0 = neighbour, row 1 = spot (so
        ``A[spot, neighbour] = 1``); needed by ``"reference"``, ignored by ``"nearest"``.
    max_entries
        Bound on the score-matrix entries held at once.

    Returns
    -------
    hyperedge_index
        ``(2, M)`` incidence pairs: row 0 = spot, row 1 = hyperedge. ``"nearest"``: hyperedge
        ``i`` is defined by spot ``i`` and lists it first. ``"reference"``: pairs
        ``(i, j)`` for ``j`` in ``top(i)``, by spot, then by decreasing score.
    hyperedge_weight
        ``None`` for ``"nearest"`` (unit weights); for ``"reference"`` the ``N · (k + 1)``
        chosen scores in the order of the pairs (one per pair, not per hyperedge — the
        authors' quirk; the convolution reads the first ``N``).
    """
    if rule not in ("nearest", "reference"):
        raise InputError(f"rule={rule!r}; use 'nearest' (paper) or 'reference' (authors' code).")
    if features.dim() != 2 or positions.shape != (features.shape[0], 2):
        raise InputError(
            f"features must be (N, D) and positions (N, 2); got {tuple(features.shape)} and {tuple(positions.shape)}."
        )
    features = features.detach().float()
    positions = positions.detach().float()
    n = features.shape[0]
    device = features.device
    spots = torch.arange(n, device=device)
    if rule == "nearest":
        k_used = min(int(k), n - 1)
        if k_used <= 0:
            return torch.stack((spots, spots)), None
        members = _nearest_members(features, positions, k_used, max_entries)
        nodes = torch.cat((spots[:, None], members), dim=1).reshape(-1)
        hyperedges = spots.repeat_interleave(k_used + 1)
        return torch.stack((nodes, hyperedges)), None

    if edge_index is None:
        raise InputError(
            "the 'reference' hypergraph rule scores spots by their spatial-graph adjacency and needs edge_index "
            "(2, E); pass the section's spatial graph (HGGEF: 8 nearest neighbours within 2 array units)."
        )
    edge_index = edge_index.to(device)
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise InputError(f"edge_index must be (2, E); got {tuple(edge_index.shape)}.")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n):
        raise InputError(f"edge_index refers to spots outside [0, {n - 1}]; build it on this section's spots.")
    members, scores = _reference_members(features, edge_index, min(int(k) + 1, n), max_entries)
    width = members.shape[1]
    nodes = spots.repeat_interleave(width)
    return torch.stack((nodes, members.reshape(-1))), scores.reshape(-1)


def _reference_members(features, edge_index, width, max_entries):
    """The authors' ``top(i)`` (``width`` spots per row, decreasing score) and their scores."""
    n = features.shape[0]
    # The code's adjacency is a 0/1 matrix: repeated edges count once.
    pairs = torch.unique(edge_index[1] * n + edge_index[0])
    spot, neighbour = pairs // n, pairs % n
    degree = torch.bincount(spot, minlength=n).to(features.dtype)
    squared_norms = features.square().sum(-1)
    members, chosen = [], []
    for start, stop in _row_chunks(n, n, max_entries):
        distance = _feature_distances(features[start:stop], features, squared_norms, start)
        distance[torch.arange(stop - start), torch.arange(start, stop)] = 0.0  # exact zero self-distance
        total = distance.sum(dim=1, keepdim=True)
        scores = torch.where(total > 0, distance / total.clamp_min(torch.finfo(distance.dtype).tiny), 0.0)
        inside = (spot >= start) & (spot < stop)
        rows, cols = spot[inside], neighbour[inside]
        scores[rows - start, cols] += 1.0 / degree[rows]
        # A stable descending sort breaks ties towards the lower index, reproducibly.
        order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :width]
        members.append(order)
        chosen.append(scores.gather(1, order))
    return torch.cat(members), torch.cat(chosen)


class HypergraphAssociation(nn.Module):
    """Two hypergraph convolutions with a residual: ``x + conv₂(drop(LN(ReLU(conv₁(x)))))``.

    Parameters
    ----------
    dim
        Node feature width (HGGEF: 1024).
    hidden
        Width between the two convolutions (HGGEF: 512).
    k
        HGGEF's K (3), see :func:`build_hyperedges`.
    rule
        Hyperedge construction, ``"nearest"`` (paper) or ``"reference"`` (authors' code).
    dropout
        Dropout between the convolutions (HGGEF: 0.5); active in training mode only.
    max_entries
        Bound on the score-matrix entries held at once while building hyperedges.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        k: int = 3,
        rule: Literal["nearest", "reference"] = "nearest",
        dropout: float = 0.5,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        super().__init__()
        from torch_geometric.nn import HypergraphConv

        if rule not in ("nearest", "reference"):
            raise InputError(f"rule={rule!r}; use 'nearest' (paper) or 'reference' (authors' code).")
        self.k = int(k)
        self.rule = rule
        self.max_entries = int(max_entries)
        self.conv1 = HypergraphConv(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = HypergraphConv(hidden, dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, edge_index: torch.Tensor | None = None) -> torch.Tensor:
        """Mix ``(N, dim)`` node features along hyperedges built from them and ``positions``."""
        with torch.no_grad():
            hyperedge_index, weight = build_hyperedges(
                x, positions, k=self.k, rule=self.rule, edge_index=edge_index, max_entries=self.max_entries
            )
        n = x.shape[0]
        h = self.conv1(x, hyperedge_index, weight, num_edges=n)
        h = self.dropout(self.norm(F.relu(h)))
        return x + self.conv2(h, hyperedge_index, weight, num_edges=n)
