"""Flow matching against closed forms: marginal velocity of mixtures, the CFM loss and its
gradient, Gaussian-to-Gaussian flows, OT couplings by brute force, and the time convention."""

import itertools
import math

import pytest
import torch

from course.conversions import as_velocity_fn
from course.flow_matching import (
    cfm_loss,
    cfm_loss_terms,
    conditional_velocity,
    from_lipman,
    independent_coupling,
    lipman_time,
    oracle_velocity,
    ot_coupling,
    ot_pairs,
    reflow_pairs,
    sample_flow_sde,
    to_lipman,
    trajectory_straightness,
)
from course.metrics import mmd_floor, mmd_rbf
from course.ode import sample_flow_euler, sample_flow_heun, solve_ode
from course.paths import LinearPath
from course.sde import VPSDE
from course.toy_data import GaussianMixture, eight_gaussians, gaussian, oracle_score
from tests.conftest import SHAPES

PATHS = [LinearPath(), LinearPath(sigma_min=0.05), VPSDE()]


def ids(p):
    return f"linear-{p.sigma_min}" if isinstance(p, LinearPath) else p.name


@pytest.mark.parametrize("path", PATHS, ids=ids)
def test_monte_carlo_average_of_conditional_velocities_is_the_marginal_velocity(path):
    """v_t(x) = E[u_t(x | x_0, eps) | x_t = x]: average u over data draws x_0, weighted by
    p(x_t = x | x_0) (self-normalised importance sampling), and compare with the closed form."""
    gen = torch.Generator().manual_seed(0)
    data = eight_gaussians()
    x0 = data.sample(400_000, generator=gen).double()
    v_exact = oracle_velocity(data, path)
    for t in (0.2, 0.5, 0.8):
        tt = torch.tensor(t, dtype=torch.float64)
        x = path.sample(data.sample(6, generator=gen).double(), tt, generator=gen).x_t  # x ~ p_t
        a, s = path.alpha(tt), path.sigma(tt)
        for xi, vi in zip(x, v_exact(x, torch.full((6,), t, dtype=torch.float64)), strict=True):
            logw = -((xi - a * x0) ** 2).sum(1) / (2 * s**2)
            w = torch.softmax(logw, 0)
            eps = (xi - a * x0) / s
            u = conditional_velocity(path, x0, eps, torch.full((len(x0),), t, dtype=torch.float64))
            mc = (w[:, None] * u).sum(0)
            ess = 1 / (w**2).sum()
            se = torch.sqrt((w[:, None] * (u - mc) ** 2).sum(0) / ess)
            assert ess > 100, ess
            assert ((mc - vi).abs() <= 4 * se + 1e-6).all(), (t, mc, vi, se)


def test_oracle_velocity_agrees_with_the_score_route_and_is_finite_at_t_1(gen):
    data, path = eight_gaussians(), LinearPath()
    x = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(32, generator=gen, dtype=torch.float64)
    via_score = as_velocity_fn(oracle_score(data, path), path, "score")(x, t)
    torch.testing.assert_close(oracle_velocity(data, path)(x, t), via_score, rtol=1e-9, atol=1e-9)
    at_one = oracle_velocity(data, path)(x, torch.ones(32, dtype=torch.float64))
    # at t = 1, x_1 = eps is independent of x_0: v = E[eps - x_0 | x_1] = x - E[x_0]
    torch.testing.assert_close(at_one, x - data.mean())


@pytest.mark.parametrize("path", PATHS, ids=ids)
@pytest.mark.parametrize("shape", SHAPES)
def test_conditional_velocity_is_the_time_derivative_of_the_path(path, shape, gen):
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(shape[0], generator=gen, dtype=torch.float64)
    h = 1e-6
    fd = (path.sample(x0, t + h, eps=eps).x_t - path.sample(x0, t - h, eps=eps).x_t) / (2 * h)
    torch.testing.assert_close(conditional_velocity(path, x0, eps, t), fd, rtol=1e-6, atol=1e-7)
    if isinstance(path, LinearPath) and path.sigma_min == 0:
        torch.testing.assert_close(conditional_velocity(path, x0, eps, t), eps - x0)


