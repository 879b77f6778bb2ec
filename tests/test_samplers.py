import math

import pytest
import torch

from course.samplers import (
    CountingScore,
    langevin_dynamics,
    langevin_step,
    reverse_diffusion_step,
    reverse_em_step,
    sample_pc,
    sample_reverse_em,
    sample_vp_pc_algorithm3,
    time_grid,
)
from course.sde import VESDE, VPSDE, SubVPSDE
from course.toy_data import gaussian, oracle_score
from tests.conftest import SHAPES


def gaussian_score(sde, s=0.5):
    """Exact score of N(0, s^2 I) data under ``sde``, for any data shape."""
    def score(x, t):
        a, sig = sde.alpha(t), sde.sigma(t)
        var = (a**2 * s**2 + sig**2).reshape(-1, *([1] * (x.ndim - 1)))
        return -x / var
    return score


def test_langevin_reaches_its_discrete_stationary_variance(gen):
    """x' = x + eps (m - x)/v + sqrt(2 eps) z is AR(1) with stationary variance
    v / (1 - eps / (2 v)), not v: checked within 4 standard errors."""
    m, v, eps = 1.0, 0.25, 0.05
    x = torch.zeros(50_000, 1, dtype=torch.float64)
    x = langevin_dynamics(lambda y: (m - y) / v, x, step_size=eps, n_steps=300, generator=gen)
    var_exact = v / (1 - eps / (2 * v))
    n = x.numel()
    assert abs(x.mean().item() - m) < 4 * math.sqrt(var_exact / n)
    assert abs(x.var().item() - var_exact) < 4 * var_exact * math.sqrt(2 / n)
    assert abs(x.var().item() - v) > 4 * var_exact * math.sqrt(2 / n)  # the bias is resolved


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["VP", "VE"])
def test_reverse_em_with_exact_score_reproduces_gaussian_data(sde, gen):
    """500 reverse EM steps from the prior to t = 1e-4 with the exact score of N(m, s^2 I):
    sample mean and std within 4 standard errors of m and s (40 000 samples, 2 dims)."""
    m, s, n = torch.tensor([0.5, -0.5], dtype=torch.float64), 0.5, 40_000
    score = oracle_score(gaussian(m, s), sde)
    x_init = sde.prior_sample((n, 2), generator=gen, dtype=torch.float64)
    x = sample_reverse_em(score, x_init, time_grid(500, t_min=1e-4), sde=sde, generator=gen)
    assert ((x.mean(0) - m).abs() < 4 * s / math.sqrt(n)).all(), x.mean(0)
    assert ((x.std(0) - s).abs() < 4 * s / math.sqrt(2 * n)).all(), x.std(0)


