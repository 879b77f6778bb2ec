"""The SDE classes against truth: Monte Carlo, exact recursions and the Fokker-Planck equation."""

import math

import pytest
import torch

from course.sde import SDE, VESDE, VPSDE, SubVPSDE, get_sde
from course.simulate import compare_with_marginal, euler_maruyama_step, simulate_forward
from course.toy_data import eight_gaussians, gaussian, oracle_score
from tests.conftest import SHAPES

SDES = [VESDE(), VPSDE(), SubVPSDE()]
IDS = [s.name for s in SDES]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_marginals_match_monte_carlo_euler_maruyama(sde, gen):
    """1e5 particles x 2 dims: (x_t - alpha x_0)/sigma must be N(0, 1) within 4 standard errors
    at every saved t. 2000 steps keep the EM bias below about one standard error."""
    x0 = eight_gaussians().sample(100_000, generator=gen)
    traj = simulate_forward(sde, x0, n_steps=2000, save_every=400, generator=gen)
    rows = compare_with_marginal(sde, x0, traj, n_se=4.0)
    assert len(rows) == 5
    for row in rows:
        assert row.ok, str(row)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_wrong_marginal_is_detected(sde, gen):
    """The Monte Carlo comparison has power: a kernel with 3% too much noise fails it."""

    class Inflated(type(sde)):
        def sigma(self, t):
            return 1.03 * super().sigma(t)

    bad = Inflated()
    x0 = eight_gaussians().sample(100_000, generator=gen)
    traj = simulate_forward(sde, x0, n_steps=200, save_every=100, generator=gen)
    assert not any(row.ok for row in compare_with_marginal(bad, x0, traj))


def test_one_em_step_matches_exact_recursion(gen):
    """From x ~ N(m, v I), one EM step of the VP SDE gives mean (1 - beta dt/2) m and variance
    (1 - beta dt/2)^2 v + beta dt: the discrete recursion, checked within 4 standard errors."""
    sde, n, dt, t = VPSDE(), 200_000, 0.01, 0.3
    m, v = 1.5, 0.4
    x = m + math.sqrt(v) * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    z = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    x1 = euler_maruyama_step(x, torch.full((n,), t, dtype=torch.float64), dt, sde.drift, sde.diffusion, z)
    beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
    mean_exact = (1 - 0.5 * beta * dt) * m
    var_exact = (1 - 0.5 * beta * dt) ** 2 * v + beta * dt
    assert abs(x1.mean().item() - mean_exact) < 4 * math.sqrt(var_exact / n)
    assert abs(x1.var().item() - var_exact) < 4 * var_exact * math.sqrt(2 / (n - 1))


def test_em_step_is_deterministic_given_noise():
    x = torch.randn(4, 2, dtype=torch.float64)
    z = torch.randn(4, 2, dtype=torch.float64)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    sde = VPSDE()
    expected = x + sde.drift(x, t) * 0.1 + sde.diffusion(t)[:, None] * math.sqrt(0.1) * z
    torch.testing.assert_close(euler_maruyama_step(x, t, 0.1, sde.drift, sde.diffusion, z), expected)
    with pytest.raises(ValueError, match="noise z of shape"):
        euler_maruyama_step(x, t, 0.1, sde.drift, sde.diffusion, z[:2])


def _grad(y, x):
    if not y.requires_grad:  # e.g. the VE drift, identically zero
        return torch.zeros_like(x)
    return torch.autograd.grad(y.sum(), x, create_graph=True, allow_unused=True, materialize_grads=True)[0]


def _divergence(v, x):
    return sum(_grad(v[:, i], x)[:, i] for i in range(x.shape[1]))