def test_cfm_loss_is_lowest_at_the_marginal_field_and_its_gradient_matches_marginal_fm():
    """L_CFM(v) = L_MFM(v) + const: the true marginal field has the lowest CFM loss among
    perturbations, and for a field with parameter theta the two gradients agree in expectation."""
    gen = torch.Generator().manual_seed(1)
    data, path = eight_gaussians(), LinearPath()
    v_true = oracle_velocity(data, path)
    n = 200_000
    x0 = data.sample(n, generator=gen).double()
    eps = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    t = 0.02 + 0.96 * torch.rand(n, generator=gen, dtype=torch.float64)
    base = cfm_loss_terms(v_true, x0, eps, t, path)
    for direction in ([0.3, 0.0], [0.0, -0.3], [0.2, 0.2]):
        shift = torch.tensor(direction, dtype=torch.float64)
        worse = cfm_loss_terms(lambda x, tt, s=shift: v_true(x, tt) + s, x0, eps, t, path)
        diff = worse - base
        assert diff.mean() > 4 * diff.std() / math.sqrt(n)
        # exactly |shift|^2 / D more on average plus a cross term with zero mean
        assert abs(diff.mean() - shift.pow(2).mean()) < 4 * diff.std() / math.sqrt(n)

    # gradient wrt theta of v_theta = v_true + theta * tanh(x): CFM vs marginal FM, per sample
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def model(x, tt):
        return v_true(x, tt) + theta * torch.tanh(x)

    x_t = path.sample(x0, t, eps=eps).x_t
    g_cfm = torch.autograd.grad(cfm_loss_terms(model, x0, eps, t, path), theta,
                                grad_outputs=torch.ones(n, dtype=torch.float64))[0]
    # d/dtheta of mean_d (model - target)^2 with D = 2 dimensions: (model - target) * tanh(x_t)
    per_cfm = (model(x_t, t) - conditional_velocity(path, x0, eps, t)) * torch.tanh(x_t)
    per_mfm = (model(x_t, t) - v_true(x_t, t)) * torch.tanh(x_t)
    torch.testing.assert_close(g_cfm, per_cfm.sum(0).detach())
    diff = (per_cfm - per_mfm).detach()
    assert (diff.mean(0).abs() < 4 * diff.std(0) / math.sqrt(n)).all()


def test_gaussian_to_gaussian_flow_reproduces_mean_and_covariance():
    """With the exact marginal velocity of N(m, s^2 I) data, the ODE from N(0, I) lands on
    N(m, s^2 I) (at t = 1e-3: up to a 1e-3 shrink of the mean and a 1e-6 widening of the variance)."""
    m, s = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.4
    path, gen = LinearPath(), torch.Generator().manual_seed(2)
    v = oracle_velocity(gaussian(m, s), path)
    x1 = torch.randn(20_000, 2, generator=gen, dtype=torch.float64)
    t_end = 1e-3  # the field is 0/0 at t = 0 exactly, where sigma = 0
    out = solve_ode(v, x1, 1.0, t_end, rtol=1e-8, atol=1e-8).x
    # for isotropic Gaussians the marginal flow map is affine: x_t = mu_t + std_t x_1, with
    # mu_t = (1 - t) m and std_t^2 = (1 - t)^2 s^2 + t^2
    mu, std = (1 - t_end) * m, math.sqrt((1 - t_end) ** 2 * s**2 + t_end**2)
    torch.testing.assert_close(out, mu + std * x1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.mean(0), m, rtol=0, atol=4 * s / math.sqrt(20_000) + t_end * 2)
    cov = torch.cov(out.T)
    torch.testing.assert_close(cov, s**2 * torch.eye(2, dtype=torch.float64), rtol=0, atol=4 * s**2 * math.sqrt(2 / 20_000))


