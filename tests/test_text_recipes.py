"""Chapter 09's recipes in fast mode: CLIP, the text-conditioned latent model and unCLIP's prior and
decoder, trained on captioned digits, measured, saved and loaded back; the caption data they share."""

import torch

from course.captions import AttributeScale, caption_for
from course.clip import CLIP
from course.datasets import load_mnist
from course.pretrained import load
from course.recipes import build_model, get_recipe, run_recipe
from course.text import BOS, PAD
from course.text_recipes import (
    CAPTION_VARIANTS,
    TEXT_MAX_LEN,
    caption_dataset,
    caption_tokenizer,
    held_out_captions,
    zero_shot_prompts,
)
from course.text_to_image import TextLatentDiffusion, VectorDenoiser, sample_from_text


def test_caption_data_is_deterministic_and_every_caption_fits():
    data = load_mnist("train", offline=True, verbose=False)
    some = data.per_class(40, generator=torch.Generator().manual_seed(0))  # the offline set is sorted by class
    x, y = some.images, some.labels
    scale = AttributeScale.fit(x, y)
    ids = caption_dataset(x, y, scale)
    assert ids.shape == (400, CAPTION_VARIANTS, TEXT_MAX_LEN) and (ids[..., 0] == BOS).all()
    assert torch.equal(ids, caption_dataset(x, y, scale))
    assert (ids[:, 0] != ids[:, 1]).any(1).float().mean() > 0.5  # the variants differ
    assert caption_tokenizer().encode(caption_for(7)).unknown == {}
    held = held_out_captions(x, y, scale)
    assert len(held) == 400 and held.unknown["photo"] > 0  # held-out templates bring unseen words
    prompts = zero_shot_prompts("a photo of the digit {name}")
    assert len(prompts) == 10 and caption_tokenizer().decode(prompts[7].ids) == ["a <unk> of the digit seven"]
    assert len(zero_shot_prompts()[0]) == 6  # three held-out templates, word and numeral


def test_the_recipes_build_on_the_latent_space_and_clip():
    clip = build_model(get_recipe("mnist_clip"))
    assert isinstance(clip, CLIP) and clip.text_encoder.dim == 64
    assert build_model(get_recipe("mnist_clip_small")).text_encoder.dim == 32
    model = build_model(get_recipe("mnist_text_latent"))
    assert isinstance(model, TextLatentDiffusion) and model.latent_shape == (4, 7, 7)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    model.train()
    assert not model.text_encoder.training and not model.autoencoder.training
    assert build_model(get_recipe("mnist_text_latent_small")).denoiser.context_dim == 32
    assert isinstance(build_model(get_recipe("mnist_unclip_prior")), VectorDenoiser)
    assert build_model(get_recipe("mnist_unclip_decoder")).denoiser.context_dim == 64


def test_fast_runs_measure_save_and_load_back(tmp_path):
    for name in ("mnist_classifier", "mnist_autoencoder", "mnist_clip", "mnist_clip_small"):
        m = run_recipe(name, folder=tmp_path, fast=True, progress=False).metrics
    assert 0 <= m["zero_shot_accuracy_ensemble"] <= 1 and m["unknown_words_in_held_out_captions"] > 0
    assert set(m) >= {"retrieval_top1_groups_of_100", "attribute_zero_shot_thickness", "logit_scale_exp"}
    for name in ("mnist_text_latent", "mnist_unclip_prior", "mnist_unclip_decoder"):
        m = run_recipe(name, folder=tmp_path, fast=True, progress=False).metrics
        if name == "mnist_unclip_prior":
            assert -1 <= m["cosine_sampled_to_caption"] <= 1 and 0 <= m["zero_shot_accuracy_of_sampled"] <= 1
            continue
        assert 0 <= m["named_digit_accuracy"] <= 1 and m["mnist_fd"] > 0 and -1 <= m["clip_score"] <= 1
        assert m["attribute_pairs"] == 30 and 0 <= m["attribute_direction_all"] <= 1
    model = load("mnist_text_latent", folder=tmp_path, allow_fast=True)
    tokens = caption_tokenizer().encode([caption_for(3, {"thickness": 1}), ""])
    images = sample_from_text(model, tokens, w=1.0, nfe=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
    assert tokens.ids[1].tolist() == [BOS] + [PAD] * (TEXT_MAX_LEN - 1)
