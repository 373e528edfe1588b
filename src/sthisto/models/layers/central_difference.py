"""Central-difference convolution (Yu et al., CDCN 2020), as HGGEF's gradient branch uses it.

The response at a pixel ``p0`` is ``Σ_n w(p_n)·x(p0 + p_n) − θ·x(p0)·Σ_n w(p_n)``: a plain
convolution blended with one applied to the differences ``x(p0 + p_n) − x(p0)``. With θ = 0
it is an ordinary convolution; with θ = 1 it responds only to intensity changes (a constant
image gives zero away from the zero-padded border). Because the subtracted term multiplies the
centre pixel, it can be folded into the kernel's centre tap, so the layer costs one
convolution.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from ..._errors import InputError

# Taps of a 3 × 3 kernel (row-major indices) that a plus-shaped kernel keeps: top, left,
# centre, right, bottom.
_CROSS_TAPS = (1, 3, 4, 5, 7)
_CENTRE_TAP = 4


class CentralDifferenceConv2d(nn.Module):
    """3 × 3 central-difference convolution.

    Parameters
    ----------
    in_channels, out_channels
        Channel counts.
    stride
        Convolution stride (padding is 1, so the output side is ``ceil(side / stride)``).
    theta
        Weight θ of the difference term; 0 gives a plain convolution.
    kernel
        ``"full"``: all nine taps are learned (CDCN's definition over the 3 × 3
        neighbourhood). ``"cross"``: only the five plus-shaped taps (centre and its four direct
        neighbours) are learned and the corners are zero, as in the HGGEF authors' code.
    bias
        Add a learned per-channel bias (not part of the difference term).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        theta: float = 0.7,
        kernel: Literal["full", "cross"] = "full",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if kernel not in ("full", "cross"):
            raise InputError(f"kernel={kernel!r}; use 'full' (3 × 3, CDCN) or 'cross' (plus-shaped, the HGGEF code's).")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.theta = float(theta)
        self.kernel = kernel
        n_taps = 9 if kernel == "full" else len(_CROSS_TAPS)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, n_taps))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        if kernel == "cross":
            placement = torch.zeros(len(_CROSS_TAPS), 9)
            placement[torch.arange(len(_CROSS_TAPS)), torch.tensor(_CROSS_TAPS)] = 1.0
            self.register_buffer("_placement", placement, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like :class:`torch.nn.Conv2d` with the layer's own fan-in."""
        fan_in = self.in_channels * self.weight.shape[-1]
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def spatial_kernel(self) -> torch.Tensor:
        """The learned taps laid out as an ``(out, in, 3, 3)`` kernel (zeros at unused taps)."""
        taps = self.weight if self.kernel == "full" else self.weight @ self._placement
        return taps.view(self.out_channels, self.in_channels, 3, 3)

    def effective_kernel(self) -> torch.Tensor:
        """The single kernel equivalent to the central-difference response."""
        kernel = self.spatial_kernel()
        if self.theta == 0.0:
            return kernel
        centre_shift = torch.zeros(9, device=kernel.device, dtype=kernel.dtype)
        centre_shift[_CENTRE_TAP] = 1.0
        total = kernel.sum(dim=(2, 3), keepdim=True)
        return kernel - self.theta * total * centre_shift.view(1, 1, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``(batch, in_channels, H, W)``."""
        return F.conv2d(x, self.effective_kernel(), self.bias, stride=self.stride, padding=1)

    def extra_repr(self) -> str:
        """Settings shown by ``repr``."""
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, theta={self.theta}, "
            f"kernel={self.kernel!r}, bias={self.bias is not None}"
        )
