"""The digits of chapters 02-04: the unconditional score model's samplers and bits/dim, checked on
Gaussian "digits" whose score and likelihood are exact, and its recipe in fast mode."""

import math

import pytest
import torch
from torch import nn

from course.ode import bits_per_dim
from course.recipes import RECIPES, build_model, run_recipe
from course.score_recipes import (
    SDE,
    T_MIN,
    dequantize,
    digit_bits_per_dim,
    digit_score_fn,
    sample_digits,
)

C = 0.5  # the Gaussian data N(0, C^2 I) in image shape


class GaussianEps(nn.Module):
    """The exact noise prediction of N(0, C^2 I) data on the VP SDE: eps_hat = sigma x / (alpha^2 C^2 + sigma^2)."""

    def forward(self, x, t):
        a, s = SDE.alpha(t).to(x.dtype), SDE.sigma(t).to(x.dtype)
        var = (a**2 * C**2 + s**2)[:, None, None, None]
        return s[:, None, None, None] * x / var


def _digits(n, gen):
    return torch.randint(0, 256, (n, 1, 28, 28), generator=gen).double() / 127.5 - 1


def test_score_of_the_gaussian_model_is_exact(gen):
    x, t = torch.randn(3, 1, 28, 28, generator=gen, dtype=torch.float64), torch.tensor([0.01, 0.5, 1.0], dtype=torch.float64)
    var = SDE.alpha(t) ** 2 * C**2 + SDE.sigma(t) ** 2
    torch.testing.assert_close(digit_score_fn(GaussianEps())(x, t), -x / var[:, None, None, None], rtol=1e-12, atol=0)


def test_dequantize_keeps_each_pixel_in_its_bin(gen):
    images = _digits(4, gen)
    x = dequantize(images, torch.Generator().manual_seed(0))
    k = torch.round((images + 1) * 127.5)
    assert x.dtype == torch.float64 and torch.equal(torch.floor((x + 1) * 128), k)
    assert x.min() >= -1 and x.max() < 1
    torch.testing.assert_close(dequantize(images, torch.Generator().manual_seed(0)), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="8-bit images"):
        dequantize(images + 0.001)
    with pytest.raises(ValueError, match="8-bit images"):
        dequantize(torch.full((1, 1, 2, 2), 1.1))


def test_bits_per_dim_matches_the_closed_form_likelihood(gen):
    """With the exact Gaussian model the likelihood ODE must give log N(x; 0, v(T_MIN)) at T_MIN,
    v(t) = alpha^2 C^2 + sigma^2, up to the one approximation the method makes: the prior N(0, I)
    stands in for p_1 = N(0, v(1)) at the ODE's end x_1 = x sqrt(v(1) / v(T_MIN)). (The Jacobian is
    diagonal and constant, so one Rademacher probe is exact: z^T J z = tr J.)"""
    images = _digits(3, gen)
    x = dequantize(images, torch.Generator().manual_seed(7))
    d = x[0].numel()

    def log_normal(x, var):
        return -0.5 * (x.flatten(1) ** 2).sum(1) / var - 0.5 * d * torch.log(2 * math.pi * var)

    v0, v1 = (SDE.alpha(t) ** 2 * C**2 + SDE.sigma(t) ** 2 for t in torch.tensor([T_MIN, 1.0], dtype=torch.float64))
    x1 = x * (v1 / v0).sqrt()
    prior_gap = log_normal(x1, torch.tensor(1.0, dtype=torch.float64)) - log_normal(x1, v1)
    assert prior_gap.abs().max() < 0.1  # nats over 784 dimensions: 1e-5 bits/dim
    expected = bits_per_dim(log_normal(x, v0) + prior_gap, d)
    got, nfe = digit_bits_per_dim(GaussianEps(), images, generator=torch.Generator().manual_seed(7),
                                  rtol=1e-8, atol=1e-8, batch=2)
    assert got.shape == (3,) and nfe > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the default tolerance of the notebooks and the recipe: within 1e-3 bits/dim
    rough, _ = digit_bits_per_dim(GaussianEps(), images, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(rough, expected, rtol=0, atol=1e-3)


def _std_error(sampler, steps):
    x = sample_digits(GaussianEps(), 64, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    assert x.shape == (64, 1, 28, 28) and torch.isfinite(x).all()
    return x.std().item() / C - 1


@pytest.mark.parametrize("sampler,steps,tol", [("ddim", 1000, 0.01), ("dpm_solver_pp_2m", 20, 0.02),
                                                ("reverse_em", 1000, 0.01), ("pc", 100, 0.02)])
def test_samplers_reproduce_the_gaussian_data(sampler, steps, tol):
    """Samples of the exact model have the data's standard deviation C, up to the sampler's
    discretisation error (about 0.2 % for DDIM at 1000 steps, 1.3 % for DPM-Solver++(2M) at 20) and the
    statistical error of 64 x 784 values (0.3 %)."""
    assert abs(_std_error(sampler, steps)) < tol
    again = sample_digits(GaussianEps(), 8, sampler=sampler, steps=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample_digits(GaussianEps(), 8, sampler=sampler, steps=5,
                                             generator=torch.Generator().manual_seed(0)), again, rtol=0, atol=0)


def test_ddim_is_first_order_on_the_digit_grid():
    """DDIM's error in the samples' scale falls about fivefold from 20 to 100 steps (first order)."""
    ratio = _std_error("ddim", 20) / _std_error("ddim", 100)
    assert 3.5 < ratio < 6.5, ratio


def test_sample_digits_errors():
    with pytest.raises(ValueError, match="unknown sampler"):
        sample_digits(GaussianEps(), 2, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        sample_digits(GaussianEps(), 2, steps=0)


def test_recipe_trains_the_dsm_loss_in_fast_mode(tmp_path):
    recipe = RECIPES["mnist_score_vp"]
    model = build_model(recipe)
    assert model.num_classes is None  # unconditional
    run_recipe("mnist_classifier", folder=tmp_path, fast=True, progress=False)
    result = run_recipe("mnist_score_vp", folder=tmp_path, fast=True, progress=False)
    m = result.metrics
    assert m["nfe"] == recipe.eval_nfe and m["bits_per_dim_digits"] == 4 and m["likelihood_nfe"] > 0
    assert 0 < m["bits_per_dim"] < 20 and math.isfinite(m["mnist_fd"]) and m["fd_samples"] == 50
    assert (tmp_path / "mnist_score_vp.pt").is_file()
