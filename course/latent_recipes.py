"""Chapter 08's recipes: the MNIST autoencoder whose latent space the later image chapters share.

- ``mnist_autoencoder`` (kind ``autoencoder``): ``KLAutoencoder`` 28x28x1 -> 4x7x7 trained with the
  per-dimension beta-VAE loss (``autoencoder_loss``). After training, the latent scale is measured on
  the training digits (``fit_latent_scale``) and stored with the checkpoint.

Metrics on the held-out digits: the reconstruction's mean squared error (images in [-1, 1]), the
evaluation classifier's accuracy on the reconstructions beside its accuracy on the originals, the
mean KL per latent dimension, and the latent scale.
"""

from __future__ import annotations

import torch
from torch import nn

from .autoencoder import KLAutoencoder, autoencoder_loss, fit_latent_scale, gaussian_kl
from .recipes import Recipe, RecipeKind, register_kind, register_recipe

__all__ = ["AE_LATENT_CHANNELS", "AE_BETA"]

AE_LATENT_CHANNELS, AE_BETA = 4, 1e-3


def _build_ae(recipe: Recipe) -> nn.Module:
    return KLAutoencoder(1, 28, latent_channels=recipe.option("latent_channels", AE_LATENT_CHANNELS),
                         channels=tuple(recipe.option("ae_channels", (32, 64))))


def _ae_loss(recipe, model, context):
    beta = float(recipe.option("beta", AE_BETA))

    def loss(model, batch, g):
        x, _ = batch
        return autoencoder_loss(model, x, beta=beta, generator=g)
    return loss


@torch.no_grad()
def _ae_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    from .datasets import load_mnist

    model.eval()
    train = load_mnist("train", verbose=False)
    scale = fit_latent_scale(model, train.images[:2000] if fast else train.images)
    x, y = held_out.images, held_out.labels
    recon = torch.cat([model(part) for part in x.split(500)])
    mean, logvar = model.posterior(x)
    out = {"reconstruction_mse": float((recon - x).pow(2).mean()), "latent_scale": scale,
           "latent_shape": list(model.latent_shape),
           "kl_per_latent_dim": float(gaussian_kl(mean, logvar).mean()) / mean[0].numel(),
           "held_out": len(x)}
    if classifier is not None:
        out["accuracy_on_reconstructions"] = float((classifier(recon).argmax(1) == y).double().mean())
        out["accuracy_on_originals"] = float((classifier(x).argmax(1) == y).double().mean())
    return out


register_kind("autoencoder", RecipeKind(_build_ae, _ae_loss, _ae_metrics, needs_classifier=True))
register_recipe(Recipe(
    "mnist_autoencoder", "autoencoder", steps=1000, batch_size=128, lr=2e-3, fast_steps=3,
    options=(("latent_channels", AE_LATENT_CHANNELS), ("beta", AE_BETA), ("ae_channels", (16, 32))),
    description="KL autoencoder 28x28x1 -> 4x7x7 (1/4 of the pixels), the shared MNIST latent space"))
