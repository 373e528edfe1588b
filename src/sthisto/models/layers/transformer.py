"""Pre-LayerNorm transformer over the spots of a section.

The layout (per block: LayerNorm → multi-head attention with ``heads × dim_head`` inner width
and bias-free q/k/v projection → residual; LayerNorm → Linear → GELU → Linear → residual)
is the one THItoGene, HGGEF and HisToSGE describe.

Attention never keeps an ``N × N`` matrix per head, so memory grows linearly with the number
of spots:

* without attention dropout (evaluation, or ``dropout=0``) and on GPUs, it runs through
  :func:`torch.nn.functional.scaled_dot_product_attention`, whose fused kernels support
  dropout on CUDA;
* on the CPU with attention dropout in training, PyTorch's fused CPU kernel refuses dropout and
  falls back to the unfused "math" path, which stores softmax, dropout mask and dropped
  weights (``3 × heads × N²`` values per layer: 4.7 GB per layer at 5,000 spots, 16 heads).
  There :class:`_BlockwiseDropoutAttention` takes over: query blocks of bounded size, an exact
  (max-shifted) softmax, a Bernoulli keep-mask drawn from a per-block seed, and a backward
  pass that recomputes scores and regenerates the same masks from the seeds, keeping only
  ``q, k, v``, the output and one log-sum-exp per query.

Dropout on the CPU (attention weights and :class:`Dropout` layers) draws its keep-masks with
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

# Values per (heads × query-block × keys) score block of the CPU dropout attention (16 MB in
# float32); a few such blocks are alive at once, whatever the number of tokens.
_ATTENTION_BLOCK_ELEMENTS = 1 << 22


def _query_blocks(batch: int, heads: int, tokens: int):
    """(block id, batch index, query slice) covering all queries, in a fixed order."""
    step = max(1, min(tokens, _ATTENTION_BLOCK_ELEMENTS // max(1, heads * tokens)))
    block = 0
    for b in range(batch):
        for begin in range(0, tokens, step):
            yield block, b, slice(begin, min(begin + step, tokens))
            block += 1


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


def _block_keep_mask(shape, keep: float, seed: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """0/1 float keep-mask of one attention block, reproducible from ``(seed, block)``."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed((seed + block) % (1 << 63))
    return keep_mask(shape, keep, generator=generator).to(dtype)


def _block_scores(q_block, k, bias, scale) -> torch.Tensor:
    scores = torch.matmul(q_block * scale, k.transpose(-1, -2))  # (heads, block, tokens)
    if bias is not None:
        scores += bias
    return scores


class _BlockwiseDropoutAttention(torch.autograd.Function):
    """Softmax attention with dropout on the weights, in query blocks, recomputed in backward.

    ``q, k, v``: ``(batch, heads, tokens, dim_head)``; ``key_mask``: bool ``(batch, tokens)``
    (True = attend) or None. A query whose keys are all masked gets a zero output.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_mask, dropout_p: float):
        batch, heads, tokens, dim_head = q.shape
        scale = dim_head**-0.5
        keep = quantised_keep(1.0 - dropout_p)
        # Drawn from the global generator: torch.manual_seed reproduces the masks, and
        # activation checkpointing (which restores the RNG state) recomputes the same ones.
        seed = int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
        bias = None if key_mask is None else _mask_bias(key_mask, q.dtype)
        out = torch.empty(batch, heads, tokens, dim_head, dtype=q.dtype)
        lse = torch.empty(batch, heads, tokens, dtype=q.dtype)
        for block, b, rows in _query_blocks(batch, heads, tokens):
            weights = _block_scores(q[b, :, rows], k[b], None if bias is None else bias[b], scale)
            peak = weights.amax(dim=-1, keepdim=True)
            peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
            weights.sub_(peak).exp_()
            total = weights.sum(dim=-1, keepdim=True)
            # log(0) = -inf for fully masked queries; +inf makes their recomputed weights 0.
            lse[b, :, rows] = torch.where(total > 0, peak + total.log(), math.inf).squeeze(-1)
            weights.div_(total.clamp_min(torch.finfo(q.dtype).tiny))
            weights.mul_(_block_keep_mask(weights.shape, keep, seed, block, q.dtype))
            out[b, :, rows] = torch.matmul(weights, v[b])
        out.mul_(1.0 / keep)
        ctx.save_for_backward(q, k, v, out, lse, key_mask if key_mask is not None else torch.empty(0))
        ctx.has_mask = key_mask is not None
        ctx.seed, ctx.keep, ctx.scale = seed, keep, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        batch, heads, tokens, _ = q.shape
        keep, scale, seed = ctx.keep, ctx.scale, ctx.seed
        bias = _mask_bias(key_mask, q.dtype) if ctx.has_mask else None
        delta = (grad_out * out).sum(dim=-1)  # rowsum(dO ∘ O) = Σ_j P_ij dP_ij, dropout included
        grad_kept = grad_out * (1.0 / keep)
        grad_q = torch.empty_like(q, memory_format=torch.contiguous_format)
        grad_k = torch.zeros_like(k, memory_format=torch.contiguous_format)
        grad_v = torch.zeros_like(v, memory_format=torch.contiguous_format)
        for block, b, rows in _query_blocks(batch, heads, tokens):
            probs = _block_scores(q[b, :, rows], k[b], None if bias is None else bias[b], scale)
            probs.sub_(lse[b, :, rows, None]).exp_()
            kept = _block_keep_mask(probs.shape, keep, seed, block, q.dtype)
            grad_v[b].baddbmm_((probs * kept).transpose(-1, -2), grad_kept[b, :, rows])
            grad_scores = torch.matmul(grad_kept[b, :, rows], v[b].transpose(-1, -2)).mul_(kept)
            grad_scores.sub_(delta[b, :, rows, None]).mul_(probs)
            grad_q[b, :, rows] = torch.matmul(grad_scores, k[b]).mul_(scale)
            grad_k[b].baddbmm_(grad_scores.transpose(-1, -2), q[b, :, rows], alpha=scale)
        return grad_q, grad_k, grad_v, None, None


def _mask_bias(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(batch, tokens)`` bool → additive ``(batch, 1, 1, tokens)`` bias (0 or -inf)."""
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    return bias.masked_fill_(~key_mask, -math.inf)[:, None, None, :]


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
        dropout_p = self.attn_dropout if self.training else 0.0
        if dropout_p > 0.0 and x.device.type == "cpu" and _fast_dropout_applies(dropout_p):
            out = _BlockwiseDropoutAttention.apply(q, k, v, mask, dropout_p)
        else:
            attn_mask = None if mask is None else mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
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
