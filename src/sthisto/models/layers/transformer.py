"""Pre-LayerNorm transformer over the spots of a section.

The layout (per block: LayerNorm → multi-head attention with ``heads × dim_head`` inner width
and bias-free q/k/v projection → residual; LayerNorm → Linear → GELU → Linear → residual)
is the one THItoGene, HGGEF and HisToSGE describe.

Dropout follows the papers' and authors' transformers: after the attention's output projection
and inside the MLP, never on the attention weights. Attention therefore always runs through
:func:`torch.nn.functional.scaled_dot_product_attention` without dropout, whose fused kernels
never keep an ``N × N`` matrix per head (without a padding mask, also on the CPU), so memory
grows linearly with the number of spots.

Dropout on the CPU (:class:`Dropout` layers) draws its keep-masks with
:func:`keep_mask`: four 16-bit uniform lanes per 64-bit random word compared with a threshold,
about 8× faster than ``bernoulli_`` on the CPU. The keep probability is thereby rounded to a
multiple of 2⁻¹⁶ (0.8 → 0.800003) and kept values are scaled by the inverse of the rounded
probability, so dropout stays unbiased. Masks are stored as booleans (1 byte per value,
not 4 as with :func:`torch.nn.functional.dropout` on the CPU). Masks come from a different
random stream than PyTorch's; everything else is unchanged, and GPUs use PyTorch's kernels.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

_LANES = 1 << 16


def quantised_keep(keep: float) -> float:
    """The keep probability :func:`keep_mask` realises: ``keep`` rounded to a multiple of 2⁻¹⁶."""
    return round(keep * _LANES) / _LANES


def keep_mask(shape, keep: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean CPU mask, True with probability :func:`quantised_keep` ``(keep)`` independently per value.

    Parameters
    ----------
    shape
        Shape of the mask.
    keep
        Keep probability in ``[0, 1]``.
    generator
        CPU generator; default: PyTorch's global one (so ``torch.manual_seed`` reproduces masks
        and activation checkpointing, which restores the RNG state, recomputes the same ones).
    """
    numel = math.prod(shape)
    threshold = round(keep * _LANES) - _LANES // 2  # lanes are uniform on [-2¹⁵, 2¹⁵)
    if threshold >= _LANES // 2:
        return torch.ones(shape, dtype=torch.bool)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((numel + 3) // 4,), dtype=torch.int64, generator=generator)
    return (words.view(torch.int16)[:numel] < threshold).view(shape)


def _fast_dropout_applies(p: float) -> bool:
    return 0.0 < quantised_keep(1.0 - p) < 1.0


class _CPUDropout(torch.autograd.Function):
    """Inverted dropout with a :func:`keep_mask`; saves the boolean mask only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = quantised_keep(1.0 - p)
        mask = keep_mask(x.shape, keep)
        ctx.save_for_backward(mask)
        ctx.scale = 1.0 / keep
        return x * mask.to(x.dtype).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad_out * mask.to(grad_out.dtype).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout; on the CPU with :func:`keep_mask` masks, elsewhere :func:`torch.nn.functional.dropout`."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not _fast_dropout_applies(p):
        return F.dropout(x, p, training)
    return _CPUDropout.apply(x, p)


class Dropout(nn.Dropout):
    """:class:`torch.nn.Dropout` using :func:`dropout` (fast boolean masks on the CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop values with probability ``p`` in training; identity in evaluation."""
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention whose inner width ``heads × dim_head`` may differ from ``dim``.

    Parameters
    ----------
    dim
        Token width.
    heads, dim_head
        Number of heads and width of each.
    dropout
        Dropout after the output projection. The attention weights are never dropped: neither
        the papers (THItoGene, HGGEF) nor their authors' code do it.
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.out_dropout = Dropout(dropout)

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
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(batch, tokens, self.heads * self.dim_head)
        return self.out_dropout(self.to_out(out))


class FeedForward(nn.Module):
    """Linear → GELU → dropout → Linear → dropout."""

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, dim), Dropout(dropout)
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
        Dropout after the attention output projection and in the MLP (not on attention weights).
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
