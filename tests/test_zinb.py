"""ZINB heads and likelihood against a direct scipy evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from sthisto._errors import InputError
from sthisto.models.layers.zinb import DISPERSION_RANGE, MEAN_RANGE, ZINBHeads, zinb_negative_log_likelihood


def _direct_nll(counts, mean, theta, pi):
    """−log of π·[x=0] + (1−π)·NB(x; μ, θ), NB from scipy (n = θ, p = θ/(θ+μ))."""
    log_nb = stats.nbinom.logpmf(counts, theta, theta / (theta + mean))
    zero = -np.log(pi + (1 - pi) * np.exp(log_nb))
    nonzero = -(np.log1p(-pi) + log_nb)
    return np.where(counts == 0, zero, nonzero)


@pytest.fixture
def zinb_inputs():
    rng = np.random.default_rng(7)
    shape = (40, 25)
    mean = np.exp(rng.uniform(np.log(0.01), np.log(500.0), shape))
    theta = np.exp(rng.uniform(np.log(0.05), np.log(200.0), shape))
    pi = rng.uniform(0.01, 0.95, shape)
    counts = rng.negative_binomial(theta, theta / (theta + mean)).astype(float)
    counts[rng.random(shape) < 0.3] = 0.0  # extra zeros
    counts[0, :5] = [1000.0, 5000.0, 20000.0, 1.0, 2.0]  # large counts
    size_factors = rng.uniform(0.3, 3.0, shape[0])
    return counts, mean, theta, pi, size_factors


def test_nll_matches_scipy_per_entry(zinb_inputs):
    counts, mean, theta, pi, _ = zinb_inputs
    assert (counts == 0).any() and counts.max() >= 20000
    ours = zinb_negative_log_likelihood(*(torch.from_numpy(a) for a in (counts, mean, theta, pi)), reduction="none")
    np.testing.assert_allclose(ours.numpy(), _direct_nll(counts, mean, theta, pi), rtol=1e-7, atol=1e-8)


def test_size_factors_scale_the_mean_and_reductions(zinb_inputs):
    counts, mean, theta, pi, size_factors = zinb_inputs
    tensors = [torch.from_numpy(a) for a in (counts, mean, theta, pi)]
    sf = torch.from_numpy(size_factors)
    expected = _direct_nll(counts, mean * size_factors[:, None], theta, pi)
    np.testing.assert_allclose(
        zinb_negative_log_likelihood(*tensors, size_factors=sf).item(), expected.mean(), rtol=1e-9
    )
    np.testing.assert_allclose(
        zinb_negative_log_likelihood(*tensors, size_factors=sf, reduction="sum").item(), expected.sum(), rtol=1e-9
    )


def test_float32_is_finite_and_close(zinb_inputs):
    counts, mean, theta, pi, _ = zinb_inputs
    ours = zinb_negative_log_likelihood(*(torch.from_numpy(a).float() for a in (counts, mean, theta, pi)))
    assert torch.isfinite(ours)
    np.testing.assert_allclose(ours.item(), _direct_nll(counts, mean, theta, pi).mean(), rtol=1e-4)


def test_heads_ranges_and_finite_gradients():
    torch.manual_seed(0)
    heads = ZINBHeads(8, 5)
    h = torch.randn(6, 8) * 200.0  # saturates every activation
    h.requires_grad_(True)
    out = heads(h)
    assert set(out) == {"mean", "dispersion", "dropout"}
    assert out["mean"].min() >= MEAN_RANGE[0] * (1 - 1e-6) and out["mean"].max() <= MEAN_RANGE[1] * (1 + 1e-6)
    assert out["dispersion"].min() >= DISPERSION_RANGE[0] and out["dispersion"].max() <= DISPERSION_RANGE[1]
    assert ((out["dropout"] >= 0) & (out["dropout"] <= 1)).all()
    counts = torch.poisson(torch.full((6, 5), 3.0))
    nll = zinb_negative_log_likelihood(counts, out["mean"], out["dispersion"], out["dropout"])
    nll.backward()
    assert torch.isfinite(nll) and torch.isfinite(h.grad).all()


def test_bad_shapes_raise():
    x = torch.ones(3, 4)
    with pytest.raises(InputError, match="shape"):
        zinb_negative_log_likelihood(x, torch.ones(3, 5), x, x * 0.5)
    with pytest.raises(InputError, match="size_factors"):
        zinb_negative_log_likelihood(x, x, x, x * 0.5, size_factors=torch.ones(4))
    with pytest.raises(InputError, match="reduction"):
        zinb_negative_log_likelihood(x, x, x, x * 0.5, reduction="max")


def test_a_spot_without_counts_keeps_the_loss_and_gradients_finite():
    # her2st C2 has a spot with no counts in the 785 selected genes: its size factor is 0.
    torch.manual_seed(0)
    heads = ZINBHeads(8, 5)
    h = torch.randn(4, 8, requires_grad=True)
    out = heads(h)
    counts = torch.poisson(torch.full((4, 5), 3.0))
    counts[1] = 0.0
    size_factors = torch.tensor([1.2, 0.0, 0.8, 1.0])
    nll = zinb_negative_log_likelihood(counts, **out, size_factors=size_factors, reduction="none")
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(h.grad).all()
    # with no expected counts, a zero count is certain: only the zero-inflation term is left
    np.testing.assert_allclose(nll[1].detach().numpy(), np.zeros(5), atol=1e-6)
