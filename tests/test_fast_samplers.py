"""DDPM, DDIM, DPM-Solver and time grids against closed forms for Gaussian data."""

import math

import pytest
import torch

from course.fast_samplers import (
    ddim_invert,
    ddim_step,
    dpm_solver_1_step,
    log_snr,
    sample_ddim,
    sample_ddpm,
    sample_dpm_solver_2,
    sample_dpm_solver_pp_2m,
    sampling_grid,
    step_to_time,
    time_from_log_snr,
)
from course.samplers import sample_vp_pc_algorithm3, time_grid
from course.sde import VESDE, VPSDE, SubVPSDE
from course.toy_data import gaussian, oracle_score
from tests.conftest import SHAPES

PATHS = [VPSDE(), VESDE(), SubVPSDE()]
S = 0.5  # std of the zero-mean Gaussian data


def var_t(path, t):
    t = torch.as_tensor(t, dtype=torch.float64)
    return path.alpha(t) ** 2 * S**2 + path.sigma(t) ** 2


def test_step_to_time():
    t = step_to_time(torch.arange(11), 10, t_min=0.01)
    assert t[0].item() == pytest.approx(0.01) and t[-1].item() == pytest.approx(1.0)
    assert (t[1:] > t[:-1]).all()
    torch.testing.assert_close(t.flip(0), time_grid(10, t_min=0.01))
    with pytest.raises(ValueError, match="step indices in 0..10"):
        step_to_time(11, 10)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_log_snr_inversion_and_grids(path):
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    torch.testing.assert_close(time_from_log_snr(path, log_snr(path, t)), t, rtol=0, atol=1e-10)
    for kind in ("uniform", "quadratic", "power", "logsnr"):
        g = sampling_grid(20, path=path, kind=kind, t_min=0.01, power=2.5)
        assert g.shape == (21,) and (g[1:] < g[:-1]).all()
        assert g[0].item() == 1.0 and g[-1].item() == pytest.approx(0.01)
    lam = log_snr(path, sampling_grid(20, path=path, kind="logsnr", t_min=0.01))
    steps = lam[1:] - lam[:-1]
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(sampling_grid(7, kind="power", power=2.0), sampling_grid(7, kind="quadratic"))
    u = torch.linspace(1, 0, 21, dtype=torch.float64)
    torch.testing.assert_close(sampling_grid(20, kind="power", power=3.0, t_min=0.01), 0.01 + 0.99 * u**3)
    with pytest.raises(ValueError, match="unknown grid"):
        sampling_grid(5, kind="cosine")
    with pytest.raises(ValueError, match="power >= 1"):
        sampling_grid(5, kind="power", power=0.5)
    with pytest.raises(ValueError, match="t_min < t_max"):
        sampling_grid(5, t_min=0.5, t_max=0.2)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_dpm_solver_1_equals_ddim(path, gen):
    x = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(dpm_solver_1_step(x, 0.7, 0.4, eps, path),
                               ddim_step(x, 0.7, 0.4, eps, path), rtol=1e-10, atol=1e-10)


