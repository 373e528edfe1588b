"""Efficient-CapsNet (Mazzia, Salvetti & Chiaberge, Sci Rep 2021): capsules with self-attention routing.

A valid-padded convolution stack (conv → BatchNorm → ReLU per layer) reduces the input to a
``C × k × k`` map; a depthwise ``k × k`` convolution turns it into ``C`` values, read as
primary capsules (``C / d`` capsules of ``d`` dims) and squashed. Self-attention routing maps
them to the output capsules in one non-iterative step:

* predictions ``û[j, i] = u[i] · W[j, i]`` (``W``: ``(out_caps, in_caps, in_dim, out_dim)``);
* agreement of input capsule ``i`` for output ``j``: ``Σ_k ⟨û[j, i], û[j, k]⟩ / √out_dim``;
* coupling ``c = softmax(agreement)`` over the **output-capsule** axis, plus a learnable
  log-prior ``b[j, i]``;
* ``s[j] = Σ_i c[j, i] · û[j, i]``, output ``v[j] = squash(s[j])``.

``squash(s) = (1 − e^{−‖s‖}) · s / (‖s‖ + ε)`` with ``ε = 1e-20`` keeps norms in ``[0, 1)``.

The agreement sum uses ``Σ_k ⟨û_i, û_k⟩ = ⟨û_i, Σ_k û_k⟩``, so no ``in_caps × in_caps``
matrix is formed; every step is one batched contraction over the whole batch.

Memory and speed: each "BatchNorm → ReLU → next convolution" step runs as one autograd node
(:func:`norm_relu_conv`) that keeps only its input (the previous convolution's output) and
recomputes the cheap normalisation and ReLU in the backward pass, instead of keeping both the
convolution output and the ReLU output: half the activation memory of the conv stack, for two
extra element-wise passes. :meth:`EfficientCapsNet.forward_blocks` runs a batch in blocks,
layer by layer, with BatchNorm statistics gathered over all blocks
(:func:`batch_norm_statistics`), so blocking changes nothing in the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

SQUASH_EPS = 1e-20


def squash(s: torch.Tensor, *, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """Efficient-CapsNet squash ``(1 − e^{−‖s‖}) · s / (‖s‖ + eps)`` along ``dim``.

    Parameters
    ----------
    s
        Capsule vectors.
    dim
        Axis holding the capsule dimensions.
    eps
        Guards the division for zero vectors.

    Returns
    -------
    Tensor of the shape of ``s`` whose vectors have norm ``1 − e^{−‖s‖} < 1``.
    """
    norm = torch.linalg.vector_norm(s, dim=dim, keepdim=True)
    return (1.0 - torch.exp(-norm)) * s / (norm + eps)


class PrimaryCapsules(nn.Module):
    """Depthwise ``k × k`` convolution (with bias) over a ``C × k × k`` map → ``C/d`` squashed capsules.

    Parameters
    ----------
    channels
        Input channels ``C`` (= number of capsules × capsule dims).
    capsule_dim
        Dims ``d`` per primary capsule; consecutive channels form one capsule.
    kernel_size
        Side of the map and of the depthwise kernel (the map collapses to 1 × 1).
    """

    def __init__(self, channels: int, capsule_dim: int, kernel_size: int) -> None:
        super().__init__()
        if channels % capsule_dim:
            raise ValueError(f"channels={channels} is not a multiple of capsule_dim={capsule_dim}.")
        self.capsule_dim = capsule_dim
        self.n_capsules = channels // capsule_dim
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(channels, channels, kernel_size, groups=channels)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="linear")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, k, k)`` to squashed capsules ``(B, C/d, d)``."""
        if x.shape[-2:] != (self.kernel_size, self.kernel_size):
            raise ValueError(
                f"primary capsules expect a {self.kernel_size} × {self.kernel_size} map, got "
                f"{tuple(x.shape[-2:])}; the input patch size does not fit this network."
            )
        # A depthwise conv whose kernel covers the whole map is a per-channel dot product.
        values = torch.einsum("bchw,chw->bc", x, self.conv.weight[:, 0]) + self.conv.bias
        return squash(values.view(x.shape[0], self.n_capsules, self.capsule_dim))


