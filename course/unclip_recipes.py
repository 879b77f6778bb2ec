"""Chapter 09's unCLIP recipes (DALL-E 2 in miniature), on the captions and metrics of
:mod:`course.text_recipes`.

- ``mnist_unclip_prior`` (kind ``unclip_prior``): the flow from a caption's CLIP text embedding to
  a CLIP image embedding (scaled by sqrt(E)); 10 % of the conditions dropped to the empty caption's
  embedding. Metrics: cosines of sampled and real image embeddings with the captions and with each
  other, zero-shot accuracy of the sampled embeddings.
- ``mnist_unclip_decoder`` (kind ``unclip_decoder``): the latent U-Net conditioned on a CLIP image
  embedding (one context token; 10 % dropped to zero); measured through the whole unCLIP chain
  with ``mnist_unclip_prior`` by :func:`~course.text_recipes.text_to_image_metrics`.

The training set's CLIP embeddings are computed once, by the frozen CLIP, in each kind's dataset
hook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip import CLIP
from .flow_matching import cfm_loss
from .image_recipes import PATH
from .latent import LatentDiffusion, sample_latents
from .latent_recipes import _latent_dataset, _latent_parts, _prepare_latent
from .recipe_registry import Recipe, RecipeKind, get_recipe, load, register_kind, register_recipe
from .text import PAD, Tokens
from .text_recipes import (
    TEXT_MAX_LEN,
    caption_dataset,
    clip_recipe,
    eval_nfe,
    fit_caption_scale,
    held_out_captions,
    load_clip,
    text_to_image_metrics,
    zero_shot_prompts,
)
from .text_to_image import (
    VectorDenoiser,
    embedding_scale,
    empty_tokens,
    sample_unclip,
    sample_vectors,
)
from .unet import UNet

__all__: list[str] = []


def _clip_dim(recipe: Recipe) -> int:
    return clip_recipe(recipe).option("embed_dim", 64)


def _build_prior(recipe: Recipe) -> nn.Module:
    dim = _clip_dim(recipe)
    return VectorDenoiser(dim, dim, hidden=recipe.option("hidden", 256), depth=recipe.option("depth", 3))


def _prepare_clip(recipe, model, folder, fast) -> dict:
    clip = load_clip(recipe, folder, fast)
    return {"clip": clip, "score_clip": load("mnist_clip", folder=folder, allow_fast=fast),
            "empty_text": clip.encode_text(empty_tokens(1, TEXT_MAX_LEN)).detach()}


@torch.no_grad()
def _embed_texts(clip: CLIP, ids: Tensor) -> Tensor:
    """CLIP text embeddings ``(N, K, E)`` of caption ids ``(N, K, L)``."""
    flat = ids.reshape(-1, ids.shape[-1])
    emb = torch.cat([clip.encode_text(Tokens(part, part != PAD)) for part in flat.split(1000)])
    return emb.reshape(*ids.shape[:2], -1)


@torch.no_grad()
def _embed_images(clip: CLIP, images: Tensor) -> Tensor:
    return torch.cat([clip.encode_image(part) for part in images.split(1000)])


def _prior_dataset(recipe, images, labels, context) -> tuple:
    scale = fit_caption_scale(images, labels, context)
    clip = context["clip"].eval()
    return _embed_images(clip, images), _embed_texts(clip, caption_dataset(images, labels, scale, seed=recipe.seed))


def _prior_loss(recipe, model, context):
    p, empty = float(recipe.option("text_dropout", 0.1)), context["empty_text"]
    s = embedding_scale(empty.shape[1])

    def loss(model, batch, g):
        image_emb, text_emb = batch
        cond = text_emb[torch.arange(len(text_emb)), torch.randint(text_emb.shape[1], (len(text_emb),), generator=g)]
        cond = torch.where((torch.rand(len(cond), generator=g) < p)[:, None], empty.expand_as(cond), cond)
        return cfm_loss(model, image_emb * s, PATH, generator=g, cond=cond)
    return loss


@torch.no_grad()
def _prior_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    model.eval()
    clip, gen = context["clip"].eval(), torch.Generator().manual_seed(1)
    evaluation = held_out.per_class(5 if fast else 100, generator=gen)
    x, y = evaluation.images, evaluation.labels
    text = clip.encode_text(held_out_captions(x, y, context["scale"], seed=recipe.seed))
    w = float(recipe.option("prior_w", 1.0))
    sampled = F.normalize(sample_vectors(model, {"cond": text}, {"cond": context["empty_text"]}, tuple(text.shape),
                                         w=w, nfe=eval_nfe(recipe, fast), generator=gen), dim=1)
    real = clip.encode_image(x)
    classes = torch.stack([F.normalize(clip.encode_text(p).mean(0), dim=-1) for p in zero_shot_prompts()])
    return {"w": w, "euler_steps": eval_nfe(recipe, fast),
            "cosine_sampled_to_caption": float((sampled * text).sum(1).mean()),
            "cosine_real_to_caption": float((real * text).sum(1).mean()),
            "cosine_sampled_to_own_image": float((sampled * real).sum(1).mean()),
            "zero_shot_accuracy_of_sampled": float(((sampled @ classes.T).argmax(1) == y).double().mean()),
            "zero_shot_accuracy_of_real": float(((real @ classes.T).argmax(1) == y).double().mean())}


def _build_decoder(recipe: Recipe) -> nn.Module:
    _, ae = _latent_parts(recipe)
    return LatentDiffusion(ae, UNet(ae.latent_channels, channels=recipe.channels, patch=1,
                                    context_dim=_clip_dim(recipe)))


def _prepare_decoder(recipe, model, folder, fast) -> dict:
    context = _prepare_latent(recipe, model, folder, fast)
    context.update(_prepare_clip(recipe, model, folder, fast))
    context["folder"] = folder
    return context


def _decoder_dataset(recipe, images, labels, context) -> tuple:
    fit_caption_scale(images, labels, context)
    moments, _ = _latent_dataset(recipe, images, labels, context)
    return moments, _embed_images(context["clip"].eval(), images)


def _decoder_loss(recipe, model, context):
    p = float(recipe.option("embedding_dropout", 0.1))

    def loss(model, batch, g):
        moments, emb = batch
        emb = torch.where((torch.rand(len(emb), generator=g) < p)[:, None], 0.0, emb)
        ctx = {"context": emb[:, None, :], "context_mask": torch.ones(len(emb), 1, dtype=torch.bool)}
        return cfm_loss(model, sample_latents(moments, generator=g), PATH, generator=g, **ctx)
    return loss


@torch.no_grad()
def _decoder_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    prior_name = recipe.option("prior", "mnist_unclip_prior")
    prior = load(prior_name, folder=context["folder"], allow_fast=fast)
    clip, empty = context["clip"].eval(), context["empty_text"]
    w_prior = float(get_recipe(prior_name).option("prior_w", 1.0))

    def generate(tokens, g):
        images, _ = sample_unclip(prior, model, clip.encode_text(tokens), empty, w_prior=w_prior, w=recipe.eval_w,
                                  nfe_prior=eval_nfe(recipe, fast), nfe=eval_nfe(recipe, fast), generator=g)
        return images
    out = text_to_image_metrics(generate, recipe, held_out, fast, classifier, context)
    out["prior_w"] = w_prior
    return out


register_kind("unclip_prior", RecipeKind(_build_prior, _prior_loss, _prior_metrics, _prepare_clip,
                                         dataset=_prior_dataset))
register_kind("unclip_decoder", RecipeKind(_build_decoder, _decoder_loss, _decoder_metrics, _prepare_decoder,
                                           needs_classifier=True, dataset=_decoder_dataset))
for _recipe in (
    Recipe("mnist_unclip_prior", "unclip_prior", steps=3000, batch_size=256, lr=1e-3, fast_steps=3,
           options=(("clip", "mnist_clip"), ("hidden", 256), ("depth", 3), ("text_dropout", 0.1), ("prior_w", 1.0)),
           description="unCLIP prior: a flow from a caption's CLIP text embedding to a CLIP image embedding"),
    Recipe("mnist_unclip_decoder", "unclip_decoder", steps=3000, batch_size=128, lr=2e-3, channels=(32, 64, 64),
           patch=1, fast_steps=3, eval_w=2.0,
           options=(("autoencoder", "mnist_autoencoder"), ("clip", "mnist_clip"), ("prior", "mnist_unclip_prior"),
                    ("embedding_dropout", 0.1)),
           description="unCLIP decoder: latent U-Net conditioned on a CLIP image embedding; measured through "
                       "mnist_unclip_prior"),
):
    register_recipe(_recipe)
