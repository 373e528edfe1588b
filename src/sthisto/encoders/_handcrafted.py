"""Colour and texture features of H&E patches, computed on whole batches without any weights.

The features follow the definitions of squidpy's ``calculate_image_features`` ("summary",
"histogram" and "texture" feature sets, see ``squidpy.im.ImageContainer.features_*``) so that
numbers are comparable with a squidpy analysis, but are computed for a whole batch of patches
at once in torch (CPU or GPU) instead of patch by patch:

* everything is derived from one 256-level histogram per patch and channel (quantiles, mean,
  standard deviation, binned histogram);
* grey-level co-occurrence statistics are computed from the shifted pixel pairs directly,
  which equals building the 256 × 256 co-occurrence matrix (scikit-image's ``graycomatrix``
  with ``levels=256, symmetric=False``) and reducing it with ``graycoprops``. squidpy's fifth
  default property, the angular second moment (ASM), is left out: it needs the full 256 × 256
  pair counts of every patch, which cost more than all other features together.

Feature order (93 values; names in :data:`HANDCRAFTED_FEATURE_NAMES`), channels ``c`` = 0, 1,
2 = R, G, B, pixel values 0–255:

1. ``summary`` (15): per channel, the 0.9, 0.5 and 0.1 quantiles (NumPy's linear
   interpolation), the mean and the standard deviation (population, ``ddof=0``).
2. ``histogram`` (30): per channel, the fraction of pixels in each of 10 equal bins over the
   fixed range [0, 255] (last bin closed). squidpy counts pixels over each image's own value
   range; fixed edges and fractions keep patches of different slides comparable.
3. ``texture`` (48): per channel, for each property ``contrast``, ``dissimilarity``,
   ``homogeneity``, ``correlation`` and each angle 0, π/4, π/2, 3π/4 at distance 1
   (scikit-image offsets: (row, col) = (0, 1), (1, 1), (1, 0), (1, −1)), the value of
   ``skimage.feature.graycoprops`` on the normalised co-occurrence matrix (correlation is 1 when
   a side of the pairs is constant, as in scikit-image).
"""

from __future__ import annotations

import math

import torch
from torch import nn

QUANTILES = (0.9, 0.5, 0.1)
HISTOGRAM_BINS = 10
TEXTURE_PROPERTIES = ("contrast", "dissimilarity", "homogeneity", "correlation")
TEXTURE_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
TEXTURE_DISTANCE = 1
_LEVELS = 256


def _feature_names() -> tuple[str, ...]:
    names: list[str] = []
    for c in range(3):
        names += [f"summary_ch-{c}_quantile-{q}" for q in QUANTILES]
        names += [f"summary_ch-{c}_mean", f"summary_ch-{c}_std"]
    for c in range(3):
        names += [f"histogram_ch-{c}_bin-{i}" for i in range(HISTOGRAM_BINS)]
    for c in range(3):
        for prop in TEXTURE_PROPERTIES:
            names += [f"texture_ch-{c}_{prop}_dist-{TEXTURE_DISTANCE}_angle-{a:.2f}" for a in TEXTURE_ANGLES]
    return tuple(names)


HANDCRAFTED_FEATURE_NAMES: tuple[str, ...] = _feature_names()
"""Names of the 93 handcrafted features, in output order (squidpy's naming)."""


def _offsets(distance: int = TEXTURE_DISTANCE) -> list[tuple[int, int]]:
    # scikit-image's convention: row offset round(sin(angle) * d), column offset round(cos(angle) * d)
    return [(round(math.sin(a) * distance), round(math.cos(a) * distance)) for a in TEXTURE_ANGLES]


