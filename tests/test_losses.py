import math

import pytest
import torch

from course.conversions import convert
from course.losses import dsm_loss, dsm_loss_terms, dsm_weight, sample_times
from course.sde import VESDE, VPSDE
from course.toy_data import eight_gaussians, oracle_score


def _batch(gen, n=20_000, dtype=torch.float64):
    x0 = eight_gaussians().sample(n, generator=gen).to(dtype)
    t = sample_times(n, t_min=0.05, generator=gen, dtype=dtype)
    eps = torch.randn(x0.shape, generator=gen, dtype=dtype)
    return x0, t, eps


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["VP", "VE"])
def test_true_score_has_lower_dsm_loss_than_a_perturbed_one(sde, gen):
    score = oracle_score(eight_gaussians(), sde)
    x0, t, eps = _batch(gen)

    def perturbed(x, t):
        return score(x, t) + 0.3 * torch.sin(3 * x) / sde.sigma(t)[:, None]

    true_loss = dsm_loss_terms(score, x0, t, eps, sde, prediction="score").mean()
    bad_loss = dsm_loss_terms(perturbed, x0, t, eps, sde, prediction="score").mean()
    assert true_loss < bad_loss


def test_dsm_equals_explicit_score_matching_up_to_a_constant(gen):
    """L_DSM(s) - L_DSM(s*) = E[ w(t) sigma^2 mean_d (s - s*)^2 ] at x_t (Vincent 2011):
    checked per sample with common random numbers, within 4 standard errors."""
    sde = VPSDE()
    score = oracle_score(eight_gaussians(), sde)
    x0, t, eps = _batch(gen)

    def other(x, t):
        return score(x, t) + 0.5 * torch.cos(x)

    d = (dsm_loss_terms(other, x0, t, eps, sde, prediction="score")
         - dsm_loss_terms(score, x0, t, eps, sde, prediction="score"))
    x_t = sde.sample(x0, t, eps=eps).x_t
    esm = sde.sigma(t) ** 2 * (other(x_t, t) - score(x_t, t)).pow(2).mean(1)
    diff = d - esm
    assert abs(diff.mean().item()) < 4 * diff.std().item() / math.sqrt(len(diff))
    assert esm.mean() > 20 * diff.std() / math.sqrt(len(diff))  # the test has power


def test_parameterisations_agree(gen):
    """A score model and the eps model it implies give identical losses."""
    sde = VPSDE()
    score = oracle_score(eight_gaussians(), sde)
    x0, t, eps = _batch(gen, n=500)

    def eps_model(x, t):
        return convert(score(x, t), "score", "eps", x, t, sde)

    for weighting in ("sigma2", "likelihood"):
        a = dsm_loss_terms(score, x0, t, eps, sde, prediction="score", weighting=weighting)
        b = dsm_loss_terms(eps_model, x0, t, eps, sde, prediction="eps", weighting=weighting)
        torch.testing.assert_close(a, b)


def test_likelihood_weighting_is_g2_over_sigma2(gen):
    sde = VPSDE()
    x0, t, eps = _batch(gen, n=100)

    def model(x, t):
        return 0.1 * x

    a = dsm_loss_terms(model, x0, t, eps, sde, weighting="likelihood")
    b = dsm_loss_terms(model, x0, t, eps, sde, weighting="sigma2")
    torch.testing.assert_close(a, b * sde.diffusion(t) ** 2 / sde.sigma(t) ** 2)
    torch.testing.assert_close(dsm_weight(sde, t, "sigma2"), torch.ones_like(t))


def test_dsm_loss_is_reproducible_and_differentiable():
    net = torch.nn.Linear(2, 2)
    x0 = torch.randn(64, 2)

    def model(x, t):
        return net(x)

    a = dsm_loss(model, x0, VPSDE(), generator=torch.Generator().manual_seed(0))
    b = dsm_loss(model, x0, VPSDE(), generator=torch.Generator().manual_seed(0))
    assert a.ndim == 0 and torch.equal(a, b)
    a.backward()
    assert net.weight.grad is not None


def test_bad_arguments():
    x0, t = torch.zeros(4, 2), torch.full((4,), 0.5)
    with pytest.raises(ValueError, match="unknown weighting 'foo'"):
        dsm_loss_terms(lambda x, t: x, x0, t, x0, VPSDE(), weighting="foo")
    with pytest.raises(ValueError, match="eps of shape"):
        dsm_loss_terms(lambda x, t: x, x0, t, torch.zeros(4, 3), VPSDE())
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        dsm_loss_terms(lambda x, t: x, x0, torch.full((4,), 2.0), x0, VPSDE())
    with pytest.raises(ValueError, match="unknown prediction"):
        dsm_loss(lambda x, t: x, x0, VPSDE(), prediction="noise")
