"""Learnable embeddings of integer grid positions (array column x, array row y)."""

from __future__ import annotations

import torch
from torch import nn

from ..._errors import InputError


class GridPositionEmbedding(nn.Module):
    """Embed ``(x, y)`` grid coordinates with one table per axis.

    Parameters
    ----------
    n_positions
        Table size per axis; coordinates must lie in ``[0, n_positions)``. Derive it from the
        data (legacy ST fits 64; Visium needs ≥ 128).
    dim
        Embedding width per axis.
    mode
        ``"add"`` returns ``emb_x + emb_y`` (HGGEF, HisToSGE); ``"concat"`` returns the two
        stacked as ``(N, 2, dim)`` tokens (THItoGene appends them to the capsule tokens).
    """

    def __init__(self, n_positions: int, dim: int, *, mode: str = "add") -> None:
        super().__init__()
        if mode not in ("add", "concat"):
            raise InputError(f"mode={mode!r}; use 'add' or 'concat'.")
        self.n_positions = int(n_positions)
        self.mode = mode
        self.x_embed = nn.Embedding(self.n_positions, dim)
        self.y_embed = nn.Embedding(self.n_positions, dim)

    @property
    def grid_table_size(self) -> int:
        """Entries per axis; the engine reads it to keep shifted sub-section positions in range."""
        return self.n_positions

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Embed ``positions`` (int64 ``(N, 2)``, columns x, y)."""
        if positions.numel():
            low, high = int(positions.min()), int(positions.max())
            if low < 0 or high >= self.n_positions:
                raise InputError(
                    f"grid positions span [{low}, {high}] but the position table holds "
                    f"[0, {self.n_positions - 1}]. Train with n_positions >= {high + 1} (sthisto derives "
                    f"it from the training data), or shift array coordinates to start at 0."
                )
        x = self.x_embed(positions[:, 0])
        y = self.y_embed(positions[:, 1])
        if self.mode == "add":
            return x + y
        return torch.stack((x, y), dim=1)
