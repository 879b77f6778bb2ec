"""Chapter 08: generating in an autoencoder's latent space (latent diffusion, Rombach et al. 2022).

A :class:`LatentDiffusion` holds a frozen :class:`~course.autoencoder.KLAutoencoder` and a denoiser
that works on its scaled latents. It *is* the denoiser as far as every sampler, guidance rule and
loss of the course is concerned: ``model(z, t, **cond)`` on latents of shape ``model.latent_shape``
(the same API as the pixel models), with ``model.decode(z)`` at the end and ``model.encode(x)`` at
the start. Nothing else in the course needs to know that it works on latents.

Training data are encoded once (:func:`latent_moments`: the posterior's scaled mean and log-variance
of each image), and every batch draws a fresh latent z ~ q(z | x) from them
(:func:`sample_latents`), as latent diffusion trains on posterior samples. The encoder then costs
nothing per training step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .autoencoder import KLAutoencoder, reparameterise
from .utils import check_positive_int

__all__ = ["LatentDiffusion", "latent_moments", "sample_latents"]


def _check_shape(x, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected {what} of shape (B, {', '.join(map(str, shape))}); got {got}")


class LatentDiffusion(nn.Module):
    """A denoiser on an autoencoder's scaled latents, with the autoencoder to encode and decode.

    Args:
        autoencoder: a trained :class:`KLAutoencoder` (frozen here: no gradients, always in eval mode).
        denoiser: any ``denoiser(z, t, **cond)`` network whose input and output are latents, e.g. a
            :class:`~course.unet.UNet` with ``in_channels = autoencoder.latent_channels``.
    """

    def __init__(self, autoencoder: KLAutoencoder, denoiser: nn.Module):
        super().__init__()
        if not isinstance(autoencoder, KLAutoencoder):
            raise ValueError(f"expected a KLAutoencoder; got {type(autoencoder).__name__}")
        channels = getattr(denoiser, "in_channels", autoencoder.latent_channels)
        if channels != autoencoder.latent_channels:
            raise ValueError(f"expected a denoiser with {autoencoder.latent_channels} input channels (the latent's); "
                             f"got {channels}")
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.denoiser = denoiser
        self.num_classes = getattr(denoiser, "num_classes", None)
        self.in_channels = autoencoder.latent_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.autoencoder.latent_shape

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.autoencoder.image_shape

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.autoencoder.eval()  # the autoencoder is never trained here
        return self

    def forward(self, z: Tensor, t: Tensor, **cond) -> Tensor:
        _check_shape(z, self.latent_shape, "latents")
        return self.denoiser(z, t, **cond)

    def encode(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of images ``x`` (the posterior mean, or a posterior sample)."""
        return self.autoencoder.encode(x, sample=sample, generator=generator)

    def decode(self, z: Tensor) -> Tensor:
        """Images of scaled latents ``z``."""
        return self.autoencoder.decode(z)


@torch.no_grad()
def latent_moments(autoencoder: KLAutoencoder, images: Tensor, *, batch_size: int = 500) -> Tensor:
    """The posterior of each image in the scaled latent space, stacked as ``(N, 2c, h, w)``: the
    scaled mean s * mu in the first c channels and the log-variance of s * z, logvar + 2 log s, in
    the last c (s = ``autoencoder.latent_scale``)."""
    check_positive_int(batch_size, "batch_size")
    autoencoder.eval()
    scale = float(autoencoder.latent_scale)
    parts = []
    for x in images.split(batch_size):
        mean, logvar = autoencoder.posterior(x)
        parts.append(torch.cat([mean * scale, logvar + 2 * math.log(scale)], dim=1))
    return torch.cat(parts)


def sample_latents(moments: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """A draw z ~ q(z | x) per row of :func:`latent_moments`' output (scaled latents ``(N, c, h, w)``)."""
    if not isinstance(moments, Tensor) or moments.ndim != 4 or moments.shape[1] % 2:
        got = tuple(moments.shape) if isinstance(moments, Tensor) else type(moments).__name__
        raise ValueError(f"expected latent moments of shape (N, 2c, h, w) (mean and log-variance); got {got}")
    mean, logvar = moments.chunk(2, dim=1)
    return reparameterise(mean, logvar, generator=generator)