def test_ddim_is_deterministic_and_inverts():
    """eta = 0 ignores the generator; inversion then sampling on the same grid returns the start,
    up to a first-order error (the noise prediction is taken at the start of each step in both
    directions) that halves when the steps double."""
    path = VPSDE()
    score = oracle_score(gaussian((0.0, 0.0), S), path)
    x0 = S * torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = sample_ddim(score, x0, time_grid(20), path=path, generator=torch.Generator().manual_seed(1))
    b = sample_ddim(score, x0, time_grid(20), path=path, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    errors = []
    for n in (50, 100, 200):
        z = ddim_invert(score, x0, time_grid(n), path=path)
        errors.append((sample_ddim(score, z, time_grid(n), path=path) - x0).abs().max().item())
    assert errors[-1] < 0.05
    assert 1.7 < errors[0] / errors[1] < 2.3 and 1.7 < errors[1] / errors[2] < 2.3, errors


@pytest.mark.parametrize("path", [VPSDE(), VESDE()], ids=["VP", "VE"])
def test_corrected_ddpm_reproduces_a_gaussian_exactly(path, gen):
    """Ancestral steps with the exact posterior mean E[x0 | x_t] and with the posterior variance
    of x0 added (Var[x0 | x_t] = S^2 sigma_t^2 / v_t) are exact transitions p(x_s | x_t): from the
    exact p_1, 8 steps end at the exact p_{t_min} (variance within 4 standard errors)."""
    score = oracle_score(gaussian((0.0, 0.0), S), path)
    n = 200_000
    x = torch.sqrt(var_t(path, 1.0)) * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    grid = time_grid(8, t_min=0.01).tolist()
    for t, s in zip(grid, grid[1:], strict=False):
        tt = torch.full((n,), t, dtype=torch.float64)
        a_t, s_t = path.alpha(tt)[:, None], path.sigma(tt)[:, None]
        a_s, s_s = path.alpha(torch.tensor(s, dtype=torch.float64)), path.sigma(torch.tensor(s, dtype=torch.float64))
        eps_hat = -s_t * score(x, tt)
        c = s_s * torch.sqrt(1 - (a_t * s_s) ** 2 / (a_s * s_t) ** 2)  # posterior std
        coef = a_s - torch.sqrt(s_s**2 - c**2) * a_t / s_t  # multiplies x0 - x0_hat
        post_var = S**2 * s_t**2 / var_t(path, t)
        z = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x = ddim_step(x, t, s, eps_hat, path, eta=1.0, z=torch.zeros_like(x)) \
            + torch.sqrt(c**2 + coef**2 * post_var) * z
    expected = var_t(path, grid[-1]).item()
    assert abs(x.var().item() - expected) < 4 * expected * math.sqrt(2 / x.numel())
    assert abs(x.mean().item()) < 4 * math.sqrt(expected / x.numel())


@pytest.mark.parametrize("n_steps", [2, 5, 10])
def test_plain_ddim_shrinks_a_gaussian_by_a_known_factor(n_steps):
    """With the exact score each DDIM step is linear, x_s = k x_t with
    k = alpha_s a_t + sigma_s (1 - alpha_t a_t) / sigma_t, a_t = alpha_t S^2 / v_t. Starting from
    the exact p_1, the output is exactly prod(k) x_1, and its variance falls short of the truth."""
    path = VPSDE()
    score = oracle_score(gaussian((0.0, 0.0), S), path)
    x1 = torch.sqrt(var_t(path, 1.0)) * torch.randn(1000, 2, generator=torch.Generator().manual_seed(0),
                                                   dtype=torch.float64)
    grid = time_grid(n_steps, t_min=0.01)
    out = sample_ddim(score, x1, grid, path=path)
    factor = 1.0
    for t, s in zip(grid.tolist(), grid.tolist()[1:], strict=False):
        tt, ss = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
        a = path.alpha(tt) * S**2 / var_t(path, t)
        factor *= (path.alpha(ss) * a + path.sigma(ss) * (1 - path.alpha(tt) * a) / path.sigma(tt)).item()
    torch.testing.assert_close(out, factor * x1, rtol=1e-10, atol=1e-12)
    shrink = factor**2 * var_t(path, 1.0).item() / var_t(path, grid[-1]).item()
    assert shrink < 1.0


def flow_map(path, x1, t):
    return torch.sqrt(var_t(path, t) / var_t(path, 1.0)) * x1


@pytest.mark.parametrize("path", [VPSDE(), VESDE()], ids=["VP", "VE"])
def test_convergence_orders_on_the_gaussian_flow(path):
    """Against the exact probability-flow map: DDIM's error halves and DPM-Solver-2's and
    DPM-Solver++(2M)'s quarter when the number of steps doubles (log-SNR grid). The multistep
    method starts with a first-order step, so it reaches its asymptotic ratio later (from 20 steps
    the ratios are 3.6 and 3.9 on VP, against 2.0 from 10 to 20)."""
    score = oracle_score(gaussian((0.0, 0.0), S), path)
    x1 = torch.sqrt(var_t(path, 1.0)) * torch.randn(100, 2, generator=torch.Generator().manual_seed(0),
                                                   dtype=torch.float64)
    target = flow_map(path, x1, 0.01)
    for sampler, order, steps in [(sample_ddim, 1, (10, 20, 40)), (sample_dpm_solver_2, 2, (10, 20, 40)),
                                  (sample_dpm_solver_pp_2m, 2, (20, 40, 80))]:
        errors = [(sampler(score, x1, sampling_grid(n, path=path, kind="logsnr", t_min=0.01), path=path)
                   - target).abs().max().item() for n in steps]
        for coarse, fine in zip(errors, errors[1:], strict=False):
            assert 2**order * 0.8 < coarse / fine < 2**order * 1.25, (sampler.__name__, errors)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_dpm_solver_pp_first_step_is_ddim_and_last_step_to_zero_is_the_x0_prediction(path, gen):
    score = oracle_score(gaussian((0.3, -0.2), S), path)
    x = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    one_step = torch.tensor([0.8, 0.5], dtype=torch.float64)
    torch.testing.assert_close(sample_dpm_solver_pp_2m(score, x, one_step, path=path),
                               sample_ddim(score, x, one_step, path=path), rtol=1e-10, atol=1e-12)
    if path.sigma(torch.tensor(0.0)).item() == 0.0:  # VP, VE: the step to t = 0 returns E[x_0 | x_t]
        t = torch.full((16,), 0.5, dtype=torch.float64)
        a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
        posterior_mean = torch.tensor([0.3, -0.2], dtype=torch.float64) + a * S**2 / (
            a**2 * S**2 + s**2) * (x - a * torch.tensor([0.3, -0.2], dtype=torch.float64))
        out = sample_dpm_solver_pp_2m(score, x, torch.tensor([0.5, 0.0], dtype=torch.float64), path=path)
        torch.testing.assert_close(out, posterior_mean, rtol=1e-9, atol=1e-9)


def test_ddpm_uses_the_generator_and_algorithm3_grid_is_step_to_time():
    path = VPSDE()
    score = oracle_score(gaussian((0.0, 0.0), S), path)
    x = torch.randn(8, 2, dtype=torch.float64)
    a = sample_ddpm(score, x, time_grid(10), path=path, generator=torch.Generator().manual_seed(0))
    b = sample_ddpm(score, x, time_grid(10), path=path, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)
    out = sample_vp_pc_algorithm3(score, x, 30, sde=path, corrector_steps=0,
                                  generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape


@pytest.mark.parametrize("shape", SHAPES)
def test_samplers_run_on_points_and_images(shape):
    path = VPSDE()
    score = oracle_score(gaussian((0.0, 0.0), S), path) if shape[1:] == (2,) else (
        lambda x, t: -x / var_t(path, t).reshape(-1, *([1] * (x.ndim - 1))))
    x = torch.randn(shape, dtype=torch.float64)
    grid = sampling_grid(6, path=path, kind="logsnr")
    for out in (sample_ddim(score, x, grid, path=path, eta=0.5), sample_dpm_solver_2(score, x, grid, path=path),
                sample_dpm_solver_pp_2m(score, x, grid, path=path),
                ddim_invert(score, x, grid, path=path)):
        assert out.shape == shape and torch.isfinite(out).all()


def test_bad_arguments():
    path, x = VPSDE(), torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"eta in \[0, 1\]"):
        ddim_step(x, 0.5, 0.4, x, path, eta=1.5)
    with pytest.raises(ValueError, match="needs noise z"):
        ddim_step(x, 0.5, 0.4, x, path, eta=0.5)
    with pytest.raises(ValueError, match="log-SNR grid needs the path"):
        sampling_grid(5, kind="logsnr")
    with pytest.raises(ValueError, match="decreasing"):
        sample_ddim(lambda a, b: a, x, torch.linspace(0, 1, 3), path=path)


def test_ddpm_noise_is_the_posterior_std_for_vp():
    """For VP, c^2 at eta = 1 equals DDIM's sigma(eta=1)^2 = (1 - abar_s)/(1 - abar_t)(1 - abar_t/abar_s):
    checked by feeding eps = 0, x = 0 so that the step returns c z."""
    path = VPSDE()
    x, z = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    t, s = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    abar_t, abar_s = path.alpha(t) ** 2, path.alpha(s) ** 2
    expected = torch.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
    out = ddim_step(x, 0.6, 0.3, torch.zeros_like(x), path, eta=1.0, z=z)
    torch.testing.assert_close(out[0, 0], expected)
