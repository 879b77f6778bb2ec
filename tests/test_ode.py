"""The probability-flow ODE and likelihoods against closed forms."""

import math

import pytest
import torch

from course.ode import (
    bits_per_dim,
    exact_divergence,
    hutchinson_divergence,
    log_likelihood,
    sample_ode_euler,
    sample_ode_heun,
    solve_ode,
)
from course.samplers import time_grid
from course.sde import VESDE, VPSDE
from course.toy_data import eight_gaussians, gaussian, oracle_score

M, S = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.5


def flow_map(sde, x0, t):
    """The PF-ODE solution for N(M, S^2 I) data: x_t = alpha M + sqrt(alpha^2 S^2 + sigma^2) (x0 - M) / S."""
    t = torch.as_tensor(t, dtype=torch.float64)
    a, sig = sde.alpha(t), sde.sigma(t)
    return a * M + torch.sqrt(a**2 * S**2 + sig**2) * (x0 - M) / S


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["VP", "VE"])
def test_adaptive_solver_matches_the_closed_form_flow(sde, gen):
    score = oracle_score(gaussian(M, S), sde)
    x0 = M + S * torch.randn(200, 2, generator=gen, dtype=torch.float64)
    x1 = flow_map(sde, x0, 1.0)
    v = lambda x, t: sde.probability_flow_drift(x, t, score)  # noqa: E731
    back = solve_ode(v, x1, 1.0, 1e-3, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(back.x, flow_map(sde, x0, 1e-3), rtol=0, atol=1e-5)
    assert back.nfe > 0


def test_euler_is_first_order_and_heun_second_order():
    """Doubling the steps halves Euler's error and quarters Heun's (Gaussian data, VP)."""
    sde = VPSDE()
    score = oracle_score(gaussian(M, S), sde)
    x0 = M + S * torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x1, target = flow_map(sde, x0, 1.0), flow_map(sde, x0, 0.05)
    for sampler, order in [(sample_ode_euler, 1), (sample_ode_heun, 2)]:
        errors = [(sampler(score, x1, time_grid(n, t_min=0.05), sde=sde) - target).abs().max().item()
                  for n in (200, 400, 800)]
        for coarse, fine in zip(errors, errors[1:], strict=False):
            assert 2**order * 0.85 < coarse / fine < 2**order * 1.15, (sampler.__name__, errors)


def test_log_likelihood_of_gaussian_data_is_exact(gen):
    """Zero-mean Gaussian data under VP: the computed log-density equals the closed form to
    1e-3 nats (the VP prior N(0, I) is then the true p_1 up to alpha(1)^2 ~ 4e-5)."""
    sde, s, t_min = VPSDE(), 0.7, 1e-5
    data = gaussian((0.0, 0.0), s)
    x = s * torch.randn(50, 2, generator=gen, dtype=torch.float64)
    res = log_likelihood(oracle_score(data, sde), x, sde=sde, t_min=t_min)
    truth = data.perturbed_log_prob(x, t_min, sde)
    assert (res.log_prob - truth).abs().max() < 1e-3


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["VP", "VE"])
def test_change_of_variables_is_exact_given_the_true_p1(sde, gen):
    """With a non-zero mean the prior is not exactly p_1; adding the true log p_1(x_1) to the
    integrated divergence recovers the closed-form log p_{t_min} to 1e-4 nats."""
    data, t_min = gaussian(M, S), 1e-4
    x = M + S * torch.randn(30, 2, generator=gen, dtype=torch.float64)
    res = log_likelihood(oracle_score(data, sde), x, sde=sde, t_min=t_min)
    true_p1 = data.perturbed_log_prob(res.x_end, 1.0, sde)
    assert ((res.delta + true_p1) - data.perturbed_log_prob(x, t_min, sde)).abs().max() < 1e-4


def test_log_likelihood_of_the_mixture_with_the_oracle_score(gen):
    sde, data, t_min = VPSDE(), eight_gaussians(), 1e-3
    x = data.sample(20, generator=gen).double()
    res = log_likelihood(oracle_score(data, sde), x, sde=sde, t_min=t_min)
    assert (res.log_prob - data.perturbed_log_prob(x, t_min, sde)).abs().max() < 1e-3


def test_hutchinson_is_unbiased(gen):
    """Averaged over many Rademacher or Gaussian probes, the estimate equals the exact divergence
    within 4 standard errors, sample by sample."""
    sde = VPSDE()
    score = oracle_score(eight_gaussians(), sde)
    v = lambda x, t: sde.probability_flow_drift(x, t, score)  # noqa: E731
    x = 2 * torch.randn(8, 2, generator=gen, dtype=torch.float64)
    t = torch.full((8,), 0.2, dtype=torch.float64)
    _, exact = exact_divergence(v, x, t)
    for kind in ("rademacher", "gaussian"):
        k = 2000
        if kind == "gaussian":
            probes = torch.randn(k, 8, 2, generator=gen, dtype=torch.float64)
        else:
            probes = torch.randint(0, 2, (k, 8, 2), generator=gen).double() * 2 - 1
        singles = torch.stack([hutchinson_divergence(v, x, t, p[None])[1] for p in probes[:200]])
        _, est = hutchinson_divergence(v, x, t, probes)
        se = singles.std(0) / math.sqrt(k)
        assert ((est - exact).abs() <= 4 * se + 1e-12).all(), (kind, est, exact, se)


def test_exact_divergence_of_a_linear_field():
    """div of v(x) = A x is trace(A), on points and image shapes."""
    for shape in [(5, 3), (2, 1, 4, 4)]:
        d = int(torch.tensor(shape[1:]).prod())
        a = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        v = lambda x, t, a=a: (x.flatten(1) @ a.T).reshape(x.shape)  # noqa: E731
        x = torch.randn(shape, dtype=torch.float64)
        _, div = exact_divergence(v, x, torch.zeros(shape[0], dtype=torch.float64))
        torch.testing.assert_close(div, torch.full((shape[0],), a.trace().item(), dtype=torch.float64))


def test_bits_per_dim_of_a_uniform_density():
    """Uniform on [-1, 1]^D has log p = -D log 2: exactly 8 bits per dimension at 256 levels."""
    d = 784
    assert bits_per_dim(torch.tensor([-d * math.log(2.0)]), d).item() == pytest.approx(8.0)


def test_bad_arguments():
    sde, x = VPSDE(), torch.zeros(3, 2, dtype=torch.float64)
    score = oracle_score(gaussian((0.0, 0.0), 1.0), sde)
    with pytest.raises(ValueError, match="unknown divergence"):
        log_likelihood(score, x, sde=sde, divergence="trace")
    with pytest.raises(ValueError, match="unknown probe"):
        log_likelihood(score, x, sde=sde, divergence="hutchinson", probe="uniform")
    with pytest.raises(ValueError, match="probes of shape"):
        hutchinson_divergence(lambda a, b: a, x, torch.zeros(3), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="decreasing"):
        sample_ode_euler(score, x, torch.linspace(0, 1, 4), sde=sde)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        solve_ode(lambda a, b: a, x, 1.0, -0.5)
