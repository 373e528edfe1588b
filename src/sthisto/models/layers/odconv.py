"""Omni-dimensional dynamic convolution (ODConv; Li, Yao & Chen, ICLR 2022).

A convolution whose kernel is assembled per sample from ``kernel_num`` candidate kernels,
modulated along four dimensions by attentions computed from the input's global average:

* input-channel attention (sigmoid, one value per input channel),
* output-channel ("filter") attention (sigmoid, one value per output channel),
* spatial attention (sigmoid, one value per kernel position),
* kernel attention (softmax over the candidate kernels).

The attention branch is global average pool → 1×1 convolution (no bias) to
``max(in_channels × reduction, min_channels)`` channels → BatchNorm → ReLU → four 1×1
convolution heads (with bias), each divided by a temperature before its non-linearity.

All four attentions are folded into one kernel per sample (input- and output-channel
attention scale the kernel's columns and rows, which is exact because the convolution has no
bias), so a batch costs a single grouped convolution. When the stride equals the kernel size
and there is no padding (THItoGene: kernel 4, stride 4), the tiles do not overlap and the
convolution is a batched matrix product of the image tiles with the per-sample kernels; that
path keeps only the raw input (uint8 for raw pixels) for the backward pass, not a float copy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _tiles(x: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Non-overlapping ``k × k`` tiles of ``x`` ``(B, C, H, W)`` as ``(B, H/k · W/k, C·k·k)`` of ``dtype``.

    The feature order inside a tile is (channel, row, column), the order of a conv kernel.
    Rearrangement and type conversion happen in one pass.
    """
    b, c, h, w = x.shape
    tiles = torch.empty((b, h // k, w // k, c, k, k), dtype=dtype, device=x.device)
    tiles.copy_(x.reshape(b, c, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5))
    return tiles.view(b, (h // k) * (w // k), c * k * k)


class _TileMatmul(torch.autograd.Function):
    """``y[b] = tiles[b] @ w[b]`` with ``tiles = _tiles(x)``; keeps ``x`` as given (uint8 stays uint8).

    The float tiles computed for the forward pass are not stored: the backward pass rebuilds them
    from ``x`` (a quarter of their size for uint8 pixels).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, tiles: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.k = k
        return torch.bmm(tiles, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        k = ctx.k
        grad_x = grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = torch.bmm(_tiles(x, k, grad_out.dtype).transpose(1, 2), grad_out)
        if ctx.needs_input_grad[0]:
            b, c, h, w = x.shape
            grad_tiles = torch.bmm(grad_out, weight.transpose(1, 2))
            grad_x = (
                grad_tiles.view(b, h // k, w // k, c, k, k).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w).to(x.dtype)
            )
        return grad_x, None, grad_weight, None


class ODConv2d(nn.Module):
    """Omni-dimensional dynamic 2-d convolution without bias.

    Parameters
    ----------
    in_channels, out_channels
        Channels in and out.
    kernel_size, stride, padding
        As for :class:`torch.nn.Conv2d` (square kernels).
    kernel_num
        Number of candidate kernels mixed by the kernel attention.
    reduction, min_channels
        Width of the attention branch: ``max(int(in_channels × reduction), min_channels)``.
    temperature
        Divides the attention logits before sigmoid / softmax.

    Notes
    -----
    Parameters: ``weight`` ``(kernel_num, out, in, k, k)``; the attention branch ``fc`` (no
    bias), ``bn``, and heads ``channel_fc``, ``filter_fc``, ``spatial_fc``, ``kernel_fc`` (with
    bias). Initialisation follows the ODConv paper: Kaiming-normal (fan-out, ReLU gain) for
    every kernel and 1×1 convolution, zero biases, BatchNorm at identity.

    Inputs may be uint8 (raw pixels, converted to float inside) or float.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        kernel_num: int = 4,
        reduction: float = 0.0625,
        min_channels: int = 16,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.kernel_num = kernel_num
        self.temperature = float(temperature)
        hidden = max(int(in_channels * reduction), min_channels)
        self.fc = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.channel_fc = nn.Conv2d(hidden, in_channels, 1)
        self.filter_fc = nn.Conv2d(hidden, out_channels, 1)
        self.spatial_fc = nn.Conv2d(hidden, kernel_size * kernel_size, 1)
        self.kernel_fc = nn.Conv2d(hidden, kernel_num, 1)
        self.weight = nn.Parameter(torch.empty(kernel_num, out_channels, in_channels, kernel_size, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan-out) kernels and 1×1 convolutions, zero biases, identity BatchNorm."""
        for module in (self.fc, self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        for kernel in self.weight:
            nn.init.kaiming_normal_(kernel, mode="fan_out", nonlinearity="relu")

    def attentions(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """The four attentions from the global average ``pooled`` ``(B, in_channels)``.

        Returns
        -------
        dict with ``channel`` ``(B, in)``, ``filter`` ``(B, out)``, ``spatial`` ``(B, k, k)``
        and ``kernel`` ``(B, kernel_num)`` (rows sum to 1).
        """
        h = F.relu(self.bn(self.fc(pooled[:, :, None, None])))
        t = self.temperature
        b, k = pooled.shape[0], self.kernel_size
        return {
            "channel": torch.sigmoid(self.channel_fc(h).view(b, -1) / t),
            "filter": torch.sigmoid(self.filter_fc(h).view(b, -1) / t),
            "spatial": torch.sigmoid(self.spatial_fc(h).view(b, k, k) / t),
            "kernel": torch.softmax(self.kernel_fc(h).view(b, -1) / t, dim=1),
        }

    def sample_kernels(self, pooled: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels ``(B, out, in, k, k)`` with all four attentions folded in."""
        att = self.attentions(pooled)
        mixed = (att["kernel"] @ self.weight.flatten(1)).view(-1, *self.weight.shape[1:])
        return (
            mixed
            * att["spatial"][:, None, None]
            * att["channel"][:, None, :, None, None]
            * att["filter"][:, :, None, None, None]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` ``(B, in, H, W)`` (uint8 or float) with its own kernel per sample."""
        return torch.cat(self.forward_blocks([x]))

    def forward_blocks(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Convolve blocks of one batch; the attention branch's BatchNorm sees the whole batch.

        Equals :meth:`forward` on the concatenated blocks, one block at a time.
        """
        dtype = self.weight.dtype
        k, s = self.kernel_size, self.stride
        _, c, h, w = blocks[0].shape
        if not (s == k and self.padding == 0 and h % k == 0 and w % k == 0):
            pooled = torch.cat([x.sum(dim=(2, 3), dtype=dtype) / (h * w) for x in blocks])
            kernels = torch.split(self.sample_kernels(pooled), [len(x) for x in blocks])
            return [self._grouped_conv(x.to(dtype), kernel) for x, kernel in zip(blocks, kernels)]
        with torch.no_grad():
            tiles = [_tiles(x, k, dtype) for x in blocks]  # (b, tiles, C·k·k) each
        pooled = torch.cat([t.mean(dim=1).view(len(t), c, k * k).mean(dim=2) for t in tiles])
        kernels = torch.split(self.sample_kernels(pooled).flatten(2).transpose(1, 2), [len(x) for x in blocks])
        outputs = []
        for x, block_tiles, kernel in zip(blocks, tiles, kernels):
            out = _TileMatmul.apply(x, block_tiles, kernel, k)  # (b, tiles, out)
            # (b, H', W', out) is channels-last memory: hand it on as NCHW without a copy.
            outputs.append(out.view(len(x), h // k, w // k, self.out_channels).permute(0, 3, 1, 2))
        return outputs

    def _grouped_conv(self, x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        out = F.conv2d(
            x.reshape(1, b * c, h, w),
            kernels.reshape(b * self.out_channels, c, self.kernel_size, self.kernel_size),
            stride=self.stride,
            padding=self.padding,
            groups=b,
        )
        return out.view(b, self.out_channels, out.shape[-2], out.shape[-1])

    def extra_repr(self) -> str:
        """Shape and attention settings, for ``print(module)``."""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, kernel_num={self.kernel_num}, temperature={self.temperature:g}"
        )
