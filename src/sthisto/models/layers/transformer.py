"""Pre-LayerNorm transformer over the spots of a section.

The layout (per block: LayerNorm → multi-head attention with ``heads × dim_head`` inner width
and bias-free q/k/v projection → residual; LayerNorm → Linear → GELU → Linear → residual)
is the one THItoGene, HGGEF and HisToSGE describe. Attention runs through
:func:`torch.nn.functional.scaled_dot_product_attention`, whose fused CPU/GPU kernels never
materialise the ``N × N`` score matrix, so memory grows linearly with the number of spots.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention whose inner width ``heads × dim_head`` may differ from ``dim``.

    Parameters
    ----------
    dim
        Token width.
    heads, dim_head
        Number of heads and width of each.
    dropout
        Dropout on the attention weights and on the output projection.
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.attn_dropout = dropout
        self.out_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over the token axis.

        Parameters
        ----------
        x
            ``(batch, tokens, dim)``.
        mask
            Optional boolean ``(batch, tokens)``; False marks padding that is not attended to.
        """
        batch, tokens, _ = x.shape
        q, k, v = self.to_qkv(x).view(batch, tokens, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(batch, tokens, self.heads * self.dim_head)
        return self.out_dropout(self.to_out(out))


class FeedForward(nn.Module):
    """Linear → GELU → dropout → Linear → dropout."""

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the two-layer MLP token-wise."""
        return self.net(x)


class TransformerBlock(nn.Module):
    """One pre-LayerNorm residual block: attention then MLP."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim, dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block to ``(batch, tokens, dim)``."""
        x = x + self.attn(self.attn_norm(x), mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A stack of :class:`TransformerBlock` without a final norm.

    Parameters
    ----------
    dim
        Token width.
    depth
        Number of blocks.
    heads, dim_head
        Attention heads and their width.
    mlp_dim
        Hidden width of the MLP.
    dropout
        Dropout in attention and MLP.
    checkpointing
        Recompute each block in the backward pass instead of storing its activations
        (trades ~30% more compute for activation memory independent of depth).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        *,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        dropout: float = 0.0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerBlock(dim, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim, dropout=dropout)
            for _ in range(depth)
        )
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Apply all blocks; ``x`` is ``(batch, tokens, dim)`` or ``(tokens, dim)``."""
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        for layer in self.layers:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x.squeeze(0) if unbatched else x