class HandcraftedFeatures(nn.Module):
    """Batch colour/texture features of RGB patches (no parameters; see the module docstring).

    ``forward`` takes ``(B, 3, H, W)`` float images with values 0–255 (rounded to 256 integer
    levels) and returns ``(B, 93)`` float32 features.
    """

    output_dim = len(HANDCRAFTED_FEATURE_NAMES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(images.shape)}")
        levels = images.float().round().clamp_(0, _LEVELS - 1)
        batch = levels.shape[0]
        with torch.autocast(levels.device.type, enabled=False):
            summary, histogram = self._intensity_features(levels)
            texture = self._texture_features(levels)
        return torch.cat(
            (summary.reshape(batch, -1), histogram.reshape(batch, -1), texture.reshape(batch, -1)), dim=1
        ).float()

    @staticmethod
    def _intensity_features(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, channels = levels.shape[:2]
        flat = levels.reshape(batch * channels, -1).long()
        n = flat.shape[1]
        counts = torch.zeros(batch * channels, _LEVELS, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(1, flat, torch.ones_like(flat))
        values = torch.arange(_LEVELS, device=flat.device, dtype=torch.float64)
        freq = counts.double() / n
        mean = freq @ values
        var = (freq @ values.square() - mean.square()).clamp_(min=0)
        # k-th smallest value = first level whose cumulative count exceeds k
        cumulative = counts.cumsum(1)
        q = torch.tensor(QUANTILES, dtype=torch.float64, device=flat.device)
        position = q * (n - 1)
        low = position.floor()
        frac = position - low
        ranks = torch.stack((low, (low + 1).clamp(max=n - 1))).long()  # (2, Q)
        queries = ranks.T.reshape(1, -1).expand(batch * channels, -1).contiguous()
        order_stats = torch.searchsorted(cumulative, queries, right=True).double().view(-1, len(QUANTILES), 2)
        quantiles = order_stats[..., 0] + frac * (order_stats[..., 1] - order_stats[..., 0])
        summary = torch.cat((quantiles, mean[:, None], var.sqrt()[:, None]), dim=1).view(batch, channels, -1)
        bin_of_level = (torch.arange(_LEVELS, device=flat.device) * HISTOGRAM_BINS // (_LEVELS - 1)).clamp(
            max=HISTOGRAM_BINS - 1
        )
        histogram = torch.zeros(batch * channels, HISTOGRAM_BINS, dtype=torch.float64, device=flat.device)
        histogram.index_add_(1, bin_of_level, freq)
        return summary, histogram.view(batch, channels, -1)

    @staticmethod
    def _texture_features(levels: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = levels.shape
        n_planes = batch * channels
        planes = levels.reshape(n_planes, height, width).double()
        device = planes.device
        distance = torch.arange(_LEVELS, device=device, dtype=torch.float64)
        # contrast, dissimilarity, homogeneity as weights on the |i - j| distribution
        weights = torch.stack((distance.square(), distance, 1.0 / (1.0 + distance.square())), dim=1)
        plane_offsets = torch.arange(n_planes, device=device)[:, None]
        per_offset = []
        for d_row, d_col in _offsets():
            rows = slice(0, height - d_row)
            cols_a = slice(max(0, -d_col), width - max(0, d_col))
            cols_b = slice(max(0, d_col), width - max(0, -d_col))
            first = planes[:, rows, cols_a].reshape(n_planes, -1)
            second = planes[:, d_row:, cols_b].reshape(n_planes, -1)
            n_pairs = first.shape[1]
            # Integer sums are exact; floats enter only for the final ratios.
            abs_diff = (first - second).abs_().long()
            diff_counts = torch.bincount((abs_diff + plane_offsets * _LEVELS).view(-1), minlength=n_planes * _LEVELS)
            diff_freq = diff_counts.view(n_planes, _LEVELS).double() / n_pairs
            contrast, dissimilarity, homogeneity = (diff_freq @ weights).unbind(1)
            sum_a, sum_b = first.sum(1), second.sum(1)
            mean_a, mean_b = sum_a / n_pairs, sum_b / n_pairs
            var_a = (first * first).sum(1) / n_pairs - mean_a.square()
            var_b = (second * second).sum(1) / n_pairs - mean_b.square()
            cov = (first * second).sum(1) / n_pairs - mean_a * mean_b
            std_a, std_b = var_a.clamp_min(0).sqrt(), var_b.clamp_min(0).sqrt()
            # integer levels: a non-constant side has variance ≥ (n - 1) / n² > 0
            constant = (std_a < 1e-9) | (std_b < 1e-9)
            correlation = torch.where(constant, torch.ones_like(cov), cov / (std_a * std_b).clamp_min(1e-30))
            per_offset.append(torch.stack((contrast, dissimilarity, homogeneity, correlation), dim=1))
        # (planes, props, angles) → (batch, channels, props, angles)
        return torch.stack(per_offset, dim=2).view(batch, channels, len(TEXTURE_PROPERTIES), len(TEXTURE_ANGLES))