class SelfAttentionRouting(nn.Module):
    """Efficient-CapsNet's non-iterative self-attention routing.

    Parameters
    ----------
    in_capsules, in_dim
        Number and width of the input capsules.
    out_capsules, out_dim
        Number and width of the output capsules.

    Notes
    -----
    Parameters: ``weight`` ``(out_capsules, in_capsules, in_dim, out_dim)`` (He-normal over the
    ``in_dim`` contraction) and ``log_prior`` ``(out_capsules, in_capsules, 1)`` (zeros).
    """

    def __init__(self, in_capsules: int, in_dim: int, out_capsules: int, out_dim: int) -> None:
        super().__init__()
        self.in_capsules, self.in_dim = in_capsules, in_dim
        self.out_capsules, self.out_dim = out_capsules, out_dim
        self.weight = nn.Parameter(torch.randn(out_capsules, in_capsules, in_dim, out_dim) * math.sqrt(2.0 / in_dim))
        self.log_prior = nn.Parameter(torch.zeros(out_capsules, in_capsules, 1))

    def forward(self, u: torch.Tensor, *, return_coupling: bool = False):
        """Route ``u`` ``(B, in_capsules, in_dim)`` to ``(B, out_capsules, out_dim)``.

        With ``return_coupling=True`` also returns the coupling coefficients
        ``(B, out_capsules, in_capsules)`` *before* the log-prior is added (each column sums to 1
        over the output capsules).
        """
        u_hat = torch.einsum("bid,jide->bjie", u, self.weight)  # (B, out, in, out_dim)
        agreement = torch.einsum("bjie,bje->bji", u_hat, u_hat.sum(dim=2)) / math.sqrt(self.out_dim)
        coupling = torch.softmax(agreement, dim=1)
        s = torch.einsum("bji,bjie->bje", coupling + self.log_prior[..., 0], u_hat)
        v = squash(s)
        return (v, coupling) if return_coupling else v


def _batch_norm_factor(norm: nn.BatchNorm2d) -> float:
    """Running-average factor of ``norm`` for this step, as :class:`torch.nn.BatchNorm2d` computes it."""
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            return 1.0 / float(norm.num_batches_tracked)
    return 0.0 if norm.momentum is None else norm.momentum


