"""Chapter 07's MNIST students as ``course train`` recipes: consistency tuning and the
progressive-distillation ladder, both from the shipped chapter-06 teacher ``mnist_cfm_unet``.

- ``mnist_cd_student`` (kind ``consistency_student``): ``ConsistencyFunction`` with the "ddim"
  parameterisation f = x - (t - t_min) F(x, t, y), F initialised from the teacher's weights (so it
  starts as the teacher's one-step Euler jump), trained by consistency distillation on the 18-time
  rho = 7 grid; the teacher step is one Euler step of the *guided* velocity (classifier-free
  guidance at ``eval_w``), so the guidance is baked in and the student costs 1 NFE per step.
- ``mnist_meanflow_student`` (kind ``meanflow_student``): a U-Net with an interval embedding
  (average velocity u(x, t, r)), loaded with the teacher's weights (u = v at first) and trained with
  the MeanFlow loss whose v is the teacher's guided velocity; sampled in 1 or 2 steps.
- ``mnist_pd_16`` ... ``mnist_pd_1`` (kind ``pd_student``): each a velocity U-Net initialised from
  its teacher and trained to take one Euler (= DDIM) step where the teacher takes two, on uniform
  grids: the 32-step guided teacher -> 16 -> 8 -> 4 -> 2 -> 1 student steps. ``course train`` runs one
  rung; each rung needs the one before it.

Metrics are those of every generator recipe (``recipes.sample_metrics``) at the student's NFE.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .consistency import (
    ConsistencyFunction,
    EMATarget,
    consistency_distillation_loss,
    consistency_grid,
    sample_consistency,
)
from .conversions import as_prediction_fn
from .distillation import progressive_distillation_loss
from .fast_samplers import sampling_grid
from .guidance import classifier_free_guidance
from .image_recipes import PATH, eval_labels, sample_classes, sample_metrics
from .meanflow import meanflow_loss, sample_meanflow
from .recipe_registry import (
    RECIPES,
    Recipe,
    RecipeKind,
    load,
    manifest,
    register_kind,
    register_recipe,
)
from .shortcut import shortcut_loss
from .unet import UNet

__all__ = ["T_MIN", "CD_GRID_SIZE", "CD_SECOND_INDEX", "SHORTCUT_MAX_STEPS", "teacher_velocity"]

T_MIN, CD_GRID_SIZE = 1e-3, 18
CD_SECOND_INDEX = 15  # the two-step consistency sampler's second time: grid[15] = 0.585 of the 18-time grid


def _unet(recipe: Recipe) -> nn.Module:
    return UNet(1, channels=recipe.channels, num_classes=10, patch=recipe.patch)


def _load_teacher(recipe: Recipe, folder, fast: bool) -> tuple[nn.Module, dict]:
    if recipe.teacher not in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} names an unknown teacher {recipe.teacher!r}")
    teacher = load(recipe.teacher, folder=folder, allow_fast=fast).requires_grad_(False)
    return teacher, manifest(folder).get(recipe.teacher, {})


def teacher_velocity(recipe: Recipe, teacher: nn.Module):
    """The velocity a student distils: the chapter-06 generator with classifier-free guidance at
    ``recipe.eval_w`` (2 NFE a call), or an earlier student as it is (guidance already baked in)."""
    if RECIPES[recipe.teacher].kind == "cfm_unet":
        return classifier_free_guidance(teacher, recipe.eval_w, null_label=teacher.num_classes)
    return teacher


# ---- consistency tuning -------------------------------------------------------------------------------
def _build_cd(recipe: Recipe) -> nn.Module:
    return ConsistencyFunction(_unet(recipe), PATH, t_min=T_MIN, parameterisation="ddim", prediction="velocity")


def _prepare_cd(recipe, model, folder, fast) -> dict:
    teacher, _ = _load_teacher(recipe, folder, fast)
    model.net.load_state_dict(teacher.state_dict())
    return {"velocity": teacher_velocity(recipe, teacher), "target": EMATarget(model, mu=0.95),
            "grid": consistency_grid(CD_GRID_SIZE, t_min=T_MIN)}


def _cd_loss(recipe, model, context):
    velocity, target, grid = context["velocity"], context["target"], context["grid"]

    def loss(model, batch, g):
        x, y = batch
        target.update(model)
        return consistency_distillation_loss(model, target, velocity, x, grid, path=PATH, solver="euler",
                                             generator=g, y=y)
    return loss


@torch.no_grad()
def _few_step_metrics(model, held_out, fast, classifier, schedules, sample) -> dict:
    """Metrics of a few-step sampler ``sample(model, x1, ts, generator, y)`` at each named schedule."""
    model.eval()
    labels, out = eval_labels(fast), {}
    for name, ts, nfe in schedules:
        gen = torch.Generator().manual_seed(1)
        x1 = torch.randn((len(labels), 1, 28, 28), generator=gen)
        start = time.perf_counter()
        x = torch.cat([sample(model, a, torch.tensor(ts), gen, b)
                       for a, b in zip(x1.split(500), labels.split(500), strict=True)])
        out[name] = sample_metrics(classifier, x, labels, held_out, time.perf_counter() - start, nfe,
                                   generator=torch.Generator().manual_seed(1))
    return out


def _cd_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    second = float(context["grid"][CD_SECOND_INDEX])

    def sample(model, x1, ts, gen, y):
        return sample_consistency(model, x1, ts, path=PATH, t_min=T_MIN, generator=gen, y=y)

    out = _few_step_metrics(model, held_out, fast, classifier, (("1_step", [1.0], 1), ("2_steps", [1.0, second], 2)),
                            sample)
    out["2_steps"]["second_time"] = second
    return out


# ---- progressive distillation ------------------------------------------------------------------------
def _prepare_pd(recipe, model, folder, fast) -> dict:
    teacher, entry = _load_teacher(recipe, folder, fast)
    model.load_state_dict(teacher.state_dict())
    earlier = entry.get("metrics", {}).get("ladder_train_seconds", 0.0)
    return {"teacher_x0": as_prediction_fn(teacher_velocity(recipe, teacher), PATH, "velocity", "x0"),
            "grid": sampling_grid(2 * recipe.student_steps, kind="uniform", t_min=0.0), "earlier_seconds": earlier}


def _pd_loss(recipe, model, context):
    teacher_x0, grid = context["teacher_x0"], context["grid"]

    def loss(model, batch, g):
        x, y = batch
        return progressive_distillation_loss(as_prediction_fn(model, PATH, "velocity", "x0"), teacher_x0, x, grid,
                                             path=PATH, generator=g, y=y)
    return loss


def _pd_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    labels, gen = eval_labels(fast), torch.Generator().manual_seed(1)
    start = time.perf_counter()
    samples = sample_classes(model, labels, w=0.0, nfe=recipe.student_steps, generator=gen)
    out = sample_metrics(classifier, samples, labels, held_out, time.perf_counter() - start, recipe.student_steps,
                         generator=gen)
    out["ladder_train_seconds"] = round(context["earlier_seconds"] + context["train_seconds"], 1)
    return out


# ---- MeanFlow from the teacher --------------------------------------------------------------------------
def _build_mf(recipe: Recipe) -> nn.Module:
    return UNet(1, channels=recipe.channels, num_classes=10, patch=recipe.patch, interval=True)


def _prepare_mf(recipe, model, folder, fast) -> dict:
    teacher, _ = _load_teacher(recipe, folder, fast)
    missing = model.load_state_dict(teacher.state_dict(), strict=False).missing_keys
    if not all(k.startswith("interval.") for k in missing):  # only the new, zero-initialised embedding may be new
        raise ValueError(f"teacher {recipe.teacher!r} does not fit a MeanFlow U-Net: missing {missing}")
    return {"velocity": teacher_velocity(recipe, teacher)}


def _mf_loss(recipe, model, context):
    velocity = context["velocity"]

    def loss(model, batch, g):
        x, y = batch
        return meanflow_loss(model, x, PATH, teacher_velocity=velocity, generator=g, y=y)
    return loss


def _mf_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    def sample(model, x1, ts, gen, y):
        return sample_meanflow(model, x1, ts, y=y)

    return _few_step_metrics(model, held_out, fast, classifier,
                             (("1_step", [1.0, 0.0], 1), ("2_steps", [1.0, 0.5, 0.0], 2)), sample)


# ---- shortcut model from the teacher ------------------------------------------------------------------------
SHORTCUT_MAX_STEPS = 8  # step sizes 1/8 .. 1 (the sampler uses 1 and 1/2); the finest starts as the teacher's


def _sc_loss(recipe, model, context):
    velocity = context["velocity"]

    def loss(model, batch, g):
        x, y = batch
        return shortcut_loss(model, x, PATH, max_steps=SHORTCUT_MAX_STEPS, teacher_velocity=velocity, generator=g, y=y)
    return loss


register_kind("consistency_student", RecipeKind(_build_cd, _cd_loss, _cd_metrics, _prepare_cd, needs_classifier=True))
register_kind("meanflow_student", RecipeKind(_build_mf, _mf_loss, _mf_metrics, _prepare_mf, needs_classifier=True))
register_kind("pd_student", RecipeKind(_unet, _pd_loss, _pd_metrics, _prepare_pd, needs_classifier=True))
register_kind("shortcut_student", RecipeKind(_build_mf, _sc_loss, _mf_metrics, _prepare_mf, needs_classifier=True))

register_recipe(Recipe(
    "mnist_cd_student", "consistency_student", steps=800, batch_size=128, lr=1e-4, fast_steps=3,
    teacher="mnist_cfm_unet", eval_w=1.0,
    description="consistency tuning of mnist_cfm_unet (CFG w = 1 baked in): 1- and 2-step generator"))
register_recipe(Recipe(
    "mnist_meanflow_student", "meanflow_student", steps=550, batch_size=128, lr=1e-4, fast_steps=3,
    teacher="mnist_cfm_unet", eval_w=1.0,
    description="MeanFlow from mnist_cfm_unet's weights, v = its guided velocity (w = 1): 1- and 2-step generator"))
# steps per rung: the whole ladder fits 10 CPU-minutes on 2 cores (round 1 has the guided, 2-NFE teacher:
# about 0.95 s a step against 0.65 s for the later rounds)
register_recipe(Recipe(
    "mnist_shortcut_student", "shortcut_student", steps=850, batch_size=128, lr=1e-4, fast_steps=3,
    teacher="mnist_cfm_unet", eval_w=1.0,
    description="shortcut model from mnist_cfm_unet's weights, flow-matching rows on its guided velocity (w = 1): "
                "1- and 2-step generator"))
_PD_STEPS = {16: 100, 8: 180, 4: 180, 2: 180, 1: 180}
_teacher = "mnist_cfm_unet"
for _n, _steps in _PD_STEPS.items():
    register_recipe(Recipe(
        f"mnist_pd_{_n}", "pd_student", steps=_steps, batch_size=128, lr=2e-4, fast_steps=3, teacher=_teacher,
        eval_w=1.0, student_steps=_n,
        description=f"progressive distillation: {_n}-step student of {_teacher} ({2 * _n} steps)"))
    _teacher = f"mnist_pd_{_n}"