def _fokker_planck_terms(sde, data, x, t):
    """d/dt log p_t and the pieces of the right-hand sides, all by float64 autograd."""
    logp = data.perturbed_log_prob(x, t, sde)
    dlogp_dt = _grad(logp, t)
    s = _grad(logp, x)  # score
    lap = _divergence(s, x)  # Laplacian of log p
    return dlogp_dt, s, lap


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("data", [gaussian((0.5, -1.0), 0.7), eight_gaussians()], ids=["gauss", "mix"])
def test_closed_form_marginal_solves_fokker_planck(sde, data, gen):
    """d/dt log p = -div f - f . s + g^2/2 (lap log p + |s|^2): the closed-form marginal is
    consistent with drift and diffusion at random (x, t)."""
    x = (3 * torch.randn(64, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    t = (0.05 + 0.9 * torch.rand(64, generator=gen, dtype=torch.float64)).requires_grad_()
    dlogp_dt, s, lap = _fokker_planck_terms(sde, data, x, t)
    f = sde.drift(x, t)
    g2 = sde.diffusion(t) ** 2
    rhs = -_divergence(f, x) - (f * s).sum(1) + 0.5 * g2 * (lap + s.pow(2).sum(1))
    torch.testing.assert_close(dlogp_dt, rhs, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_probability_flow_and_reverse_drift_transport_the_marginals(sde, gen):
    """With the exact score, the PF-ODE velocity v solves the continuity equation
    d/dt log p = -div v - v . s, and the reverse-time drift b = f - g^2 s solves the backward
    Fokker-Planck equation d/dt log p = -div b - b . s - g^2/2 (lap log p + |s|^2)."""
    data = eight_gaussians()
    score = oracle_score(data, sde)
    x = (3 * torch.randn(64, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    t = (0.05 + 0.9 * torch.rand(64, generator=gen, dtype=torch.float64)).requires_grad_()
    dlogp_dt, s, lap = _fokker_planck_terms(sde, data, x, t)
    torch.testing.assert_close(score(x, t), s, rtol=1e-9, atol=1e-9)

    v = sde.probability_flow_drift(x, t, score)
    torch.testing.assert_close(dlogp_dt, -_divergence(v, x) - (v * s).sum(1), rtol=1e-7, atol=1e-7)

    b = sde.reverse_drift(x, t, score)
    g2 = sde.diffusion(t) ** 2
    rhs = -_divergence(b, x) - (b * s).sum(1) - 0.5 * g2 * (lap + s.pow(2).sum(1))
    torch.testing.assert_close(dlogp_dt, rhs, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_boundary_values_and_prior(sde):
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sde.alpha(t)[0], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(sde.sigma(t)[0], torch.tensor(0.0, dtype=torch.float64))
    # At t = 1 the kernel of zero data is (close to) the prior.
    assert abs(sde.sigma(t)[1].item() - sde.prior_std()) < 1e-3 * sde.prior_std()
    assert sde.alpha(t)[1].item() < 1e-2 or isinstance(sde, VESDE)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_prior_logp_matches_torch_distributions(sde, gen):
    z = sde.prior_sample((500, 3), generator=gen, dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, sde.prior_std()).log_prob(z).sum(1)
    torch.testing.assert_close(sde.prior_logp(z), ref)
    assert abs(z.std().item() / sde.prior_std() - 1) < 4 / math.sqrt(2 * z.numel())


def test_vp_preserves_variance_and_subvp_stays_below():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    vp, sub = VPSDE(), SubVPSDE()
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones_like(t))
    assert (sub.sigma(t) <= vp.sigma(t) + 1e-15).all()
    torch.testing.assert_close(sub.alpha(t), vp.alpha(t))


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rank_agnostic(sde, shape, gen):
    x = torch.randn(shape, generator=gen)
    t = torch.rand(shape[0], generator=gen)
    assert sde.drift(x, t).shape == shape
    mean, std = sde.marginal(x, t)
    assert mean.shape == shape and std.shape == (shape[0],)
    sample = sde.sample(x, t, generator=gen)
    assert sample.x_t.shape == shape
    # Per-sample results agree with a batch of one.
    b = shape[0] - 1
    torch.testing.assert_close(sde.drift(x, t)[b:], sde.drift(x[b:], t[b:]))
    torch.testing.assert_close(sde.marginal(x, t)[0][b:], sde.marginal(x[b:], t[b:])[0])


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_bad_input_raises(sde):
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        sde.marginal(x, 1.2)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        sde.drift(x, torch.tensor([0.0, 0.5, -0.1, 0.2]))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        sde.drift(x, torch.zeros(3))
    with pytest.raises(ValueError, match="n_steps"):
        simulate_forward(sde, x, n_steps=-1)
    with pytest.raises(ValueError, match="n_steps"):
        simulate_forward(sde, x, n_steps=0)
    with pytest.raises(ValueError, match="positive sizes"):
        sde.prior_sample((0, 2))
    with pytest.raises(ValueError, match="eps of shape"):
        sde.sample(x, 0.5, eps=torch.zeros(4, 3))


def test_constructor_validation_and_lookup():
    with pytest.raises(ValueError, match="sigma_max > sigma_min"):
        VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="beta_min > 0"):
        VPSDE(beta_min=-1.0)
    with pytest.raises(ValueError, match="unknown SDE 'foo'"):
        get_sde("foo")
    assert isinstance(get_sde("subvp"), SubVPSDE) and isinstance(get_sde("VE"), SDE)


def test_trajectory_saving(gen):
    x0 = torch.zeros(3, 2)
    traj = simulate_forward(VPSDE(), x0, n_steps=10, save_every=4, generator=gen)
    torch.testing.assert_close(traj.ts, torch.tensor([0.0, 0.4, 0.8, 1.0]))
    assert traj.xs.shape == (4, 3, 2) and torch.equal(traj.final, traj.xs[-1])
    assert torch.equal(traj.at(0.41), traj.xs[1])