class _ChannelMoments(torch.autograd.Function):
    """Per-channel ``Σx`` and ``Σx²`` of a ``(B, C, H, W)`` block, accumulated in float64."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        ctx.save_for_backward(x)
        dims = (0, 2, 3)
        return x.sum(dims, dtype=torch.float64), x.square().sum(dims, dtype=torch.float64)

    @staticmethod
    def backward(ctx, grad_sum, grad_square_sum):
        (x,) = ctx.saved_tensors
        shape = (1, -1, 1, 1)
        return x * (2.0 * grad_square_sum).to(x.dtype).view(shape) + grad_sum.to(x.dtype).view(shape)


def batch_norm_statistics(blocks: Sequence[torch.Tensor], norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and inverse standard deviation per channel for ``norm``, over all ``blocks`` together.

    In training (or without running statistics) they are the batch statistics of the blocks
    concatenated along the batch axis — differentiable, and the running statistics are updated
    once, exactly as :class:`torch.nn.BatchNorm2d` would on the concatenated batch. In
    evaluation they are the running statistics.
    """
    dtype = blocks[0].dtype
    if not norm.training and norm.running_mean is not None:
        return norm.running_mean.to(dtype), torch.rsqrt(norm.running_var + norm.eps).to(dtype)
    count = sum(block.numel() // block.shape[1] for block in blocks)
    total = total_square = 0.0
    for block in blocks:
        block_sum, block_square_sum = _ChannelMoments.apply(block)
        total, total_square = total + block_sum, total_square + block_square_sum
    mean = total / count
    var = (total_square / count - mean.square()).clamp_min(0.0)
    if norm.training and norm.track_running_stats and norm.running_mean is not None:
        factor = _batch_norm_factor(norm)
        with torch.no_grad():
            norm.running_mean.mul_(1.0 - factor).add_(factor * mean.to(norm.running_mean.dtype))
            unbiased = var * (count / max(count - 1, 1))
            norm.running_var.mul_(1.0 - factor).add_(factor * unbiased.to(norm.running_var.dtype))
    return mean.to(dtype), torch.rsqrt(var + norm.eps).to(dtype)


class _NormReluConv(torch.autograd.Function):
    """``conv(relu((x − mean) · invstd · γ + β))``, keeping only ``x`` for the backward pass.

    ``mean``/``invstd`` ``None``: no normalisation; ``conv`` ``None``: no convolution.
    """

    @staticmethod
    def forward(ctx, x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias, conv):
        ctx.normalised = mean is not None
        ctx.conv = None if conv is None else (conv.stride, conv.padding, conv.dilation, conv.groups)
        z = _normalise_relu(x, mean, invstd, bn_weight, bn_bias)
        ctx.save_for_backward(x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias)
        if conv is None:
            return z
        return F.conv2d(z, conv_weight, conv_bias, *ctx.conv)

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        z = _normalise_relu(x, mean, invstd, bn_weight, bn_bias)
        grad_conv_weight = grad_conv_bias = None
        if ctx.conv is None:
            grad_z = grad_out
        else:
            stride, padding, dilation, groups = ctx.conv
            grad_z, grad_conv_weight, grad_conv_bias = torch.ops.aten.convolution_backward(
                grad_out,
                z,
                conv_weight,
                None if conv_bias is None else [conv_bias.shape[0]],
                stride,
                padding,
                dilation,
                False,
                [0, 0],
                groups,
                [any(needs[:5]), needs[5], conv_bias is not None and needs[6]],
            )
        outputs = [None] * 7
        outputs[5], outputs[6] = grad_conv_weight, grad_conv_bias
        if not any(needs[:5]):
            return (*outputs, None)
        grad_z = torch.ops.aten.threshold_backward(grad_z, z, 0.0)  # ReLU's backward
        if not ctx.normalised:
            outputs[0] = grad_z
            return (*outputs, None)
        shape = (1, -1, 1, 1)
        scale = invstd * bn_weight
        grad_sum = grad_z.sum((0, 2, 3))
        # Σ grad · (x − mean) per channel
        centred = (grad_z * x).sum((0, 2, 3)) - mean * grad_sum
        outputs[0] = grad_z * scale.view(shape) if needs[0] else None
        outputs[1] = -scale * grad_sum if needs[1] else None
        outputs[2] = bn_weight * centred if needs[2] else None
        outputs[3] = invstd * centred if needs[3] else None
        outputs[4] = grad_sum if needs[4] else None
        return (*outputs, None)


def _normalise_relu(x, mean, invstd, bn_weight, bn_bias) -> torch.Tensor:
    if mean is None:
        return F.relu(x)
    shape = (1, -1, 1, 1)
    scale = invstd * bn_weight
    return torch.addcmul((bn_bias - mean * scale).view(shape), x, scale.view(shape)).relu_()


def norm_relu_conv(
    x: torch.Tensor,
    norm: nn.BatchNorm2d | None,
    conv: nn.Conv2d | None,
    statistics: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``conv(relu(norm(x)))`` as one memory-light autograd node.

    Same result and gradients as the modules in sequence, running statistics included; only
    ``x`` is kept for the backward pass (normalisation and ReLU are recomputed).

    Parameters
    ----------
    x
        Input ``(B, C, H, W)``.
    norm
        BatchNorm applied first, or ``None`` (ReLU only).
    conv
        Convolution applied last, or ``None`` (return the ReLU output).
    statistics
        ``(mean, invstd)`` from :func:`batch_norm_statistics` when ``x`` is one block of a
        larger batch; by default the statistics of ``x`` itself (updating running statistics).
    """
    if norm is not None and statistics is None:
        statistics = batch_norm_statistics([x], norm)
    mean, invstd = statistics if norm is not None else (None, None)
    return _NormReluConv.apply(
        x,
        mean,
        invstd,
        None if norm is None else norm.weight,
        None if norm is None else norm.bias,
        None if conv is None else conv.weight,
        None if conv is None else conv.bias,
        conv,
    )


class EfficientCapsNet(nn.Module):
    """Efficient-CapsNet on a feature map: conv stack → primary capsules → self-attention routing.

    Parameters
    ----------
    in_channels
        Channels of the input map.
    channels, kernel_sizes, strides
        The valid-padded conv stack (each conv with bias, then BatchNorm, then ReLU).
    primary_dim
        Dims per primary capsule (the last conv's channels / ``primary_dim`` capsules).
    primary_kernel
        Side of the map the stack produces and of the depthwise primary kernel.
    out_capsules, out_dim
        Output capsules and their width.
    input_relu
        Apply a ReLU to the input first (THItoGene: the ReLU after the dynamic convolution),
        fused with the first convolution so that only the pre-activation input is stored.

    Notes
    -----
    Efficient-CapsNet's own code applies ReLU inside the convolution and BatchNorm after it;
    THItoGene's description is conv → BN → ReLU, which is what this module does (same
    parameters either way).
    """

    def __init__(
        self,
        in_channels: int = 16,
        *,
        channels: Sequence[int] = (32, 64, 64, 128),
        kernel_sizes: Sequence[int] = (5, 3, 3, 3),
        strides: Sequence[int] = (1, 1, 1, 2),
        primary_dim: int = 8,
        primary_kernel: int = 9,
        out_capsules: int = 20,
        out_dim: int = 64,
        input_relu: bool = False,
    ) -> None:
        super().__init__()
        self.input_relu = input_relu
        if not len(channels) == len(kernel_sizes) == len(strides):
            raise ValueError("channels, kernel_sizes and strides must have the same length.")
        widths = (in_channels, *channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, k, stride=s)
            for c_in, c_out, k, s in zip(widths[:-1], widths[1:], kernel_sizes, strides)
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in channels)
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.primary = PrimaryCapsules(channels[-1], primary_dim, primary_kernel)
        self.routing = SelfAttentionRouting(self.primary.n_capsules, primary_dim, out_capsules, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, in_channels, H, W)`` to output capsules ``(B, out_capsules, out_dim)``."""
        return torch.cat(self.forward_blocks([x]))

    def forward_blocks(self, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run blocks of one batch layer by layer; BatchNorm sees the whole batch.

        The result equals :meth:`forward` on the concatenated blocks (running statistics
        included), but every operation works on one block at a time: smaller temporaries,
        better cache use, and no page faults from huge fresh allocations.
        """
        convs, norms = list(self.convs), list(self.norms)
        if self.input_relu:
            outputs = [norm_relu_conv(block, None, convs[0]) for block in blocks]
        else:
            outputs = [convs[0](block) for block in blocks]
        for norm, conv in zip(norms[:-1], convs[1:]):
            statistics = batch_norm_statistics(outputs, norm)
            outputs = [norm_relu_conv(block, norm, conv, statistics) for block in outputs]
        statistics = batch_norm_statistics(outputs, norms[-1])
        outputs = [norm_relu_conv(block, norms[-1], None, statistics) for block in outputs]
        return [self.routing(self.primary(block)) for block in outputs]
