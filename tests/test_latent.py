"""Chapter 08's latent-model wrapper: the API of the pixel models on latents, posterior moments computed
once and sampled per batch, and every sampler of the course run unchanged on latents.

Exactness comes from Gaussian latent data: with z0 ~ N(m_y, s^2 I) for class y, the optimal
eps-prediction on any Gaussian path x_t = alpha z0 + sigma eps is
sigma (x - alpha m_y) / (alpha^2 s^2 + sigma^2), so every sampler must return latents with mean m_y and
standard deviation s (up to its discretisation error and the sample size)."""

import math

import pytest
import torch
from torch import nn

from course.autoencoder import KLAutoencoder, reparameterise
from course.conversions import as_score_fn, as_velocity_fn
from course.fast_samplers import (
    sample_ddim,
    sample_dpm_solver_2,
    sample_dpm_solver_pp_2m,
    sampling_grid,
)
from course.guidance import classifier_free_guidance
from course.latent import LatentDiffusion, latent_moments, sample_latents
from course.ode import sample_flow_euler, sample_flow_heun, sample_ode_heun
from course.paths import LinearPath
from course.recipes import sample_classes
from course.samplers import sample_pc, sample_reverse_em, time_grid
from course.sde import VPSDE
from course.unet import UNet

STD = 0.5


class GaussianLatentEps(nn.Module):
    """The exact eps-prediction for class-conditional Gaussian latents z0 ~ N(means[y], STD^2 I)."""

    def __init__(self, means: torch.Tensor, path):
        super().__init__()
        self.means, self.path = means, path
        self.in_channels, self.num_classes = means.shape[1], means.shape[0] - 1  # last row: the null class
        self.calls = 0

    def forward(self, x, t, y=None):
        self.calls += 1
        m = self.means[y if y is not None else torch.full((x.shape[0],), self.num_classes)]
        alpha, sigma = self.path.coefficients(t, x)
        return sigma * (x - alpha * m) / (alpha**2 * STD**2 + sigma**2)


def _ae(dtype=torch.float64, in_channels=1, size=28):
    torch.manual_seed(0)
    ae = KLAutoencoder(in_channels, size, latent_channels=4, channels=(8, 8)).to(dtype)
    ae.latent_scale.fill_(0.7)
    return ae


def _gaussian_model(path):
    ae = _ae()
    means = torch.randn((11, *ae.latent_shape), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return LatentDiffusion(ae, GaussianLatentEps(means, path)), means


def test_wrapper_shapes_frozen_autoencoder_and_bad_input():
    ae = _ae(torch.float32)
    model = LatentDiffusion(ae, UNet(4, (8, 16, 16), num_classes=10))
    assert model.latent_shape == (4, 7, 7) and model.image_shape == (1, 28, 28) and model.num_classes == 10
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    assert all(p.requires_grad for p in model.denoiser.parameters())
    model.train()
    assert model.training and not model.autoencoder.training
    z = torch.randn(3, 4, 7, 7)
    assert model(z, torch.rand(3), y=torch.tensor([0, 1, 10])).shape == z.shape
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert model.encode(x).shape == (3, 4, 7, 7) and model.decode(z).shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match=r"expected latents of shape \(B, 4, 7, 7\); got \(3, 1, 28, 28\)"):
        model(x, torch.rand(3))
    with pytest.raises(ValueError, match=r"expected latents of shape \(B, 4, 7, 7\)"):
        model.decode(torch.randn(3, 4, 8, 8))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 28, 28\)"):
        model.encode(torch.randn(3, 3, 32, 32))
    with pytest.raises(ValueError, match="4 input channels"):
        LatentDiffusion(ae, UNet(1, (8, 16, 16)))
    with pytest.raises(ValueError, match="expected a KLAutoencoder"):
        LatentDiffusion(nn.Identity(), UNet(4, (8, 16, 16)))
    cifar = LatentDiffusion(_ae(torch.float32, 3, 32), UNet(4, (8, 16, 16), num_classes=10))
    assert cifar.latent_shape == (4, 8, 8) and cifar.decode(torch.randn(2, 4, 8, 8)).shape == (2, 3, 32, 32)


