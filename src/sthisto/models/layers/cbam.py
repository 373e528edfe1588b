"""Convolutional block attention module (Woo et al., ECCV 2018).

Channel attention (a shared bottleneck MLP over the average- and max-pooled descriptors)
followed by spatial attention (a 7 × 7 convolution over the channel-wise average and maximum
maps), each applied multiplicatively.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelAttention(nn.Module):
    """Per-channel gate ``σ(MLP(avgpool x) + MLP(maxpool x))``.

    Parameters
    ----------
    channels
        Input channels.
    reduction
        Bottleneck ratio of the shared MLP (hidden width ``max(1, channels // reduction)``).
    """

    def __init__(self, channels: int, *, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        # 1 × 1 convolutions without bias: the bottleneck MLP as CBAM defines it.
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate ``(batch, channels, H, W)`` channel-wise."""
        pooled = torch.cat((x.mean(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)), dim=0)
        scores = self.mlp(pooled)
        batch = x.shape[0]
        return x * torch.sigmoid(scores[:batch] + scores[batch:])


class SpatialAttention(nn.Module):
    """Per-position gate ``σ(conv([mean_c x, max_c x]))``.

    Parameters
    ----------
    kernel_size
        Side of the (odd) convolution kernel; padding keeps the map size.
    """

    def __init__(self, *, kernel_size: int = 7) -> None:
        super().__init__()
        # With a bias, as the HGGEF authors' CBAM (its parameter count includes it).
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate ``(batch, channels, H, W)`` position-wise."""
        summary = torch.cat((x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)), dim=1)
        return x * torch.sigmoid(self.conv(summary))


class CBAM(nn.Module):
    """Channel attention then spatial attention.

    Parameters
    ----------
    channels
        Input channels.
    reduction
        Channel-MLP bottleneck ratio (16 in CBAM and HGGEF).
    spatial_kernel
        Spatial-attention kernel side (7 in CBAM and HGGEF).
    """

    def __init__(self, channels: int, *, reduction: int = 16, spatial_kernel: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction=reduction)
        self.spatial = SpatialAttention(kernel_size=spatial_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Refine ``(batch, channels, H, W)``."""
        return self.spatial(self.channel(x))
