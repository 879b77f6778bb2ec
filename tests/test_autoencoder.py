"""Chapter 08's autoencoder: shapes for MNIST- and CIFAR-sized inputs, the KL against the closed form of
torch.distributions, the reparameterisation's statistics, determinism, the latent scale (unit variance,
decoding unchanged), a gradient path through the loss, a short training run, and bad input."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from course.autoencoder import (
    KLAutoencoder,
    autoencoder_loss,
    fit_latent_scale,
    gaussian_kl,
    reparameterise,
)


@pytest.mark.parametrize("channels, size, latent", [(1, 28, (4, 7, 7)), (3, 32, (4, 8, 8))])
def test_shapes_for_one_and_three_channels(channels, size, latent):
    ae = KLAutoencoder(channels, size, latent_channels=4)
    x = torch.randn(5, channels, size, size, generator=torch.Generator().manual_seed(0))
    z = ae.encode(x)
    assert z.shape == (5, *latent) == (5, *ae.latent_shape)
    assert ae.decode(z).shape == x.shape and ae(x).shape == x.shape
    mean, logvar = ae.posterior(x)
    assert mean.shape == logvar.shape == z.shape


def test_kl_matches_the_closed_form_of_torch_distributions():
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(6, 4, 7, 7, generator=gen, dtype=torch.float64)
    logvar = 0.8 * torch.randn(6, 4, 7, 7, generator=gen, dtype=torch.float64)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2, dtype=torch.float32))


def test_reparameterised_samples_have_the_posteriors_mean_and_std():
    mean, logvar = torch.tensor([[1.5, -2.0]], dtype=torch.float64), torch.tensor([[0.0, -1.0]], dtype=torch.float64)
    n = 200_000
    z = reparameterise(mean.expand(n, 2), logvar.expand(n, 2), generator=torch.Generator().manual_seed(2))
    se = 1 / n**0.5
    torch.testing.assert_close(z.mean(0), mean[0], rtol=0, atol=5 * se * 1.0)
    torch.testing.assert_close(z.std(0), (0.5 * logvar[0]).exp(), rtol=0, atol=5 * se)


def test_gradients_reach_mean_and_logvar():
    mean = torch.zeros(3, 2, requires_grad=True)
    logvar = torch.zeros(3, 2, requires_grad=True)
    reparameterise(mean, logvar, generator=torch.Generator().manual_seed(3)).pow(2).sum().backward()
    assert mean.grad is not None and logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_encoding_is_deterministic_and_sampling_follows_the_generator():
    ae = KLAutoencoder(1, 28)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ae.encode(x), ae.encode(x))
    a = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
    b = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
    c = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_latent_scale_gives_unit_variance_and_leaves_decoding_unchanged():
    ae = KLAutoencoder(1, 28).double()
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    before = ae(x)
    scale = fit_latent_scale(ae, x, batch_size=16)
    z = ae.encode(x)
    assert scale == pytest.approx(float(ae.latent_scale)) and scale != 1.0
    assert float(z.detach().std()) == pytest.approx(1.0, rel=1e-12)
    torch.testing.assert_close(ae(x), before, rtol=1e-12, atol=1e-12)  # decode divides by the same scale


def test_loss_has_a_gradient_path_and_beta_zero_is_the_reconstruction_error():
    ae = KLAutoencoder(1, 28)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    loss = autoencoder_loss(ae, x, beta=0.0, generator=torch.Generator().manual_seed(9))
    mean, logvar = ae.posterior(x)
    recon = ae.decoder(reparameterise(mean, logvar, generator=torch.Generator().manual_seed(9)))
    torch.testing.assert_close(loss, (recon - x).pow(2).mean())
    with_kl = autoencoder_loss(ae, x, beta=2.0, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(with_kl - loss, 2.0 * gaussian_kl(mean, logvar).mean() / 784)
    with_kl.backward()
    assert all(p.grad is not None for p in ae.parameters())


def test_a_short_training_run_reconstructs_digits_better_than_the_mean_image():
    from course.datasets import load_mnist

    torch.manual_seed(0)
    data = load_mnist("train", verbose=False)
    x = data.images[:256]
    ae = KLAutoencoder(1, 28, latent_channels=4, channels=(16, 32))
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(10)
    for _ in range(60):
        loss = autoencoder_loss(ae, x[torch.randint(256, (64,), generator=gen)], beta=1e-3, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = (ae(x) - x).pow(2).mean().item()
    baseline = (x - x.mean(0)).pow(2).mean().item()  # the best constant image
    assert err < 0.6 * baseline, (err, baseline)


@pytest.mark.parametrize("bad, words", [
    (torch.zeros(2, 3, 28, 28), "(B, 1, 28, 28)"),
    (torch.zeros(2, 1, 32, 32), "(B, 1, 28, 28)"),
    (torch.zeros(1, 28, 28), "(B, 1, 28, 28)"),
])
def test_images_of_the_wrong_shape_are_refused(bad, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        KLAutoencoder(1, 28).encode(bad)


def test_latents_of_the_wrong_shape_and_bad_settings_are_refused():
    ae = KLAutoencoder(1, 28, latent_channels=4)
    with pytest.raises(ValueError, match=r"latents of shape \(B, 4, 7, 7\)"):
        ae.decode(torch.zeros(2, 3, 7, 7))
    with pytest.raises(ValueError, match="divisible by 4"):
        KLAutoencoder(1, 30)
    with pytest.raises(ValueError, match="beta >= 0"):
        autoencoder_loss(ae, torch.zeros(2, 1, 28, 28), beta=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 4))