def test_euler_and_heun_converge_at_their_orders_on_the_gaussian_flow():
    m, s = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.4
    path = VPSDE()
    v = oracle_velocity(gaussian(m, s), path)
    x1 = torch.randn(100, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = solve_ode(v, x1, 1.0, 0.01, rtol=1e-10, atol=1e-10).x
    for sampler, order in [(sample_flow_euler, 1), (sample_flow_heun, 2)]:
        errors = [(sampler(v, x1, torch.linspace(1, 0.01, n + 1, dtype=torch.float64)) - target).abs().max().item()
                  for n in (40, 80, 160)]
        for coarse, fine in zip(errors, errors[1:], strict=False):
            assert 2**order * 0.8 < coarse / fine < 2**order * 1.25, (sampler.__name__, errors)


def test_heun_last_step_to_zero_is_euler():
    calls = []

    def v(x, t):
        calls.append(float(t[0]))
        return torch.ones_like(x)

    sample_flow_heun(v, torch.zeros(3, 2), torch.tensor([1.0, 0.5, 0.0]))
    assert calls == [1.0, 0.5, 0.5]


def test_lipman_convention_round_trips(gen):
    t = torch.rand(10, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(lipman_time(lipman_time(t)), t)
    data, path = eight_gaussians(), LinearPath()
    v = oracle_velocity(data, path)
    x = torch.randn(10, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(from_lipman(to_lipman(v))(x, t), v(x, t))
    # Lipman's OT path x_s = s x_data + (1 - s) x_noise has velocity x_data - x_noise = -(course's)
    x0, eps = torch.randn(10, 2, generator=gen, dtype=torch.float64), torch.randn(10, 2, generator=gen,
                                                                              dtype=torch.float64)
    torch.testing.assert_close(to_lipman(lambda x, tt: conditional_velocity(path, x0, eps, tt))(x, t), x0 - eps)


def test_ot_coupling_is_the_cost_minimising_permutation_by_brute_force(gen):
    for n, shape in [(5, (2,)), (6, (3,)), (5, (1, 2, 2))]:
        x0 = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
        eps = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
        a, b = ot_coupling(x0, eps)
        assert torch.equal(a, x0)
        # b is a permutation of eps
        assert sorted(b.flatten(1).tolist()) == sorted(eps.flatten(1).tolist())
        cost = ((x0 - b) ** 2).flatten(1).sum(1).sum()
        best = min(((x0 - eps[list(p)]) ** 2).flatten(1).sum(1).sum() for p in itertools.permutations(range(n)))
        torch.testing.assert_close(cost, best)
    x0 = torch.randn(4, 2)
    assert independent_coupling(x0, x0 + 1)[1] is not None
    with pytest.raises(ValueError, match="eps of shape"):
        ot_coupling(x0, torch.zeros(4, 3))


def test_ot_pairs_match_each_block_optimally_and_only_reorder_noise(gen):
    x0 = torch.randn(13, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(13, 2, generator=gen, dtype=torch.float64)
    a, b = ot_pairs(x0, eps, block_size=5)  # blocks of 5, 5 and 3 rows
    assert torch.equal(a, x0) and b.shape == eps.shape
    for lo, hi in [(0, 5), (5, 10), (10, 13)]:
        xb, eb = x0[lo:hi], eps[lo:hi]
        assert sorted(b[lo:hi].tolist()) == sorted(eb.tolist())  # noise stays in its own block
        best = min(((xb - eb[list(p)]) ** 2).sum() for p in itertools.permutations(range(hi - lo)))
        torch.testing.assert_close(((xb - b[lo:hi]) ** 2).sum(), best)
    with pytest.raises(ValueError, match="block_size"):
        ot_pairs(x0, eps, block_size=0)
    with pytest.raises(ValueError, match="eps of shape"):
        ot_pairs(x0, eps[:4])


def test_cfm_loss_couplings_and_bad_arguments(gen):
    path = LinearPath()
    x0 = torch.randn(64, 2, generator=gen)
    net = torch.nn.Linear(3, 2)

    def model(x, t):
        return net(torch.cat([x, t[:, None]], 1))

    for coupling in ("independent", "ot"):
        loss = cfm_loss(model, x0, path, coupling=coupling, generator=gen)
        loss.backward()
        assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="unknown coupling 'sinkhorn'"):
        cfm_loss(model, x0, path, coupling="sinkhorn")
    with pytest.raises(ValueError, match="sigma_min"):
        LinearPath(sigma_min=1.0)


def test_straightness_is_zero_on_lines_and_sees_bent_flows():
    """Conditional paths are straight, but the marginal ODE of a 2-mode mixture bends its
    trajectories (they split between the modes): the diagnostic is 0 on lines and sees the bend."""
    line = torch.linspace(0, 1, 11)[:, None, None] * torch.tensor([[1.0, 2.0]])
    assert trajectory_straightness(line).abs().max() < 1e-6
    data = GaussianMixture([[-2.0, 0.0], [2.0, 0.0]], 0.1)
    v = oracle_velocity(data, LinearPath())
    xs = []
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sample_flow_euler(v, x, torch.linspace(1, 0, 51, dtype=torch.float64), callback=lambda st: xs.append(st.x))
    dev = trajectory_straightness(torch.stack([x, *xs]))
    assert dev.mean() > 0.05


def test_reflow_pairs_are_the_flow_of_the_noise_and_flow_sde_samples_the_target():
    gen = torch.Generator().manual_seed(5)
    data, path = eight_gaussians(), LinearPath()
    v = oracle_velocity(data, path)
    noise = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    grid = torch.linspace(1, 0, 21, dtype=torch.float64)
    x0, eps = reflow_pairs(v, noise, grid)
    assert eps is noise
    torch.testing.assert_close(x0, sample_flow_euler(v, noise, grid))
    # a flow model sampled with its SDE reaches the data distribution (MMD near its floor)
    n = 4000
    x1 = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    grid = (1 - torch.linspace(0, 1, 401, dtype=torch.float64)) ** 2  # denser near t = 0
    out = sample_flow_sde(v, x1, grid, path=path, generator=gen)
    ratio = mmd_rbf(out.float(), data.sample(n, generator=gen)) / mmd_floor(data, n)
    assert ratio < 1.5, ratio
    noiseless = sample_flow_sde(v, x1[:50], grid, path=path, diffusion=lambda t: 0 * t, generator=gen)
    torch.testing.assert_close(noiseless, sample_flow_euler(v, x1[:50], grid))


@pytest.mark.parametrize("shape", SHAPES)
def test_flow_samplers_run_on_points_and_images(shape, gen):
    path = LinearPath()

    def v(x, t):
        return x - 0.5 * x.tanh()

    x = torch.randn(shape, generator=gen)
    grid = torch.linspace(1, 0, 5)
    for out in (sample_flow_euler(v, x, grid), sample_flow_heun(v, x, grid),
                sample_flow_sde(v, x, grid, path=path, generator=gen)):
        assert out.shape == shape and out.dtype == x.dtype and torch.isfinite(out).all()
