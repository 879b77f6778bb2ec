import pytest
import torch

from course.conversions import PREDICTIONS, as_score_fn, convert, eps_to_score, eps_to_x0
from course.sde import VESDE, VPSDE, SubVPSDE
from course.toy_data import gaussian, oracle_score
from tests.conftest import SHAPES

PATHS = [VESDE(), VPSDE(), SubVPSDE()]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trips_in_float64(path, shape, gen):
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = 0.01 + 0.89 * torch.rand(shape[0], generator=gen, dtype=torch.float64)
    x_t = path.sample(x0, t, eps=eps).x_t
    truth = {"eps": eps, "x0": x0, "score": eps_to_score(eps, x_t, t, path)}
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
    with pytest.raises(ValueError, match="unknown prediction 'v'"):
        convert(x, "v", "eps", x, t, VPSDE())
    with pytest.raises(ValueError, match="unknown prediction 'velocity'"):
        as_score_fn(lambda x, t: x, VPSDE(), "velocity")
