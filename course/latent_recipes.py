"""Chapter 08's recipes: the autoencoders whose latent space the later image chapters share, and
the latent generators.

- ``mnist_autoencoder`` (kind ``autoencoder``): ``KLAutoencoder`` 28x28x1 -> 4x7x7 trained with the
  per-dimension beta-VAE loss (``autoencoder_loss``). After training, the latent scale is measured on
  the training digits (``fit_latent_scale``) and stored with the checkpoint. Metrics on the held-out
  digits: the reconstruction's mean squared error (images in [-1, 1]), the evaluation classifier's
  accuracy on the reconstructions beside its accuracy on the originals, the mean KL per latent
  dimension, and the latent scale.
- ``mnist_latent_cfm`` (kind ``latent_cfm``): a :class:`~course.latent.LatentDiffusion` whose
  denoiser is a class-conditional U-Net on the shipped autoencoder's latents, trained with the
  rectified-flow (CFM) loss on posterior samples and 10 % label dropout (CFG). The training digits
  are encoded once; the checkpoint holds the autoencoder too. Metrics as for ``mnist_cfm_unet``
  (sampled with CFG and Euler, decoded), plus the FD of the autoencoder's reconstructions: the
  best a latent model can reach with this decoder.
- ``mnist_sr_cascade`` (kind ``sr_cascade``): a :class:`~course.cascade.Cascade` of a class-conditional
  14x14 base model (CFM, label dropout) and a 14x14 -> 28x28 super-resolution model trained with
  noise-conditioning augmentation (``sr_loss``), in one checkpoint. Metrics as for ``mnist_cfm_unet``
  on the cascade's 28x28 samples (``sample_cascade``).
- ``cifar10_autoencoder``, ``cifar10_latent_cfm``: the same on CIFAR-10 (32x32x3 -> 8x8 latents;
  needs the CIFAR-10 folder, downloaded once with a network).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from .autoencoder import KLAutoencoder, autoencoder_loss, fit_latent_scale, gaussian_kl
from .cascade import Cascade, downsample, sample_cascade, sr_loss
from .flow_matching import cfm_loss
from .image_metrics import classifier_features, feature_fd
from .image_recipes import PATH, cfm_unet_metrics, drop_labels, eval_labels, sample_metrics
from .latent import LatentDiffusion, latent_moments, sample_latents
from .recipe_registry import (
    IMAGE_SHAPES,
    RECIPES,
    Recipe,
    RecipeKind,
    get_recipe,
    load,
    manifest,
    register_kind,
    register_recipe,
)
from .unet import UNet

__all__ = ["AE_LATENT_CHANNELS", "AE_BETA"]

AE_LATENT_CHANNELS, AE_BETA = 4, 1e-3


def _build_ae(recipe: Recipe) -> nn.Module:
    channels, side, _ = IMAGE_SHAPES[recipe.data]
    return KLAutoencoder(channels, side, latent_channels=recipe.option("latent_channels", AE_LATENT_CHANNELS),
                         channels=tuple(recipe.option("ae_channels", (32, 64))))


def _ae_loss(recipe, model, context):
    beta = float(recipe.option("beta", AE_BETA))

    def loss(model, batch, g):
        x, _ = batch
        return autoencoder_loss(model, x, beta=beta, generator=g)
    return loss


def _ae_finish(recipe, model, train_data, fast, context) -> None:
    model.eval()
    context["latent_scale"] = fit_latent_scale(model, train_data.images[:2000] if fast else train_data.images)


@torch.no_grad()
def _ae_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    model.eval()
    x, y = held_out.images, held_out.labels
    recon = torch.cat([model(part) for part in x.split(500)])
    mean, logvar = model.posterior(x)
    mse = float((recon - x).pow(2).mean())
    out = {"reconstruction_mse": mse, "psnr_db": 10 * math.log10(4.0 / mse),  # peak-to-peak range 2
           "latent_scale": float(model.latent_scale),
           "latent_shape": list(model.latent_shape),
           "kl_per_latent_dim": float(gaussian_kl(mean, logvar).mean()) / mean[0].numel(),
           "held_out": len(x)}
    if classifier is not None:
        out["accuracy_on_reconstructions"] = float((classifier(recon).argmax(1) == y).double().mean())
        out["accuracy_on_originals"] = float((classifier(x).argmax(1) == y).double().mean())
    return out


def _latent_parts(recipe: Recipe) -> tuple[Recipe, nn.Module]:
    name = recipe.option("autoencoder")
    if name not in RECIPES or RECIPES[name].kind != "autoencoder":
        raise ValueError(f"recipe {recipe.name!r} names {name!r} as its autoencoder; expected a recipe of kind "
                         "'autoencoder'")
    ae_recipe = get_recipe(name)
    if ae_recipe.data != recipe.data:
        raise ValueError(f"recipe {recipe.name!r} trains on {recipe.data} but its autoencoder {name!r} on "
                         f"{ae_recipe.data}")
    return ae_recipe, _build_ae(ae_recipe)


def _build_latent(recipe: Recipe) -> nn.Module:
    _, ae = _latent_parts(recipe)
    denoiser = UNet(ae.latent_channels, channels=recipe.channels, num_classes=10, patch=recipe.patch)
    return LatentDiffusion(ae, denoiser)


def _prepare_latent(recipe, model, folder, fast) -> dict:
    ae_recipe, _ = _latent_parts(recipe)
    trained = load(ae_recipe.name, folder=folder, allow_fast=fast)
    model.autoencoder.load_state_dict(trained.state_dict())
    return {"autoencoder": model.autoencoder, "autoencoder_entry": manifest(folder).get(ae_recipe.name, {})}


def _latent_dataset(recipe, images, labels, context) -> tuple:
    start = time.perf_counter()
    moments = latent_moments(context["autoencoder"], images)
    context["encode_seconds"] = time.perf_counter() - start
    return moments, labels


def _latent_loss(recipe, model, context):
    def loss(model, batch, g):
        moments, y = batch
        y = drop_labels(y, recipe.label_dropout, g)
        return cfm_loss(model, sample_latents(moments, generator=g), PATH, generator=g, y=y)
    return loss


@torch.no_grad()
def _latent_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    out = cfm_unet_metrics(recipe, model, held_out, fast, classifier, context)
    out["encode_seconds"] = round(context["encode_seconds"], 2)
    if classifier is not None:
        out[f"{recipe.data}_fd_of_reconstructions"] = _reconstruction_fd(model, classifier, held_out, out["fd_samples"] // 10)
    return out


@torch.no_grad()
def _reconstruction_fd(model: LatentDiffusion, classifier: nn.Module, held_out, per_class: int) -> float:
    """FD of the reconstructions of held-out set A against set B (the split of the FD floor): the
    FD a latent model would reach if it generated the encoded data exactly."""
    both = held_out.per_class(2 * per_class, generator=torch.Generator().manual_seed(1))
    idx = torch.arange(len(both)).reshape(len(held_out.classes), 2 * per_class)
    a, b = both.images[idx[:, :per_class].flatten()], both.images[idx[:, per_class:].flatten()]
    recon = model.decode(model.encode(a))
    return feature_fd(classifier_features(classifier, recon), classifier_features(classifier, b))


def _build_cascade(recipe: Recipe) -> nn.Module:
    base = UNet(1, channels=recipe.channels, num_classes=10, patch=recipe.patch)
    sr = UNet(1, channels=tuple(recipe.option("sr_channels")), cond_channels=1, aug_level=True, patch=2)
    return Cascade(base, sr, low_shape=(1, 14, 14), image_shape=(1, 28, 28))


def _cascade_loss(recipe, model, context):
    max_aug = float(recipe.option("max_aug"))

    def loss(model, batch, g):
        x, y = batch
        base = cfm_loss(model.base, downsample(x), PATH, generator=g, y=drop_labels(y, recipe.label_dropout, g))
        return base + sr_loss(model.sr, x, max_aug=max_aug, generator=g)
    return loss


@torch.no_grad()
def _cascade_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    gen = torch.Generator().manual_seed(1)
    labels = eval_labels(fast)
    sr_nfe, aug = int(recipe.option("sr_nfe")), float(recipe.option("sample_aug"))
    start = time.perf_counter()
    samples = sample_cascade(model, labels, w=recipe.eval_w, nfe_base=recipe.eval_nfe, nfe_sr=sr_nfe,
                             aug_level=aug, generator=gen)
    seconds = time.perf_counter() - start
    out = {"w": recipe.eval_w, "euler_steps_base": recipe.eval_nfe, "euler_steps_sr": sr_nfe, "sample_aug": aug}
    nfe = recipe.eval_nfe * (2 if recipe.eval_w else 1) + sr_nfe  # the SR stage has no guidance: 1 NFE a step
    out.update(sample_metrics(classifier, samples, labels, held_out, seconds, nfe, generator=gen, data=recipe.data))
    return out


register_kind("autoencoder", RecipeKind(_build_ae, _ae_loss, _ae_metrics, needs_classifier=True, finish=_ae_finish))
register_kind("latent_cfm", RecipeKind(_build_latent, _latent_loss, _latent_metrics, _prepare_latent,
                                       needs_classifier=True, dataset=_latent_dataset))
register_recipe(Recipe(
    "mnist_autoencoder", "autoencoder", steps=1000, batch_size=128, lr=2e-3, fast_steps=3,
    options=(("latent_channels", AE_LATENT_CHANNELS), ("beta", AE_BETA), ("ae_channels", (16, 32))),
    description="KL autoencoder 28x28x1 -> 4x7x7 (1/4 of the pixels), the shared MNIST latent space"))
register_recipe(Recipe(
    "mnist_latent_cfm", "latent_cfm", steps=2000, batch_size=128, lr=2e-3, channels=(32, 64, 64), patch=1,
    fast_steps=3, options=(("autoencoder", "mnist_autoencoder"),),
    description="class-conditional U-Net on the 4x7x7 latents of mnist_autoencoder, rectified flow, 10% label "
                "dropout (CFG)"))
register_kind("sr_cascade", RecipeKind(_build_cascade, _cascade_loss, _cascade_metrics, needs_classifier=True))
register_recipe(Recipe(
    "mnist_sr_cascade", "sr_cascade", steps=1400, batch_size=128, lr=2e-3, channels=(32, 64, 64), patch=2,
    fast_steps=3, options=(("sr_channels", (16, 32, 32)), ("max_aug", 0.5), ("sr_nfe", 10), ("sample_aug", 0.2)),
    description="cascade: class-conditional 14x14 base model + 14x14 -> 28x28 super-resolution with "
                "noise-conditioning augmentation"))
register_recipe(Recipe(
    "cifar10_autoencoder", "autoencoder", steps=3000, batch_size=128, lr=2e-3, fast_steps=3, data="cifar10",
    options=(("latent_channels", 8), ("beta", AE_BETA), ("ae_channels", (32, 64))),
    description="KL autoencoder 32x32x3 -> 8x8x8 (1/6 of the pixels) for CIFAR-10 (not shipped: needs the data)"))
register_recipe(Recipe(
    "cifar10_latent_cfm", "latent_cfm", steps=6000, batch_size=128, lr=2e-3, channels=(64, 128, 128), patch=1,
    fast_steps=3, data="cifar10", options=(("autoencoder", "cifar10_autoencoder"),),
    description="class-conditional U-Net on the 8x8x8 latents of cifar10_autoencoder (not shipped: needs the data)"))
