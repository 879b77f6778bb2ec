"""Chapter 09's recipes: CLIP from scratch, text-conditioned latent diffusion and unCLIP.

Every recipe captions the training digits the same way: attribute levels from the training set's
per-class tertiles (:class:`~course.captions.AttributeScale`), ``CAPTION_VARIANTS`` captions per
image from the training templates (one drawn per step), tokenised once. Evaluation uses the
held-out digits with captions from the *held-out* templates.

- ``mnist_clip`` (kind ``clip``): CLIP with a 2-layer, 64-wide text encoder; symmetric InfoNCE,
  random shifts of the images (they change no attribute), word dropout to ``<unk>``. Metrics:
  zero-shot digit accuracy from "a photo of the digit k" and from an ensemble of the held-out
  prompts, text -> image retrieval top-1 within groups of 100 held-out images, the share of
  held-out images at an extreme level whose own level's prompt beats the opposite one
  (``attribute_zero_shot_*``), and the learned temperature.
- ``mnist_clip_small``: the same with a 1-layer, 32-wide text encoder (Imagen's encoder-size axis).
- ``mnist_text_latent`` (kind ``text_latent``): :class:`~course.text_to_image.TextLatentDiffusion`
  on ``mnist_autoencoder``'s latents reading the frozen text encoder of ``mnist_clip`` by
  cross-attention; rectified flow, 10 % caption dropout. ``mnist_text_latent_small`` reads
  ``mnist_clip_small``'s.
- ``mnist_unclip_prior`` (kind ``unclip_prior``): the flow from a caption's CLIP text embedding to
  a CLIP image embedding (scaled by sqrt(E)); 10 % of the conditions dropped to the empty caption's
  embedding.
- ``mnist_unclip_decoder`` (kind ``unclip_decoder``): the latent U-Net conditioned on a CLIP image
  embedding (one context token; 10 % dropped to zero); measured through the whole unCLIP chain
  with ``mnist_unclip_prior``.

The generators report (:func:`text_to_image_metrics`): the share of samples the evaluation
classifier reads as the digit their held-out caption names, MNIST-FD beside its floor, the CLIP
score (cosine in ``mnist_clip``'s space) of samples and of the real held-out digits with the same
captions, and the attribute control of :func:`~course.text_to_image.attribute_control`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .captions import (
    ATTRIBUTES,
    DIGIT_WORDS,
    HELD_OUT_TEMPLATES,
    AttributeScale,
    caption_for,
    digit_attributes,
    make_captions,
    vocabulary,
)
from .clip import CLIP, clip_score, retrieval_top1, zero_shot_predict
from .flow_matching import cfm_loss
from .image_metrics import evaluate_class_conditional
from .image_recipes import PATH, random_shift
from .latent import LatentDiffusion, sample_latents
from .latent_recipes import _latent_dataset, _latent_parts, _prepare_latent
from .recipe_registry import (
    RECIPES,
    Recipe,
    RecipeKind,
    build_model,
    get_recipe,
    load,
    register_kind,
    register_recipe,
)
from .text import PAD, Tokenizer, Tokens, word_dropout
from .text_to_image import (
    TextLatentDiffusion,
    VectorDenoiser,
    attribute_control,
    drop_captions,
    embedding_scale,
    empty_tokens,
    sample_from_text,
    sample_unclip,
)
from .unet import UNet

__all__ = ["TEXT_MAX_LEN", "CAPTION_VARIANTS", "caption_tokenizer", "caption_dataset", "held_out_captions",
           "text_to_image_metrics", "class_attribute_stats", "evaluation_context", "zero_shot_prompts",
           "attribute_zero_shot"]

TEXT_MAX_LEN, CAPTION_VARIANTS = 16, 4


def caption_tokenizer() -> Tokenizer:
    """The chapter's tokenizer: the training captions' vocabulary, 16 tokens at most."""
    return Tokenizer(vocabulary(), TEXT_MAX_LEN)


def caption_dataset(images: Tensor, labels: Tensor, scale: AttributeScale, *, seed: int = 0,
                    variants: int = CAPTION_VARIANTS, split: str = "train") -> Tensor:
    """Token ids ``(N, variants, L)`` of ``variants`` captions per image."""
    tok, levels = caption_tokenizer(), scale.levels(images, labels)
    return torch.stack([tok.encode(make_captions(labels, levels, seed=seed, variant=v, split=split).texts).ids
                        for v in range(variants)], dim=1)


def held_out_captions(images: Tensor, labels: Tensor, scale: AttributeScale, *, seed: int = 0) -> Tokens:
    """One caption per held-out image from the held-out templates (variant 0)."""
    levels = scale.levels(images, labels)
    return caption_tokenizer().encode(make_captions(labels, levels, seed=seed, split="held_out").texts)


def class_attribute_stats(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per class mean and standard deviation ``(10, 3)`` of the attributes (for standardising)."""
    attrs = digit_attributes(images)
    return (torch.stack([attrs[labels == c].mean(0) for c in range(10)]),
            torch.stack([attrs[labels == c].std(0) for c in range(10)]))


