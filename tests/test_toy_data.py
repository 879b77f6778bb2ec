import math

import pytest
import torch

from course.sde import VESDE, VPSDE
from course.toy_data import (
    TOY_NAMES,
    GaussianMixture,
    eight_gaussians,
    gaussian,
    get_toy,
    oracle_score,
    two_class_mixture,
)


@pytest.mark.parametrize("name", TOY_NAMES)
def test_every_toy_samples_reproducibly(name):
    toy = get_toy(name)
    a = toy.sample(300, generator=torch.Generator().manual_seed(3))
    b = toy.sample(300, generator=torch.Generator().manual_seed(3))
    assert a.shape == (300, 2) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    c = toy.sample(300, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a, c)


def test_unknown_toy_and_bad_n():
    with pytest.raises(ValueError, match="unknown toy distribution 'circles'"):
        get_toy("circles")
    with pytest.raises(ValueError, match="n >= 1"):
        eight_gaussians().sample(0)


def test_mixture_log_prob_integrates_to_one():
    data = eight_gaussians(std=0.3)
    grid = torch.linspace(-4, 4, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    mass = data.log_prob(pts).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(mass.item() - 1) < 1e-4


@pytest.mark.parametrize("path", [VPSDE(), VESDE()], ids=["VP", "VE"])
def test_perturbed_score_equals_autograd_of_perturbed_log_density(path, gen):
    data = eight_gaussians()
    x = (2.5 * torch.randn(128, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    t = torch.rand(128, generator=gen, dtype=torch.float64)
    logp = data.perturbed_log_prob(x, t, path)
    auto = torch.autograd.grad(logp.sum(), x)[0]
    torch.testing.assert_close(data.perturbed_score(x, t, path), auto, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(oracle_score(data, path)(x, t), auto, rtol=1e-10, atol=1e-10)


def test_perturbed_marginal_matches_gaussian_closed_form(gen):
    """One Gaussian N(m, s^2 I) under VP: p_t = N(alpha m, (alpha^2 s^2 + sigma^2) I)."""
    m, s = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.7
    path, data = VPSDE(), gaussian(m, s)
    x = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(50, generator=gen, dtype=torch.float64)
    a, sig = path.alpha(t)[:, None], path.sigma(t)[:, None]
    ref = torch.distributions.Normal(a * m, torch.sqrt(a**2 * s**2 + sig**2)).log_prob(x).sum(1)
    torch.testing.assert_close(data.perturbed_log_prob(x, t, path), ref)
    torch.testing.assert_close(data.perturbed_score(x, t, path), (a * m - x) / (a**2 * s**2 + sig**2))


def test_mixture_moments_match_samples(gen):
    data = GaussianMixture([[0.0, 0.0], [3.0, 1.0]], [0.5, 1.0], weights=[0.25, 0.75])
    x = data.sample(200_000, generator=gen).double()
    mean, cov = data.mean(), data.covariance()
    se = torch.sqrt(torch.diagonal(cov) / x.shape[0])
    assert ((x.mean(0) - mean).abs() < 4 * se).all()
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0.02, atol=0.02)


def test_mixture_weights_are_respected(gen):
    data = GaussianMixture([[-5.0, 0.0], [5.0, 0.0]], 0.1, weights=[0.2, 0.8])
    x = data.sample(100_000, generator=gen)
    frac = (x[:, 0] > 0).double().mean().item()
    assert abs(frac - 0.8) < 4 * math.sqrt(0.8 * 0.2 / 100_000)


def test_labelled_mixture_and_conditioning(gen):
    data = two_class_mixture()
    x, y = data.sample_labelled(4000, generator=gen)
    assert set(y.tolist()) == {0, 1} and data.num_classes == 2
    # Every class-0 sample is closest to a class-0 mode.
    nearest = torch.cdist(x.double(), data.means).argmin(1)
    assert torch.equal(data.labels[nearest], y)
    cond = data.condition(1)
    assert len(cond.weights) == 4 and torch.all(cond.labels == 1)
    torch.testing.assert_close(cond.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="no class labels"):
        eight_gaussians().sample_labelled(3)
    with pytest.raises(ValueError, match="no component has label 5"):
        data.condition(5)


def test_mixture_constructor_validation():
    with pytest.raises(ValueError, match=r"means of shape \(K, D\)"):
        GaussianMixture([1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="stds > 0"):
        GaussianMixture([[1.0, 2.0]], -1.0)
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        eight_gaussians().log_prob(torch.zeros(3, 3))
