"""Every public sampler, conversion and field at the ends of time: t = 0 (sigma = 0), t = 1 and
alpha = 0 (t = 1 of the linear path), on every path. Each is finite and equal to its limit, or a
ValueError that says why; nothing returns NaN. Checked against closed forms of the 8-mode mixture."""

import pytest
import torch

from course import fast_samplers as F
from course import ode as O
from course import samplers as S
from course.conversions import PREDICTIONS, convert
from course.flow_matching import oracle_velocity, sample_flow_sde
from course.guidance import classifier_guided_velocity, sdedit
from course.paths import LinearPath
from course.sde import VESDE, VPSDE, SubVPSDE
from course.toy_data import eight_gaussians, oracle_score, two_class_mixture

DATA = eight_gaussians()
PATHS = {"linear": LinearPath(), "VE": VESDE(), "VP": VPSDE(), "sub-VP": SubVPSDE()}
SDES = {k: v for k, v in PATHS.items() if k != "linear"}


def _x(n=64, seed=0):
    return 3 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _t(value, n=64):
    return torch.full((n,), value, dtype=torch.float64)


# ---- fields ---------------------------------------------------------------------------------------------
def test_oracle_velocity_on_the_linear_path_at_both_ends():
    """v = alpha' E[x0 | x] + sigma' E[eps | x]: at t = 0, E[x0 | x] = x and E[eps | x] = E[eps] = 0,
    so v = -x; at t = 1, x = eps, so v = x - E[x0] = x - (the data mean)."""
    lin, x = PATHS["linear"], _x()
    v = oracle_velocity(DATA, lin)
    torch.testing.assert_close(v(x, _t(0.0)), -x, atol=1e-12, rtol=0)
    mean = (DATA.weights[:, None] * DATA.means).sum(0)
    torch.testing.assert_close(v(x, _t(1.0)), x - mean, atol=1e-12, rtol=0)
    # and the ends are the limits of the inside
    torch.testing.assert_close(v(x, _t(1e-9)), v(x, _t(0.0)), atol=1e-6, rtol=0)
    torch.testing.assert_close(v(x, _t(1 - 1e-9)), v(x, _t(1.0)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(SDES))
def test_oracle_velocity_of_an_sde_at_t0_is_the_probability_flow_drift(name):
    """At sigma = 0, sigma' is infinite but sigma sigma' = g(0)^2 / 2 is finite: v(x, 0) = f(x, 0) -
    g(0)^2 / 2 grad log p_0(x), the probability-flow drift, with the exact score of the mixture."""
    sde, x = SDES[name], _x()
    v0 = oracle_velocity(DATA, sde)(x, _t(0.0))
    expected = sde.probability_flow_drift(x, _t(0.0), oracle_score(DATA, sde))
    assert torch.isfinite(v0).all()
    torch.testing.assert_close(v0, expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(oracle_velocity(DATA, sde)(x, _t(1e-10)), v0, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", list(SDES))
def test_sigma_dsigma_is_half_the_derivative_of_the_variance(name):
    sde = SDES[name]
    t = torch.tensor([0.0, 1e-6, 0.3, 1.0], dtype=torch.float64)
    got = sde.sigma_dsigma(t)
    h = 1e-6
    fd = (sde.sigma(t[1:] + h) ** 2 - sde.sigma(t[1:] - h) ** 2) / (4 * h)
    torch.testing.assert_close(got[1:], fd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[0], 0.5 * sde.diffusion(t[:1])[0] ** 2)


# ---- conversions ------------------------------------------------------------------------------------------
def _endpoints():
    for name, path in PATHS.items():
        for t in (0.0, 1.0):
            yield name, path, t


@pytest.mark.parametrize("name,path,t", list(_endpoints()))
def test_every_conversion_at_an_endpoint_is_finite_or_says_why(name, path, t):
    x, value = _x(), _x(seed=1)
    for source in PREDICTIONS:
        for target in PREDICTIONS:
            try:
                out = convert(value, source, target, x, _t(t), path)
            except ValueError as exc:
                assert "is undefined where" in str(exc) and f"t = {t:g}" in str(exc), (source, target, str(exc))
                continue
            assert torch.isfinite(out).all(), f"{source} -> {target} at t = {t} on {name} is not finite"


def test_the_undefined_conversions_are_exactly_the_uninformative_ones():
    """At sigma = 0 an x_0 prediction says nothing about eps (or the score); at alpha = 0 an eps or
    score prediction says nothing about x_0. Those raise; their converses work."""
    lin, x, v = PATHS["linear"], _x(), _x(seed=1)
    with pytest.raises(ValueError, match="eps from an x_0 prediction is undefined where sigma = 0"):
        convert(v, "x0", "eps", x, _t(0.0), lin)
    with pytest.raises(ValueError, match="the score is undefined where sigma = 0"):
        convert(v, "eps", "score", x, _t(0.0), lin)
    with pytest.raises(ValueError, match="x_0 from a noise or score prediction is undefined where alpha = 0"):
        convert(v, "eps", "x0", x, _t(1.0), lin)
    # defined: x_0 from eps at sigma = 0 (x_t is the data), eps from x_0 at alpha = 0 (x_t is the noise)
    torch.testing.assert_close(convert(v, "eps", "x0", x, _t(0.0), lin), x)
    torch.testing.assert_close(convert(v, "x0", "eps", x, _t(1.0), lin), x)
    # a velocity gives both halves on the linear path: at t = 1, eps = x and x_0 = x - v
    torch.testing.assert_close(convert(v, "velocity", "x0", x, _t(1.0), lin), x - v)
    torch.testing.assert_close(convert(v, "velocity", "eps", x, _t(1.0), lin), x)


@pytest.mark.parametrize("name", list(SDES))
def test_a_score_converts_to_the_probability_flow_velocity_at_t0(name):
    sde, x = SDES[name], _x()
    score = oracle_score(DATA, sde)(x, _t(0.0))
    got = convert(score, "score", "velocity", x, _t(0.0), sde)
    torch.testing.assert_close(got, sde.probability_flow_drift(x, _t(0.0), oracle_score(DATA, sde)), atol=1e-9,
                               rtol=1e-9)
    if name != "sub-VP":  # VE and VP: sigma ~ sqrt(t), sigma' infinite at 0 (sub-VP: sigma ~ t)
        with pytest.raises(ValueError, match="sigma' is infinite"):
            convert(torch.zeros_like(x), "eps", "velocity", x, _t(0.0), sde)


def test_classifier_guided_velocity_is_finite_at_both_ends_of_the_linear_path():
    lin = PATHS["linear"]
    data = two_class_mixture()
    x, y = _x(), torch.arange(64) % 2

    def classifier(xx, tt):
        return data.class_log_posterior(xx, tt, lin)

    guided = classifier_guided_velocity(oracle_velocity(data, lin), classifier, 2.0, lin)
    for t in (0.0, 1.0):
        assert torch.isfinite(guided(x, _t(t), y)).all()
    torch.testing.assert_close(guided(x, _t(1.0), y), oracle_velocity(data, lin)(x, _t(1.0)))  # no class at noise


# ---- samplers ---------------------------------------------------------------------------------------------
def _prior(path, n=256, seed=3):
    return path.prior_sample((n, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", list(PATHS))
def test_every_sampler_is_finite_on_grids_that_end_at_zero(name):
    path = PATHS[name]
    score, velocity = oracle_score(DATA, path), oracle_velocity(DATA, path)
    start = 0.999 if name == "linear" else 1.0  # the noise-prediction samplers need alpha > 0 at the start
    grid = torch.linspace(start, 0.0, 31, dtype=torch.float64)
    x1, g = _prior(path), torch.Generator().manual_seed(4)
    runs = {
        "ddim": lambda: F.sample_ddim(score, x1, grid, path=path),
        "ddpm": lambda: F.sample_ddpm(score, x1, grid, path=path, generator=g),
        "dpm-solver-2": lambda: F.sample_dpm_solver_2(score, x1, grid, path=path),
        "dpm-solver++(2m)": lambda: F.sample_dpm_solver_pp_2m(score, x1, grid, path=path),
        "flow euler (from 1)": lambda: O.sample_flow_euler(velocity, x1, torch.linspace(1, 0, 31)),
        "flow heun (from 1)": lambda: O.sample_flow_heun(velocity, x1, torch.linspace(1, 0, 31)),
        "flow sde": lambda: sample_flow_sde(velocity, x1, grid, path=path, generator=g),
        "ddim inversion": lambda: F.ddim_invert(score, DATA.sample(256, generator=g).double(), grid, path=path),
    }
    if name != "linear":
        many = torch.linspace(1.0, 0.0, 201, dtype=torch.float64)
        runs.update({
            "reverse EM": lambda: S.sample_reverse_em(score, x1, many, sde=path, generator=g),
            "PC": lambda: S.sample_pc(score, x1, many, sde=path, generator=g),
            "ODE euler": lambda: O.sample_ode_euler(score, x1, many, sde=path),
            "ODE heun": lambda: O.sample_ode_heun(score, x1, many, sde=path),
        })
    for label, run in runs.items():
        assert torch.isfinite(run()).all(), f"{label} on {name} is not finite"


@pytest.mark.parametrize("name", list(PATHS))
def test_dpm_solver_2_takes_its_last_step_to_sigma_zero_at_first_order(name):
    """No log-SNR midpoint exists on the way to sigma = 0; the step to 0 is x_0 = alpha_0 x0_hat from
    the last state, exactly as a first-order step from there."""
    path = PATHS[name]
    score = oracle_score(DATA, path)
    grid = torch.linspace(0.9, 0.0, 11, dtype=torch.float64)
    x1 = _prior(path)
    full = F.sample_dpm_solver_2(score, x1, grid, path=path)
    before = F.sample_dpm_solver_2(score, x1, grid[:-1], path=path)
    t = float(grid[-2])
    eps = -path.sigma(torch.tensor(t, dtype=torch.float64)) * score(before, _t(t, 256))
    a_t, s_t = path.alpha(torch.tensor(t, dtype=torch.float64)), path.sigma(torch.tensor(t, dtype=torch.float64))
    torch.testing.assert_close(full, (before - s_t * eps) / a_t * path.alpha(torch.tensor(0.0, dtype=torch.float64)),
                               atol=1e-12, rtol=0)


def test_sdedit_with_dpm_solver_2_reaches_t0_finite():
    lin = PATHS["linear"]
    x = DATA.sample(128, generator=torch.Generator().manual_seed(5)).double()
    out = sdedit(F.sample_dpm_solver_2, oracle_score(DATA, lin), x, 0.5, path=lin, n_steps=10,
                 generator=torch.Generator().manual_seed(6))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", [F.sample_ddim, F.sample_ddpm, F.sample_dpm_solver_2, F.sample_dpm_solver_pp_2m])
def test_noise_prediction_samplers_refuse_to_start_where_alpha_is_zero(sampler):
    lin = PATHS["linear"]
    kwargs = {"generator": torch.Generator()} if sampler is F.sample_ddpm else {}
    with pytest.raises(ValueError, match=r"starts at t = 1, where alpha\(t\) = 0 on LinearPath"):
        sampler(oracle_score(DATA, lin), _prior(lin), torch.linspace(1, 0, 5, dtype=torch.float64), path=lin,
                **kwargs)


@pytest.mark.parametrize("name", list(SDES))
def test_the_likelihood_integral_down_to_t0_is_finite_and_is_the_limit_of_small_t_min(name):
    sde = SDES[name]
    x = DATA.sample(16, generator=torch.Generator().manual_seed(7)).double()
    res = O.log_likelihood(oracle_score(DATA, sde), x, sde=sde, t_min=0.0)
    near = O.log_likelihood(oracle_score(DATA, sde), x, sde=sde, t_min=1e-7)
    assert torch.isfinite(res.log_prob).all()
    assert (res.log_prob - near.log_prob).abs().max() < 1e-3
    if name != "VE":  # VE's prior N(0, sigma_max^2) is only close to its p_1 (a gap of up to ~0.08 nats here)
        assert (res.log_prob - DATA.log_prob(x)).abs().max() < 2e-3