def evaluation_context(folder=None, *, fast: bool = False) -> dict:
    """What :func:`text_to_image_metrics` needs beside the model: the training digits' attribute
    scale and per-class statistics, and the judging CLIP (``mnist_clip``)."""
    from .recipe_registry import load_data

    train = load_data(get_recipe("mnist_clip"), "train", verbose=False)
    context: dict = {"score_clip": load("mnist_clip", folder=folder, allow_fast=fast)}
    _scale(None, train.images, train.labels, context)
    return context


def _pick_variant(ids: Tensor, g: torch.Generator) -> Tokens:
    """One of the caption variants of each row of ``ids`` (B, K, L)."""
    chosen = ids[torch.arange(ids.shape[0]), torch.randint(ids.shape[1], (ids.shape[0],), generator=g)]
    return Tokens(chosen, chosen != PAD)


def _scale(recipe, images, labels, context) -> AttributeScale:
    context["scale"] = AttributeScale.fit(images, labels)
    context["class_stats"] = class_attribute_stats(images, labels)
    return context["scale"]


def _load_clip(recipe: Recipe, folder, fast, option: str = "clip") -> CLIP:
    name = recipe.option(option, "mnist_clip")
    if name not in RECIPES or RECIPES[name].kind != "clip":
        raise ValueError(f"recipe {recipe.name!r} names {name!r} as its CLIP; expected a recipe of kind 'clip'")
    return load(name, folder=folder, allow_fast=fast)


# ---- CLIP --------------------------------------------------------------------------------------------
def _build_clip(recipe: Recipe) -> nn.Module:
    return CLIP(len(caption_tokenizer()), embed_dim=recipe.option("embed_dim", 64),
                text_dim=recipe.option("text_dim", 64), text_depth=recipe.option("text_depth", 2),
                heads=4, max_len=TEXT_MAX_LEN, image_width=recipe.width)


def _clip_dataset(recipe, images, labels, context) -> tuple:
    scale = _scale(recipe, images, labels, context)
    return images, caption_dataset(images, labels, scale, seed=recipe.seed)


def _clip_loss(recipe, model, context):
    p = float(recipe.option("word_dropout", 0.1))

    def loss(model, batch, g):
        images, ids = batch
        tokens = _pick_variant(ids, g)
        ids = word_dropout(tokens.ids, p, g)
        return model.loss(random_shift(images, recipe.max_shift, g), Tokens(ids, tokens.mask))
    return loss


def zero_shot_prompts(template: str | None = None) -> list[Tokens]:
    """Per digit, the tokens of ``template`` (e.g. "a photo of the digit {name}") or, by default, every
    held-out bare template with the digit as word and as numeral (an ensemble)."""
    tok = caption_tokenizer()
    forms = (template,) if template else HELD_OUT_TEMPLATES["bare"]
    names = (lambda d: [DIGIT_WORDS[d]]) if template else (lambda d: [DIGIT_WORDS[d], str(d)])
    return [tok.encode([f.format(name=n, adj="") for f in forms for n in names(d)]) for d in range(10)]


@torch.no_grad()
def attribute_zero_shot(clip: CLIP, images: Tensor, labels: Tensor, levels: Tensor) -> dict[str, float]:
    """Per attribute, over the images at an extreme level: the share whose own level's prompt (e.g.
    "a photo of the digit seven, bold") is nearer than the opposite level's."""
    tok, template = caption_tokenizer(), HELD_OUT_TEMPLATES["described"][0]
    emb = clip.encode_image(images)
    out = {}
    for a, attribute in enumerate(ATTRIBUTES):
        extreme = (levels[:, a] != 0).nonzero().squeeze(1)
        sims = {}
        for level in (-1, 1):
            texts = [caption_for(int(labels[i]), {attribute: level}, template=template) for i in extreme]
            sims[level] = (emb[extreme] * clip.encode_text(tok.encode(texts))).sum(1)
        right = torch.where(levels[extreme, a] == 1, sims[1] > sims[-1], sims[-1] > sims[1])
        out[f"attribute_zero_shot_{attribute}"] = float(right.double().mean())
    return out


