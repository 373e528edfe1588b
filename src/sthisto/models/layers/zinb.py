"""Zero-inflated negative binomial (ZINB) output heads and likelihood, in the DCA form.

A count ``x`` is zero with probability ``π`` ("dropout") and otherwise drawn from a negative
binomial with mean ``μ`` and inverse dispersion ``θ`` (variance ``μ + μ²/θ``):

``P(x) = π·[x = 0] + (1 − π)·NB(x; μ, θ)``,
``NB(x; μ, θ) = Γ(x + θ) / (Γ(θ)·x!) · (θ/(θ + μ))^θ · (μ/(θ + μ))^x``.

The heads follow DCA (Eraslan et al. 2019): mean ``exp`` clamped to [1e-5, 1e6], dispersion
``softplus`` clamped to [1e-4, 1e4], dropout ``sigmoid``. The library size enters as a
per-spot size factor that scales the mean.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..._errors import InputError

MEAN_RANGE = (1e-5, 1e6)
DISPERSION_RANGE = (1e-4, 1e4)
_LOG_MEAN_RANGE = (math.log(MEAN_RANGE[0]), math.log(MEAN_RANGE[1]))
# Guards the logarithms of π and 1 − π (sigmoid saturates to exactly 0 or 1 in float32).
_EPS = 1e-10


class ZINBHeads(nn.Module):
    """Three linear heads giving the ZINB mean, dispersion and dropout per gene.

    Parameters
    ----------
    dim
        Input width.
    n_genes
        Number of genes.
    """

    def __init__(self, dim: int, n_genes: int) -> None:
        super().__init__()
        self.mean = nn.Linear(dim, n_genes)
        self.dispersion = nn.Linear(dim, n_genes)
        self.dropout = nn.Linear(dim, n_genes)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map ``(N, dim)`` to ``{"mean", "dispersion", "dropout"}``, each ``(N, n_genes)``."""
        # Clamping the logit before exp (rather than exp then clamp) gives the same values but
        # keeps the gradient finite where exp would overflow.
        mean = torch.exp(self.mean(h).clamp(*_LOG_MEAN_RANGE))
        dispersion = F.softplus(self.dispersion(h)).clamp(*DISPERSION_RANGE)
        dropout = torch.sigmoid(self.dropout(h))
        return {"mean": mean, "dispersion": dispersion, "dropout": dropout}


def zinb_negative_log_likelihood(
    counts: torch.Tensor,
    mean: torch.Tensor,
    dispersion: torch.Tensor,
    dropout: torch.Tensor,
    *,
    size_factors: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative log-likelihood of counts under a zero-inflated negative binomial.

    Parameters
    ----------
    counts
        Observed non-negative counts ``(N, G)`` (need not be integers after scaling, but the
        likelihood is a pmf only for integers).
    mean
        NB mean μ before size-factor scaling, ``(N, G)``.
    dispersion
        NB inverse dispersion θ, ``(N, G)``.
    dropout
        Zero-inflation probability π, ``(N, G)``.
    size_factors
        Optional per-spot size factors ``(N,)``; the NB mean becomes ``μ · s``.
    reduction
        ``"mean"`` (DCA's average over all entries), ``"sum"`` or ``"none"``.

    Returns
    -------
    The reduced negative log-likelihood (a scalar), or per-entry values for ``"none"``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise InputError(f"reduction={reduction!r}; use 'mean', 'sum' or 'none'.")
    if not (counts.shape == mean.shape == dispersion.shape == dropout.shape):
        raise InputError(
            "counts, mean, dispersion and dropout must share one (n_spots, n_genes) shape; got "
            f"{tuple(counts.shape)}, {tuple(mean.shape)}, {tuple(dispersion.shape)}, {tuple(dropout.shape)}."
        )
    if size_factors is not None:
        if size_factors.shape != counts.shape[:1]:
            raise InputError(
                f"size_factors has shape {tuple(size_factors.shape)}; expected ({counts.shape[0]},), one per spot."
            )
        # A spot without counts in the selected genes has size factor 0: its expected counts are
        # 0, and log(0) would turn the (unselected) non-zero branch into 0 · (−inf) = NaN, whose
        # gradient torch.where still propagates. The floor changes no value a head can produce.
        mean = (mean * size_factors.unsqueeze(-1)).clamp_min(_EPS)
    theta = dispersion
    log_theta_mu = torch.log(theta + mean)
    # −log NB(x; μ, θ), written with log-gamma functions.
    nb_nll = (
        torch.lgamma(theta)
        + torch.lgamma(counts + 1.0)
        - torch.lgamma(counts + theta)
        - theta * torch.log(theta)
        - counts * torch.log(mean)
        + (theta + counts) * log_theta_mu
    )
    nonzero_nll = nb_nll - torch.log((1.0 - dropout).clamp_min(_EPS))
    log_nb_zero = theta * (torch.log(theta) - log_theta_mu)  # log NB(0; μ, θ) = θ log(θ/(θ+μ))
    zero_nll = -torch.logaddexp(
        torch.log(dropout.clamp_min(_EPS)), torch.log((1.0 - dropout).clamp_min(_EPS)) + log_nb_zero
    )
    nll = torch.where(counts < 0.5, zero_nll, nonzero_nll)
    if reduction == "mean":
        return nll.mean()
    if reduction == "sum":
        return nll.sum()
    return nll
