"""Chapter 09 benchmark: CLIP from scratch, text-conditioned latent diffusion against unCLIP, and
Imagen's trade-off between MNIST-FD and CLIP score for two text-encoder sizes.

Usage (COURSE_OFFLINE=1 for the offline MNIST digits; every mode uses the shipped checkpoints):
    python benchmarks/bench_09_text_to_image.py --clip        # both CLIPs on the held-out digits (~20 s)
    python benchmarks/bench_09_text_to_image.py --generators  # direct text conditioning vs unCLIP (~3 min)
    python benchmarks/bench_09_text_to_image.py --imagen      # FD against CLIP score as w varies, 2 encoders (~3 min)

--clip: zero-shot digit accuracy from "a photo of the digit k" and from the ensemble of held-out
prompts, text -> image retrieval top-1 within groups of 100 held-out digits, the attribute
zero-shot shares, the learned temperature, training time from the manifest.

--generators: mnist_text_latent, mnist_text_latent_small and unCLIP (mnist_unclip_prior +
mnist_unclip_decoder) at their recipes' settings on 1 000 held-out captions (held-out templates):
the share the evaluation classifier reads as the named digit, MNIST-FD beside its floor, the CLIP
score (mnist_clip) beside that of the real digits with the same captions, the attribute control
(90 prompt pairs: 10 digits x 3 held-out templates x 3 attributes, 16 samples per prompt, the same
noise for both prompts of a pair) and samples per second.

--imagen: the guidance weight w in {0, 0.5, 1, 2, 4} for both text-conditioned models: FD
against CLIP score, Imagen's Figure (a) at MNIST scale.
"""

from __future__ import annotations

import argparse
import json

import torch

from course.pretrained import load
from course.recipe_registry import checkpoint_dir, get_recipe, load_data
from course.text_recipes import (
    TEXT_MAX_LEN,
    _clip_metrics,
    evaluation_context,
    text_to_image_metrics,
)
from course.text_to_image import empty_tokens, sample_from_text, sample_unclip


def _manifest() -> dict:
    return json.loads((checkpoint_dir() / "manifest.json").read_text())


def clip_table() -> None:
    held_out = load_data(get_recipe("mnist_clip"), "test", verbose=False)
    context = evaluation_context()
    print("| CLIP | text encoder | zero-shot (photo prompt) | zero-shot (ensemble) | retrieval top-1 / 100 | "
          "thickness | slant | width | exp(s) | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("mnist_clip", "mnist_clip_small"):
        recipe = get_recipe(name)
        m = _clip_metrics(recipe, load(name), held_out, False, None, context)
        enc = f"{recipe.option('text_depth')} x {recipe.option('text_dim')}"
        print(f"| {name} | {enc} | {m['zero_shot_accuracy_photo_prompt']:.1%} | {m['zero_shot_accuracy_ensemble']:.1%} "
              f"| {m['retrieval_top1_groups_of_100']:.1%} | {m['attribute_zero_shot_thickness']:.1%} | "
              f"{m['attribute_zero_shot_slant']:.1%} | {m['attribute_zero_shot_width']:.1%} | "
              f"{m['logit_scale_exp']:.1f} | {_manifest()[name]['train_seconds']:.0f} |")


def _text_generator(model, w, nfe):
    def generate(tokens, g):
        return sample_from_text(model, tokens, w=w, nfe=nfe, generator=g)
    return generate


def _unclip_generator(w, nfe):
    prior, decoder, clip = load("mnist_unclip_prior"), load("mnist_unclip_decoder"), load("mnist_clip")
    empty = clip.encode_text(empty_tokens(1, TEXT_MAX_LEN)).detach()
    w_prior = float(get_recipe("mnist_unclip_prior").option("prior_w"))

    def generate(tokens, g):
        with torch.no_grad():
            return sample_unclip(prior, decoder, clip.encode_text(tokens), empty, w_prior=w_prior, w=w,
                                 nfe_prior=nfe, nfe=nfe, generator=g)[0]
    return generate


def generators_table() -> None:
    held_out = load_data(get_recipe("mnist_clip"), "test", verbose=False)
    context, classifier = evaluation_context(), load("mnist_classifier")
    rows = []
    for name in ("mnist_text_latent", "mnist_text_latent_small", "mnist_unclip_decoder"):
        recipe = get_recipe(name)
        gen = (_unclip_generator(recipe.eval_w, recipe.eval_nfe) if name == "mnist_unclip_decoder"
               else _text_generator(load(name), recipe.eval_w, recipe.eval_nfe))
        m = text_to_image_metrics(gen, recipe, held_out, False, classifier, context)
        rows.append(("unCLIP (prior + decoder)" if name == "mnist_unclip_decoder" else name, recipe.eval_w, m))
    print("| generator | w | named digit | MNIST-FD (floor) | CLIP score (real) | direction thick / slant / width "
          "| rho thick / slant / width | samples/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, w, m in rows:
        print(f"| {name} | {w:g} | {m['named_digit_accuracy']:.1%} | {m['mnist_fd']:.2f} ({m['mnist_fd_floor']:.2f}) "
              f"| {m['clip_score']:.3f} ({m['clip_score_of_real_digits']:.3f}) | "
              f"{m['attribute_direction_thickness']:.0%} / {m['attribute_direction_slant']:.0%} / "
              f"{m['attribute_direction_width']:.0%} | {m['attribute_rho_thickness']:.2f} / "
              f"{m['attribute_rho_slant']:.2f} / {m['attribute_rho_width']:.2f} | {m['samples_per_second']:.0f} |")
    print(f"attribute pairs per generator: {rows[0][2]['attribute_pairs']}, "
          f"{rows[0][2]['attribute_per_prompt']} samples per prompt")


def imagen_table(weights=(0.0, 0.5, 1.0, 2.0, 4.0)) -> None:
    held_out = load_data(get_recipe("mnist_clip"), "test", verbose=False)
    context, classifier = evaluation_context(), load("mnist_classifier")
    print("| text encoder | w | MNIST-FD (floor) | CLIP score | named digit |")
    print("|---|---|---|---|---|")
    for name in ("mnist_text_latent_small", "mnist_text_latent"):
        recipe, model = get_recipe(name), load(name)
        clip = get_recipe(recipe.option("clip"))
        enc = f"{clip.option('text_depth')} x {clip.option('text_dim')} ({recipe.option('clip')})"
        for w in weights:
            m = text_to_image_metrics(_text_generator(model, w, recipe.eval_nfe), recipe, held_out, False, classifier,
                                     context, attributes=False)
            print(f"| {enc} | {w:g} | {m['mnist_fd']:.2f} ({m['mnist_fd_floor']:.2f}) | {m['clip_score']:.3f} | "
                  f"{m['named_digit_accuracy']:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", action="store_true")
    parser.add_argument("--generators", action="store_true")
    parser.add_argument("--imagen", action="store_true")
    args = parser.parse_args()
    if not (args.clip or args.generators or args.imagen):
        parser.error("choose at least one of --clip, --generators, --imagen")
    torch.manual_seed(0)
    if args.clip:
        clip_table()
    if args.generators:
        generators_table()
    if args.imagen:
        imagen_table()


if __name__ == "__main__":
    main()