@torch.no_grad()
def _clip_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    model.eval()
    x, y = held_out.images, held_out.labels
    scale = context["scale"]
    photo = zero_shot_predict(model, x, zero_shot_prompts(HELD_OUT_TEMPLATES["bare"][0]))
    ensemble = zero_shot_predict(model, x, zero_shot_prompts())
    captions = held_out_captions(x, y, scale, seed=recipe.seed)
    group = min(100, len(x))
    tops = [retrieval_top1(model, x[i:i + group], captions[i:i + group]) for i in range(0, len(x) - group + 1, group)]
    out = {"zero_shot_accuracy_photo_prompt": float((photo == y).double().mean()),
           "zero_shot_accuracy_ensemble": float((ensemble == y).double().mean()),
           "retrieval_top1_groups_of_100": sum(tops) / len(tops),
           "held_out": len(x), "logit_scale_exp": float(model.logit_scale.exp()),
           "unknown_words_in_held_out_captions": sum(captions.unknown.values())}
    out.update(attribute_zero_shot(model, x, y, scale.levels(x, y)))
    return out


# ---- text-conditioned latent diffusion -------------------------------------------------------------
def _text_encoder_of(recipe: Recipe):
    name = recipe.option("clip", "mnist_clip")
    if name not in RECIPES or RECIPES[name].kind != "clip":
        raise ValueError(f"recipe {recipe.name!r} names {name!r} as its CLIP; expected a recipe of kind 'clip'")
    return build_model(get_recipe(name)).text_encoder


def _build_text_latent(recipe: Recipe) -> nn.Module:
    _, ae = _latent_parts(recipe)
    encoder = _text_encoder_of(recipe)
    denoiser = UNet(ae.latent_channels, channels=recipe.channels, patch=1, context_dim=encoder.dim)
    return TextLatentDiffusion(ae, denoiser, encoder)


def _prepare_text_latent(recipe, model, folder, fast) -> dict:
    context = _prepare_latent(recipe, model, folder, fast)
    model.text_encoder.load_state_dict(_load_clip(recipe, folder, fast).text_encoder.state_dict())
    context["score_clip"] = load("mnist_clip", folder=folder, allow_fast=fast)
    return context


def _text_latent_dataset(recipe, images, labels, context) -> tuple:
    scale = _scale(recipe, images, labels, context)
    moments, _ = _latent_dataset(recipe, images, labels, context)
    return moments, caption_dataset(images, labels, scale, seed=recipe.seed)


def _text_latent_loss(recipe, model, context):
    p = float(recipe.option("caption_dropout", 0.1))

    def loss(model, batch, g):
        moments, ids = batch
        tokens = drop_captions(_pick_variant(ids, g), p, g)
        return cfm_loss(model, sample_latents(moments, generator=g), PATH, generator=g, **model.encode_text(tokens))
    return loss


def _eval_nfe(recipe, fast) -> int:
    return 4 if fast else recipe.eval_nfe


@torch.no_grad()
def text_to_image_metrics(generate, recipe: Recipe, held_out, fast: bool, classifier, context) -> dict:
    """What a text-to-image generator reports. ``generate(tokens, generator) -> images``."""
    gen = torch.Generator().manual_seed(1)
    per_class = 5 if fast else 100
    evaluation = held_out.per_class(min(per_class, int((held_out.labels == 0).sum())), generator=gen)
    x, y = evaluation.images, evaluation.labels
    captions = held_out_captions(x, y, context["scale"], seed=recipe.seed)
    start = time.perf_counter()
    samples = generate(captions, torch.Generator().manual_seed(2))
    seconds = time.perf_counter() - start
    score_clip = context["score_clip"]
    out = {"w": recipe.eval_w, "euler_steps": _eval_nfe(recipe, fast), "samples_per_second": len(y) / seconds,
           "clip_score": float(clip_score(score_clip, samples, captions).mean()),
           "clip_score_of_real_digits": float(clip_score(score_clip, x, captions).mean())}
    if classifier is not None:
        quality = evaluate_class_conditional(classifier, samples, y, held_out, per_class_fd=min(per_class, 50),
                                             generator=gen).as_dict()
        out.update({"named_digit_accuracy": quality.pop("class_accuracy"), **quality})
    tok = caption_tokenizer()
    mean, std = context["class_stats"]
    control = attribute_control(lambda prompts, g: generate(tok.encode(prompts), g),
                                templates=HELD_OUT_TEMPLATES["described"][:1 if fast else 3],
                                per_prompt=2 if fast else 16, digits=range(10), class_mean=mean, class_std=std)
    out.update({f"attribute_{k}": v for k, v in control.items()})
    return out


