"""Chapter 09's recipes: CLIP from scratch and text-conditioned latent diffusion (unCLIP's are in
:mod:`course.unclip_recipes`).

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
- unCLIP's prior and decoder: :mod:`course.unclip_recipes`, on the same captions and metrics.

The generators report (:func:`text_to_image_metrics`): the share of samples the evaluation
classifier reads as the digit their held-out caption names, MNIST-FD beside its floor, the CLIP
score (cosine in ``mnist_clip``'s space) of samples and of the real held-out digits with the same
captions, and the attribute control of :func:`~course.text_to_image.attribute_control`.
"""

from __future__ import annotations

import time

import torch
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
from .latent import sample_latents
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
    attribute_control,
    drop_captions,
    sample_from_text,
)
from .unet import UNet

__all__ = ["TEXT_MAX_LEN", "CAPTION_VARIANTS", "caption_tokenizer", "caption_dataset", "held_out_captions",
           "text_to_image_metrics", "class_attribute_stats", "evaluation_context", "zero_shot_prompts",
           "attribute_zero_shot", "clip_recipe", "load_clip", "fit_caption_scale", "eval_nfe"]

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
    fit_caption_scale(train.images, train.labels, context)
    return context


def _pick_variant(ids: Tensor, g: torch.Generator) -> Tokens:
    """One of the caption variants of each row of ``ids`` (B, K, L)."""
    chosen = ids[torch.arange(ids.shape[0]), torch.randint(ids.shape[1], (ids.shape[0],), generator=g)]
    return Tokens(chosen, chosen != PAD)


def fit_caption_scale(images, labels, context) -> AttributeScale:
    """Fit the training digits' attribute tertiles and per-class statistics into ``context``."""
    context["scale"] = AttributeScale.fit(images, labels)
    context["class_stats"] = class_attribute_stats(images, labels)
    return context["scale"]


def clip_recipe(recipe: Recipe) -> Recipe:
    """The CLIP recipe that ``recipe`` names in its option ``clip`` (default ``mnist_clip``), checked."""
    name = recipe.option("clip", "mnist_clip")
    if name not in RECIPES or RECIPES[name].kind != "clip":
        raise ValueError(f"recipe {recipe.name!r} names {name!r} as its CLIP; expected a recipe of kind 'clip'")
    return get_recipe(name)


def load_clip(recipe: Recipe, folder, fast) -> CLIP:
    """The trained CLIP that ``recipe`` names."""
    return load(clip_recipe(recipe).name, folder=folder, allow_fast=fast)


# ---- CLIP --------------------------------------------------------------------------------------------
def _build_clip(recipe: Recipe) -> nn.Module:
    return CLIP(len(caption_tokenizer()), embed_dim=recipe.option("embed_dim", 64),
                text_dim=recipe.option("text_dim", 64), text_depth=recipe.option("text_depth", 2),
                heads=4, max_len=TEXT_MAX_LEN, image_width=recipe.width)


def _clip_dataset(recipe, images, labels, context) -> tuple:
    scale = fit_caption_scale(images, labels, context)
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
def _build_text_latent(recipe: Recipe) -> nn.Module:
    _, ae = _latent_parts(recipe)
    encoder = build_model(clip_recipe(recipe)).text_encoder
    denoiser = UNet(ae.latent_channels, channels=recipe.channels, patch=1, context_dim=encoder.dim)
    return TextLatentDiffusion(ae, denoiser, encoder)


def _prepare_text_latent(recipe, model, folder, fast) -> dict:
    context = _prepare_latent(recipe, model, folder, fast)
    model.text_encoder.load_state_dict(load_clip(recipe, folder, fast).text_encoder.state_dict())
    context["score_clip"] = load("mnist_clip", folder=folder, allow_fast=fast)
    return context


def _text_latent_dataset(recipe, images, labels, context) -> tuple:
    scale = fit_caption_scale(images, labels, context)
    moments, _ = _latent_dataset(recipe, images, labels, context)
    return moments, caption_dataset(images, labels, scale, seed=recipe.seed)


def _text_latent_loss(recipe, model, context):
    p = float(recipe.option("caption_dropout", 0.1))

    def loss(model, batch, g):
        moments, ids = batch
        tokens = drop_captions(_pick_variant(ids, g), p, g)
        return cfm_loss(model, sample_latents(moments, generator=g), PATH, generator=g, **model.encode_text(tokens))
    return loss


def eval_nfe(recipe, fast) -> int:
    return 4 if fast else recipe.eval_nfe


@torch.no_grad()
def text_to_image_metrics(generate, recipe: Recipe, held_out, fast: bool, classifier, context, *,
                          attributes: bool = True) -> dict:
    """What a text-to-image generator reports. ``generate(tokens, generator) -> images``;
    ``attributes=False`` leaves out the attribute control (the slowest part)."""
    gen = torch.Generator().manual_seed(1)
    per_class = 5 if fast else 100
    evaluation = held_out.per_class(min(per_class, int((held_out.labels == 0).sum())), generator=gen)
    x, y = evaluation.images, evaluation.labels
    captions = held_out_captions(x, y, context["scale"], seed=recipe.seed)
    start = time.perf_counter()
    samples = generate(captions, torch.Generator().manual_seed(2))
    seconds = time.perf_counter() - start
    score_clip = context["score_clip"]
    out = {"w": recipe.eval_w, "euler_steps": eval_nfe(recipe, fast), "samples_per_second": len(y) / seconds,
           "clip_score": float(clip_score(score_clip, samples, captions).mean()),
           "clip_score_of_real_digits": float(clip_score(score_clip, x, captions).mean())}
    if classifier is not None:
        quality = evaluate_class_conditional(classifier, samples, y, held_out, per_class_fd=min(per_class, 50),
                                             generator=gen).as_dict()
        out.update({"named_digit_accuracy": quality.pop("class_accuracy"), **quality})
    if not attributes:
        return out
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
        return sample_from_text(model, tokens, w=recipe.eval_w, nfe=eval_nfe(recipe, fast), generator=g)
    return text_to_image_metrics(generate, recipe, held_out, fast, classifier, context)


register_kind("clip", RecipeKind(_build_clip, _clip_loss, _clip_metrics, dataset=_clip_dataset))
register_kind("text_latent", RecipeKind(_build_text_latent, _text_latent_loss, _text_latent_metrics,
                                        _prepare_text_latent, needs_classifier=True, dataset=_text_latent_dataset))
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
):
    register_recipe(_recipe)