def test_latent_moments_are_the_scaled_posterior_and_samples_decode_like_the_unscaled_ones():
    ae = _ae()
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64) * 2 - 1
    moments = latent_moments(ae, x, batch_size=4)
    mean, logvar = ae.posterior(x)
    s = float(ae.latent_scale)
    torch.testing.assert_close(moments[:, :4], s * mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(moments[:, 4:], logvar + 2 * math.log(s), rtol=0, atol=1e-12)
    # a draw in the scaled space decodes exactly like the same draw in the autoencoder's own space
    z = sample_latents(moments, generator=torch.Generator().manual_seed(5))
    z_own = reparameterise(mean, logvar, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ae.decode(z), ae.decoder(z_own), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match=r"latent moments of shape \(N, 2c, h, w\)"):
        sample_latents(moments[:, :3])


def test_posterior_samples_have_the_posterior_statistics():
    moments = torch.cat([torch.full((20000, 1, 2, 2), 0.3), torch.full((20000, 1, 2, 2), math.log(0.25))], 1)
    z = sample_latents(moments.double(), generator=torch.Generator().manual_seed(0))
    assert z.shape == (20000, 1, 2, 2)
    # standard errors: 0.5 / sqrt(80000) = 0.0018 for the mean; about 0.0013 for the std
    assert abs(float(z.mean()) - 0.3) < 0.008 and abs(float(z.std()) - 0.5) < 0.006


def _check_gaussian(z, means, y):
    err_mean = float((z.mean(0) - means[y[0]]).abs().mean())
    err_std = float(z.std(0).mean()) / STD - 1
    assert z.shape[1:] == means.shape[1:] and torch.isfinite(z).all()
    # n = 2000: the per-dimension mean error is about STD / sqrt(n) = 0.011 and the std error 1.6 %
    assert err_mean < 0.03, err_mean
    assert abs(err_std) < 0.05, err_std


VP = VPSDE()
SAMPLERS = {
    "flow_euler": (LinearPath(), lambda m, x, g, y: sample_flow_euler(
        as_velocity_fn(m, LinearPath()), x, torch.linspace(0.999, 0, 201, dtype=x.dtype), y=y)),  # eps -> v needs alpha > 0
    "flow_heun": (LinearPath(), lambda m, x, g, y: sample_flow_heun(
        as_velocity_fn(m, LinearPath()), x, torch.linspace(0.999, 1e-3, 41, dtype=x.dtype), y=y)),
    "reverse_em": (VP, lambda m, x, g, y: sample_reverse_em(
        as_score_fn(m, VP), x, time_grid(500).to(x.dtype), sde=VP, generator=g, y=y)),
    "pc": (VP, lambda m, x, g, y: sample_pc(as_score_fn(m, VP), x, time_grid(200).to(x.dtype), sde=VP,
                                             generator=g, y=y)),
    "ode_heun": (VP, lambda m, x, g, y: sample_ode_heun(as_score_fn(m, VP), x, time_grid(40).to(x.dtype),
                                                        sde=VP, y=y)),
    "ddim": (VP, lambda m, x, g, y: sample_ddim(as_score_fn(m, VP), x, sampling_grid(100, kind="quadratic"),
                                                path=VP, y=y)),
    "dpm_solver_2": (VP, lambda m, x, g, y: sample_dpm_solver_2(
        as_score_fn(m, VP), x, sampling_grid(30, path=VP, kind="logsnr"), path=VP, y=y)),
    "dpm_solver_pp_2m": (VP, lambda m, x, g, y: sample_dpm_solver_pp_2m(
        as_score_fn(m, VP), x, sampling_grid(40, path=VP, kind="logsnr"), path=VP, y=y)),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_unchanged_on_latents_and_reaches_the_latent_distribution(name):
    path, run = SAMPLERS[name]
    model, means = _gaussian_model(path)
    g = torch.Generator().manual_seed(1)
    y = torch.full((2000,), 3)
    x_init = path.prior_sample((2000, *model.latent_shape), generator=g, dtype=torch.float64)
    z = run(model, x_init, g, y)
    _check_gaussian(z, means, y)
    assert model.decode(z[:4]).shape == (4, *model.image_shape)


def test_guidance_and_the_course_sampler_decode_at_the_end():
    model, means = _gaussian_model(LinearPath())
    z = torch.randn(5, *model.latent_shape, dtype=torch.float64)
    t, y = torch.rand(5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4])
    guided = classifier_free_guidance(model, 0.0, null_label=10)
    torch.testing.assert_close(guided(z, t, y=y), model(z, t, y=y))  # w = 0: the conditional model
    small = LatentDiffusion(_ae(torch.float32), UNet(4, (8, 16, 16), num_classes=10))
    images = sample_classes(small, torch.arange(10).repeat(2), w=1.0, nfe=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (20, 1, 28, 28) and torch.isfinite(images).all()