@torch.no_grad()
def _text_latent_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    def generate(tokens, g):
        return sample_from_text(model, tokens, w=recipe.eval_w, nfe=_eval_nfe(recipe, fast), generator=g)
    return text_to_image_metrics(generate, recipe, held_out, fast, classifier, context)


# ---- unCLIP ------------------------------------------------------------------------------------------
def _clip_dim(recipe: Recipe) -> int:
    return get_recipe(recipe.option("clip", "mnist_clip")).option("embed_dim", 64)


def _build_prior(recipe: Recipe) -> nn.Module:
    dim = _clip_dim(recipe)
    return VectorDenoiser(dim, dim, hidden=recipe.option("hidden", 256), depth=recipe.option("depth", 3))


def _prepare_clip(recipe, model, folder, fast) -> dict:
    clip = _load_clip(recipe, folder, fast)
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
    scale = _scale(recipe, images, labels, context)
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
    from .text_to_image import sample_vectors

    model.eval()
    clip, gen = context["clip"].eval(), torch.Generator().manual_seed(1)
    evaluation = held_out.per_class(5 if fast else 100, generator=gen)
    x, y = evaluation.images, evaluation.labels
    text = clip.encode_text(held_out_captions(x, y, context["scale"], seed=recipe.seed))
    w = float(recipe.option("prior_w", 1.0))
    sampled = F.normalize(sample_vectors(model, {"cond": text}, {"cond": context["empty_text"]}, tuple(text.shape),
                                         w=w, nfe=_eval_nfe(recipe, fast), generator=gen), dim=1)
    real = clip.encode_image(x)
    classes = torch.stack([F.normalize(clip.encode_text(p).mean(0), dim=-1) for p in zero_shot_prompts()])
    return {"w": w, "euler_steps": _eval_nfe(recipe, fast),
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
    _scale(recipe, images, labels, context)
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
                                  nfe_prior=_eval_nfe(recipe, fast), nfe=_eval_nfe(recipe, fast), generator=g)
        return images
    out = text_to_image_metrics(generate, recipe, held_out, fast, classifier, context)
    out["prior_w"] = w_prior
    return out


register_kind("clip", RecipeKind(_build_clip, _clip_loss, _clip_metrics, dataset=_clip_dataset))
register_kind("text_latent", RecipeKind(_build_text_latent, _text_latent_loss, _text_latent_metrics,
                                        _prepare_text_latent, needs_classifier=True, dataset=_text_latent_dataset))
register_kind("unclip_prior", RecipeKind(_build_prior, _prior_loss, _prior_metrics, _prepare_clip,
                                         dataset=_prior_dataset))
register_kind("unclip_decoder", RecipeKind(_build_decoder, _decoder_loss, _decoder_metrics, _prepare_decoder,
                                           needs_classifier=True, dataset=_decoder_dataset))
for _recipe in (
    Recipe("mnist_clip", "clip", steps=3000, batch_size=256, lr=1e-3, width=16, fast_steps=3,
           options=(("embed_dim", 64), ("text_dim", 64), ("text_depth", 2), ("word_dropout", 0.1)),
           description="CLIP from scratch on captioned MNIST: CNN image tower, 2-layer 64-wide text transformer"),
    Recipe("mnist_clip_small", "clip", steps=3000, batch_size=256, lr=1e-3, width=16, fast_steps=3,
           options=(("embed_dim", 64), ("text_dim", 32), ("text_depth", 1), ("word_dropout", 0.1)),
           description="CLIP with a 1-layer, 32-wide text transformer (the small text encoder of the Imagen curve)"),
    Recipe("mnist_text_latent", "text_latent", steps=3000, batch_size=128, lr=2e-3, channels=(32, 64, 64), patch=1,
           fast_steps=3, eval_w=2.0, options=(("autoencoder", "mnist_autoencoder"), ("clip", "mnist_clip"),
                                                ("caption_dropout", 0.1)),
           description="text-to-image: latent U-Net reading mnist_clip's frozen text encoder by cross-attention, "
                       "10% caption dropout (CFG with the empty caption)"),
    Recipe("mnist_text_latent_small", "text_latent", steps=3000, batch_size=128, lr=2e-3, channels=(32, 64, 64),
           patch=1, fast_steps=3, eval_w=2.0,
           options=(("autoencoder", "mnist_autoencoder"), ("clip", "mnist_clip_small"), ("caption_dropout", 0.1)),
           description="as mnist_text_latent, reading the small text encoder of mnist_clip_small"),
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
