import pytest
import torch

from course.conversions import (
    PREDICTIONS,
    as_score_fn,
    as_velocity_fn,
    convert,
    eps_to_score,
    eps_to_x0,
)
from course.paths import LinearPath
from course.sde import VESDE, VPSDE, SubVPSDE
from course.toy_data import gaussian, oracle_score
from tests.conftest import SHAPES

PATHS = [VESDE(), VPSDE(), SubVPSDE(), LinearPath(), LinearPath(sigma_min=0.1)]


def path_id(p):
    return f"{p.name}-{p.sigma_min}" if isinstance(p, LinearPath) else p.name


@pytest.mark.parametrize("path", PATHS, ids=path_id)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trips_in_float64(path, shape, gen):
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = 0.01 + 0.89 * torch.rand(shape[0], generator=gen, dtype=torch.float64)
    x_t = path.sample(x0, t, eps=eps).x_t
    a, s = path.alpha(t).reshape(-1, *[1] * (len(shape) - 1)), path.sigma(t).reshape(-1, *[1] * (len(shape) - 1))
    da, ds = path.d_alpha(t).reshape(a.shape), path.d_sigma(t).reshape(a.shape)
    truth = {"eps": eps, "x0": x0, "score": -eps / s, "velocity": da * x0 + ds * eps, "v": a * eps - s * x0}
    for source in PREDICTIONS:
        for target in PREDICTIONS:
            got = convert(truth[source], source, target, x_t, t, path)
            torch.testing.assert_close(got, truth[target], rtol=1e-9, atol=1e-9)


def test_score_of_conditional_is_minus_eps_over_sigma(gen):
    path = VPSDE()
    x0, eps = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    t = torch.full((5,), 0.3, dtype=torch.float64)
    x_t = path.sample(x0, t, eps=eps).x_t
    # grad_x log N(x; alpha x0, sigma^2) = -(x - alpha x0) / sigma^2
    expected = -(x_t - path.alpha(t)[:, None] * x0) / path.sigma(t)[:, None] ** 2
    torch.testing.assert_close(eps_to_score(eps, x_t, t, path), expected)
    torch.testing.assert_close(eps_to_x0(eps, x_t, t, path), x0)


def test_tweedie_posterior_mean_for_gaussian_data(gen):
    """The exact marginal score converted to x0 is E[x0 | x_t], which for N(m, s^2) data is
    m + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha m)."""
    m, s, path = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.6, VPSDE()
    x_t = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(50, generator=gen, dtype=torch.float64)
    score = oracle_score(gaussian(m, s), path)(x_t, t)
    a, sig = path.alpha(t)[:, None], path.sigma(t)[:, None]
    posterior_mean = m + a * s**2 / (a**2 * s**2 + sig**2) * (x_t - a * m)
    torch.testing.assert_close(convert(score, "score", "x0", x_t, t, path), posterior_mean)


def test_as_score_fn_adapts_an_eps_network():
    path = VPSDE()

    def eps_net(x, t):
        return 2 * x

    score_fn = as_score_fn(eps_net, path, "eps")
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(score_fn(x, t), -2 * x / path.sigma(t)[:, None])


def test_unknown_prediction_names():
    x, t = torch.zeros(2, 2), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="unknown prediction 'vel'"):
        convert(x, "vel", "eps", x, t, VPSDE())
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        as_score_fn(lambda x, t: x, VPSDE(), "noise")


def test_path_derivatives_against_closed_forms():
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    vp = VPSDE()
    a, s, beta = vp.alpha(t), vp.sigma(t), vp.beta(t)
    torch.testing.assert_close(vp.d_alpha(t), -0.5 * beta * a)
    torch.testing.assert_close(vp.d_sigma(t), 0.5 * beta * a**2 / s)
    torch.testing.assert_close(VESDE().d_alpha(t), torch.zeros_like(t))
    lin = LinearPath(sigma_min=0.1)
    torch.testing.assert_close(lin.d_alpha(t), -torch.ones_like(t))
    torch.testing.assert_close(lin.d_sigma(t), torch.full_like(t, 0.9))
    assert lin.d_alpha(t.float()).dtype == torch.float32 and vp.d_sigma(t.float()).dtype == torch.float32


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=lambda p: p.name)
def test_velocity_of_the_exact_score_is_the_probability_flow_drift(sde, gen):
    """f - g^2/2 * score (Song et al.) and alpha' E[x0|x] + sigma' E[eps|x] are the same field."""
    score = oracle_score(gaussian((0.5, -1.0), 0.7), sde)
    x = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(64, generator=gen, dtype=torch.float64)
    expected = sde.probability_flow_drift(x, t, score)
    torch.testing.assert_close(as_velocity_fn(score, sde, "score")(x, t), expected, rtol=1e-9, atol=1e-9)


def test_linear_path_velocity_is_eps_minus_x0_even_at_t_1(gen):
    path = LinearPath()
    x0, eps = torch.randn(8, 2, generator=gen, dtype=torch.float64), torch.randn(8, 2, generator=gen,
                                                                             dtype=torch.float64)
    t = torch.ones(8, dtype=torch.float64)
    x_t = path.sample(x0, t, eps=eps).x_t
    torch.testing.assert_close(convert(eps - x0, "velocity", "eps", x_t, t, path), eps)
    torch.testing.assert_close(convert(eps - x0, "velocity", "score", x_t, t, path), -eps)
