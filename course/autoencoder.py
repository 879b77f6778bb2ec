"""Chapter 08's latent space: a small convolutional autoencoder with a KL-regularised Gaussian latent
(the "KL-f4" autoencoder of latent diffusion, Rombach et al. 2022, at MNIST and CIFAR-10 scale).

The encoder gives a diagonal Gaussian posterior q(z | x) = N(mu(x), diag(exp(logvar(x)))) on a
latent of shape (c, H/4, W/4) (two stride-2 stages: 28x28 -> 7x7, 32x32 -> 8x8); the decoder maps a
latent back to an image. Training minimises, per data dimension,

    mean_pixels (decoder(z) - x)^2  +  beta * KL(q(z | x) || N(0, I)) / n_pixels,    z ~ q(z | x)

(``autoencoder_loss``), the beta-VAE objective with the reparameterisation z = mu + exp(logvar / 2) eps.
A weak KL (small beta) reconstructs well but leaves the latent's scale arbitrary; like Stable
Diffusion's factor 0.18215, ``fit_latent_scale`` measures 1 / std of the posterior means on data so
that the diffusion model sees latents of unit variance.

The object every later chapter uses: ``encode(x) -> z`` (scaled; the posterior mean, or a sample with
``sample=True``), ``decode(z) -> x`` (z scaled the same way) and ``latent_shape``. Samplers, guidance
and training run unchanged on z; metrics decode first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .utils import check_positive, check_positive_int

__all__ = ["KLAutoencoder", "gaussian_kl", "reparameterise", "autoencoder_loss", "fit_latent_scale"]


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, diag exp(logvar)) || N(0, I)) per sample, summed over all latent dimensions:
    1/2 sum(mean^2 + exp(logvar) - 1 - logvar), shape ``(B,)``."""
    if mean.shape != logvar.shape:
        raise ValueError(f"expected mean and logvar of the same shape; got {tuple(mean.shape)} and "
                         f"{tuple(logvar.shape)}")
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def reparameterise(mean: Tensor, logvar: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """A sample of N(mean, diag exp(logvar)) as mean + exp(logvar / 2) eps, differentiable in both."""
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + (0.5 * logvar).exp() * eps


class KLAutoencoder(nn.Module):
    """Convolutional autoencoder ``(B, C, S, S) <-> (B, c, S/4, S/4)`` with a Gaussian posterior.

    Args:
        in_channels: image channels (1 for MNIST, 3 for CIFAR-10).
        image_size: side S of the square images (divisible by 4).
        latent_channels: c, the latent's channels.
        channels: widths of the two stages.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, latent_channels: int = 4,
                 channels: tuple[int, int] = (32, 64)):
        super().__init__()
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.image_size = check_positive_int(image_size, "image_size")
        if image_size % 4:
            raise ValueError(f"expected an image size divisible by 4 (two stride-2 stages); got {image_size}")
        self.latent_channels = check_positive_int(latent_channels, "latent_channels")
        a, b = (check_positive_int(w, "channels") for w in channels)
        act = nn.SiLU
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, a, 3, padding=1), act(),
            nn.Conv2d(a, a, 4, stride=2, padding=1), act(),
            nn.Conv2d(a, b, 3, padding=1), act(),
            nn.Conv2d(b, b, 4, stride=2, padding=1), act(),
            nn.Conv2d(b, 2 * latent_channels, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, b, 3, padding=1), act(),
            nn.ConvTranspose2d(b, b, 4, stride=2, padding=1), act(),
            nn.Conv2d(b, a, 3, padding=1), act(),
            nn.ConvTranspose2d(a, a, 4, stride=2, padding=1), act(),
            nn.Conv2d(a, in_channels, 3, padding=1),
        )
        self.register_buffer("latent_scale", torch.ones(()))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // 4
        return (self.latent_channels, side, side)

    def _check(self, x: Tensor, shape: tuple[int, ...], what: str) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected {what} of shape (B, {', '.join(map(str, shape))}); got {got}")

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of q(z | x), unscaled, each ``(B, c, S/4, S/4)``."""
        self._check(x, self.image_shape, "images")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """The scaled latent of ``x``: the posterior mean, or with ``sample=True`` a draw from q(z | x)."""
        mean, logvar = self.posterior(x)
        z = reparameterise(mean, logvar, generator=generator) if sample else mean
        return z * self.latent_scale

    def decode(self, z: Tensor) -> Tensor:
        """Images from scaled latents ``(B, c, S/4, S/4)``."""
        self._check(z, self.latent_shape, "latents")
        return self.decoder(z / self.latent_scale)

    def forward(self, x: Tensor) -> Tensor:
        """The deterministic reconstruction decode(encode(x))."""
        return self.decode(self.encode(x))


def autoencoder_loss(ae: KLAutoencoder, x: Tensor, *, beta: float,
                     generator: torch.Generator | None = None) -> Tensor:
    """Reconstruction error of a posterior sample plus beta times the KL, both per data dimension
    (means over pixels; the KL summed over the latent and divided by the number of pixels)."""
    if beta < 0:
        raise ValueError(f"expected beta >= 0; got {beta}")
    mean, logvar = ae.posterior(x)
    recon = ae.decoder(reparameterise(mean, logvar, generator=generator))
    pixels = x[0].numel()
    return ((recon - x).pow(2).flatten(1).mean(1) + beta * gaussian_kl(mean, logvar) / pixels).mean()


@torch.no_grad()
def fit_latent_scale(ae: KLAutoencoder, x: Tensor, *, batch_size: int = 500) -> float:
    """Set ``ae.latent_scale`` to 1 / std of the posterior means of ``x`` (all latent entries pooled),
    so that encoded data has unit variance; returns the scale. Decoding is unchanged by it."""
    check_positive_int(batch_size, "batch_size")
    means = torch.cat([ae.posterior(part)[0] for part in x.split(batch_size)])
    std = float(means.std())
    scale = 1.0 / check_positive(std, "the latent's standard deviation")
    ae.latent_scale.fill_(scale)
    return scale