def test_pc_with_zero_corrector_steps_is_the_predictor_alone():
    sde = VPSDE()
    score = gaussian_score(sde)
    x_init = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    ts = time_grid(50)
    for predictor in ("reverse_diffusion", "euler_maruyama"):
        a = sample_pc(score, x_init, ts, sde=sde, predictor=predictor, corrector_steps=0,
                      generator=torch.Generator().manual_seed(1))
        g, x = torch.Generator().manual_seed(1), x_init
        grid = ts.tolist()
        step = reverse_diffusion_step if predictor == "reverse_diffusion" else reverse_em_step
        for i in range(50):
            z = torch.randn(x.shape, generator=g) if i < 49 else torch.zeros_like(x)
            x = step(x, torch.full((64,), grid[i]), grid[i] - grid[i + 1], sde, score, z)
        torch.testing.assert_close(a, x)
    em = sample_reverse_em(score, x_init, ts, sde=sde, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(em, sample_pc(score, x_init, ts, sde=sde, predictor="euler_maruyama",
                                             corrector_steps=0, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("m", [0, 1, 3])
def test_algorithm3_equals_generic_pc_with_reverse_diffusion_predictor(m):
    sde = VPSDE()
    score = gaussian_score(sde)
    x_init = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = sample_vp_pc_algorithm3(score, x_init, 40, sde=sde, corrector_steps=m, snr=0.1,
                                generator=torch.Generator().manual_seed(5))
    b = sample_pc(score, x_init, time_grid(40), sde=sde, predictor="reverse_diffusion",
                  corrector_steps=m, snr=0.1, denoise=False, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_discrete_chains_match_the_continuous_marginals():
    """VE: the SMLD variances add up to sigma(1)^2 - sigma(t_min)^2 exactly. VP: prod(1 - beta_i)
    approaches alpha(1)^2 / alpha(t_min)^2 as the grid is refined (first order in dt)."""
    x = torch.zeros(1, 2, dtype=torch.float64)
    ts = time_grid(1000).tolist()
    ve = VESDE()
    total = sum(ve.discretize(x, ts[i], ts[i] - ts[i + 1])[1].item() ** 2 for i in range(1000))
    one, t_min = torch.tensor(1.0, dtype=torch.float64), torch.tensor(ts[-1], dtype=torch.float64)
    target = ve.sigma(one) ** 2 - ve.sigma(t_min) ** 2
    assert abs(total - target.item()) < 1e-9 * target.item()
    vp, errors = VPSDE(), []
    for n in (250, 500, 1000):
        grid = time_grid(n).tolist()
        log_prod = sum(math.log(1 - vp.discrete_beta(torch.tensor(grid[i]), grid[i] - grid[i + 1]).item())
                       for i in range(n))
        exact = 2 * math.log(vp.alpha(torch.tensor(1.0)) / vp.alpha(torch.tensor(grid[-1])))
        errors.append(abs(log_prod - exact))
    assert 1.8 < errors[0] / errors[1] < 2.2 and 1.8 < errors[1] / errors[2] < 2.2


def test_langevin_step_size_follows_the_snr_rule():
    x = torch.randn(16, 2, dtype=torch.float64)
    z = torch.randn(16, 2, dtype=torch.float64)

    def score(x, t):
        return -x

    out = langevin_step(x, torch.full((16,), 0.5, dtype=torch.float64), score, z, snr=0.2)
    eps = 2 * (0.2 * z.norm(dim=1).mean() / x.norm(dim=1).mean()) ** 2
    torch.testing.assert_close(out, x - eps * x + torch.sqrt(2 * eps) * z)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=lambda s: s.name)
@pytest.mark.parametrize("shape", SHAPES + [(4, 1, 28, 28)])
def test_every_sampler_runs_on_points_and_images(sde, shape):
    score = gaussian_score(sde)
    x_init = sde.prior_sample(shape, generator=torch.Generator().manual_seed(0))
    ts = time_grid(25)  # the DDPM chain of the VP predictor needs more than beta_max steps
    outs = [
        sample_reverse_em(score, x_init, ts, sde=sde),
        sample_pc(score, x_init, ts, sde=sde, corrector_steps=2),
        sample_pc(score, x_init, ts, sde=sde, predictor=None, corrector_steps=1),
    ]
    if isinstance(sde, VPSDE):
        outs.append(sample_vp_pc_algorithm3(score, x_init, 25, sde=sde))
    for out in outs:
        assert out.shape == shape and torch.isfinite(out).all()


def test_nfe_is_counted():
    sde = VPSDE()
    counter = CountingScore(gaussian_score(sde))
    x = torch.zeros(3, 2)
    sample_pc(counter, x, time_grid(30), sde=sde, corrector_steps=2)
    assert counter.calls == 30 + 2 * 29  # no corrector after the final, noise-free step
    counter.calls = 0
    sample_pc(counter, x, time_grid(30), sde=sde, corrector_steps=2, denoise=False)
    assert counter.calls == 90


def test_callback_sees_every_step():
    sde, seen = VPSDE(), []
    sample_reverse_em(gaussian_score(sde), torch.zeros(3, 2), time_grid(4), sde=sde,
                      callback=lambda step: seen.append((step.i, round(step.t, 6), step.x.shape)))
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[-1][1] == 0.001


def test_bad_arguments():
    sde, x = VPSDE(), torch.zeros(3, 2)
    score = gaussian_score(sde)
    with pytest.raises(ValueError, match="n_steps >= 1"):
        time_grid(0)
    with pytest.raises(ValueError, match="decreasing"):
        sample_reverse_em(score, x, torch.linspace(0, 1, 5), sde=sde)
    with pytest.raises(ValueError, match="at least 2 times"):
        sample_pc(score, x, torch.tensor([1.0]), sde=sde)
    with pytest.raises(ValueError, match="unknown predictor"):
        sample_pc(score, x, time_grid(3), sde=sde, predictor="heun")
    with pytest.raises(ValueError, match="corrector_steps >= 0"):
        sample_pc(score, x, time_grid(3), sde=sde, corrector_steps=-1)
    with pytest.raises(ValueError, match="floating-point"):
        sample_pc(score, torch.zeros(3, 2, dtype=torch.long), time_grid(3), sde=sde)
    with pytest.raises(ValueError, match="n_steps >= 1"):
        sample_vp_pc_algorithm3(score, x, 0, sde=sde)
    with pytest.raises(ValueError, match="more than 20 steps"):
        sample_pc(score, x, time_grid(10), sde=sde, predictor="reverse_diffusion")
    with pytest.raises(ValueError, match="step_size > 0"):
        langevin_dynamics(lambda y: -y, x, step_size=0.0, n_steps=3)
