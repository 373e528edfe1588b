"""Pre-LayerNorm transformer over the spots of a section, built from timm's ``Attention`` and ``Mlp``.

The layout (per block: LayerNorm → multi-head attention with ``heads × dim_head`` inner width
and bias-free q/k/v projection → residual; LayerNorm → Linear → GELU → Linear → residual)
is the one THItoGene, HGGEF and HisToSGE describe; the attention and the MLP are
:class:`timm.layers.Attention` and :class:`timm.layers.Mlp` (their own dropout layers).
``tests/test_library_blocks.py`` checks the block bit for bit against the timm modules applied
by hand and, to float rounding, against the equations with an explicit softmax. The earlier own
attention and MLP (with the fast CPU dropout below) were not faster on the real THItoGene step
(``benchmarks/thitogene_step.py --own-kernels-src``), so the maintained modules serve.

Dropout follows the papers' and authors' transformers: after the attention's output projection
and inside the MLP, never on the attention weights. Attention therefore always runs through
:func:`torch.nn.functional.scaled_dot_product_attention` without dropout, whose fused kernels
never keep an ``N × N`` matrix per head (without a padding mask, also on the CPU), so memory
grows linearly with the number of spots.

:class:`Dropout` (THItoGene's token dropout) draws its keep-masks on the CPU with
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


def self_attention(dim: int, *, heads: int, dim_head: int, dropout: float = 0.0) -> nn.Module:
    """A timm :class:`~timm.layers.Attention` with inner width ``heads × dim_head`` (may differ from ``dim``).

    Bias-free q/k/v projection, output projection with bias, dropout ``dropout`` after the
    output projection only: the attention weights are never dropped (neither the papers,
    THItoGene and HGGEF, nor their authors' code do it), so the fused
    :func:`~torch.nn.functional.scaled_dot_product_attention` kernel always serves and no
    ``N × N`` matrix per head is kept. The fused path is forced on (timm can be told to leave
    it by an environment variable), since the linear memory depends on it.
    """
    from ..._compat import import_timm

    attention = import_timm().layers.Attention(
        dim, num_heads=heads, attn_head_dim=dim_head, qkv_bias=False, proj_bias=True, attn_drop=0.0, proj_drop=dropout
    )
    attention.fused_attn = True
    return attention


# Parameter names of sthisto's earlier own attention and MLP → timm's, so stored models load.
_EARLIER_NAMES = {
    "attn.to_qkv.": "attn.qkv.",
    "attn.to_out.": "attn.proj.",
    "mlp.net.0.": "mlp.fc1.",
    "mlp.net.3.": "mlp.fc2.",
}


def _earlier_block_names(module, state_dict, prefix, *_args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        for old, new in _EARLIER_NAMES.items():
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old) :]] = state_dict.pop(key)
                break


class TransformerBlock(nn.Module):
    """One pre-LayerNorm residual block: timm's ``Attention`` then timm's ``Mlp`` (GELU).

    Parameters
    ----------
    dim
        Token width.
    heads, dim_head
        Attention heads and their width (inner width ``heads × dim_head``).
    mlp_dim
        Hidden width of the MLP.
    dropout
        Dropout after the attention's output projection and in the MLP (after the activation
        and after the second linear layer).

    Notes
    -----
    Parameters ``attn_norm``, ``attn.qkv`` (no bias), ``attn.proj``, ``mlp_norm``,
    ``mlp.fc1``, ``mlp.fc2``; state dicts of the earlier own block (``attn.to_qkv``,
    ``attn.to_out``, ``mlp.net.0``, ``mlp.net.3``) load unchanged.
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        from ..._compat import import_timm

        self.attn_norm = nn.LayerNorm(dim)
        self.attn = self_attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = import_timm().layers.Mlp(dim, hidden_features=mlp_dim, act_layer=nn.GELU, drop=dropout)
        self.register_load_state_dict_pre_hook(_earlier_block_names)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block to ``(batch, tokens, dim)``; ``mask`` ``(batch, tokens)`` is False on padding."""
        attn_mask = None if mask is None else mask[:, None, None, :]
        x = x + self.attn(self.attn_norm(x), attn_mask=attn_mask)
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
