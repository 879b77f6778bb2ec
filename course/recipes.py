"""Named training recipes: ``course train NAME`` runs one; this module is their catalogue.

Importing it registers every chapter's recipe kinds and recipes:
- ``course.score_recipes`` (chapters 02-04): ``mnist_score_vp``, the unconditional score model of
  digits;
- ``course.image_recipes`` (chapter 06): ``mnist_classifier``, ``mnist_noisy_classifier``,
  ``mnist_cfm_unet``, and the sampling and metrics every generator's recipe shares;
- ``course.distillation_recipes`` (chapter 07): the progressive-distillation ladder and the one-
  and few-step students;
- ``course.latent_recipes`` (chapter 08): the autoencoders and latent models;
- ``course.scaling_recipes`` (chapter 10): DiTs (the scaling grid and the shipped one), SDXL's
  micro-conditioning and refiner, ControlNet;
- ``course.gan_recipes`` (chapter 11): GANs with and without Diffusion-GAN's augmentation, and the
  adversarial one-step students (ADD, LADD, Diffusion2GAN) with their ablations;
- ``course.text_recipes`` (chapter 09): CLIP from scratch, text-conditioned latent diffusion and
  unCLIP;
- ``course.autoregressive_recipes`` (chapter 12): MAR on the latent space, Diffusion Forcing and
  its teacher-forcing baseline on the pendulum.

The machinery (``Recipe``, ``RecipeKind``, ``run_recipe``, checkpoints and the manifest) lives in
``course.recipe_registry``; everything is re-exported here.
"""

from __future__ import annotations

from . import (  # noqa: F401  (they register their kinds and recipes)
    autoregressive_recipes,
    distillation_recipes,
    gan_recipes,
    latent_recipes,
    scaling_recipes,
    score_recipes,
    text_recipes,
    unclip_recipes,
)
from .image_recipes import PATH, eval_labels, random_shift, sample_classes, sample_metrics
from .recipe_registry import (
    DATASETS,
    KINDS,
    RECIPES,
    Recipe,
    RecipeKind,
    RecipeResult,
    build_model,
    checkpoint_dir,
    get_recipe,
    load_data,
    recipe_loss,
    register_kind,
    register_recipe,
    run_recipe,
    sha256_of,
)

__all__ = ["Recipe", "RecipeKind", "RecipeResult", "RECIPES", "KINDS", "DATASETS", "register_kind",
           "register_recipe", "get_recipe", "build_model", "recipe_loss", "run_recipe", "load_data", "sample_classes",
           "sample_metrics", "eval_labels", "random_shift", "PATH", "checkpoint_dir", "sha256_of"]
