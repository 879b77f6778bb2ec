"""Chapter 11's recipes: GANs with and without Diffusion-GAN's augmentation, and the three
adversarial one-step students of the shipped chapter-06 teacher ``mnist_cfm_unet``.

The recipe's model is the generator (what is saved and sampled); the discriminator lives in the
recipe's context with its own Adam optimiser and takes one step inside every generator step's
loss (:func:`_adversarial_step`), so the course's one training loop trains both.

- kind ``gan``: ``mnist_gan`` and ``mnist_diffusion_gan``, an unconditional :class:`~course.gan.Generator`
  against a :class:`~course.gan.Discriminator` with the non-saturating loss; with option
  ``diffusion`` both real and generated digits are diffused to the same times t <= t_max and
  :class:`~course.gan.AdaptiveT` moves t_max. Metrics: MNIST-FD beside its floor, the share of
  samples of each class (coverage), diversity, and the FD of generator snapshots during training.
- kind ``add_student``: ``mnist_add`` (the discriminator on the noisy classifier's frozen features
  at t = 0) and ``mnist_ladd`` (on the teacher's encoder features of noised inputs), hinge loss and
  R1, plus ADD's distillation loss; option ``adv_weight = 0`` is the distillation-only ablation.
- kind ``d2g_student``: ``mnist_d2g``, Diffusion2GAN: pairs (noise, teacher endpoint, class) made
  once from the guided teacher, a one-step student trained with the calibrated perceptual
  distance on the noisy classifier's features plus ``gan_weight`` times a conditional GAN loss
  (``gan_weight = 0``: the ablation).

Nothing trained here sees the evaluation classifier ``mnist_classifier``, whose features the
MNIST-FD is measured in: the feature networks are the noisy classifier and the teacher.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import Tensor, nn

from .adversarial import (
    FeatureDiscriminator,
    add_distillation_loss,
    diffusion2gan_loss,
    distillation_target,
    make_pairs,
    sample_student,
    student_inputs,
    student_x0,
    teacher_features,
)
from .conversions import as_prediction_fn
from .distillation_recipes import _load_teacher, teacher_velocity
from .gan import (
    AdaptiveT,
    Discriminator,
    Generator,
    d_loss_hinge,
    d_loss_nonsaturating,
    diffuse_pair,
    g_loss_hinge,
    g_loss_nonsaturating,
    r1_penalty,
    sample_generator,
)
from .image_metrics import evaluate_unconditional
from .image_recipes import PATH, eval_labels, sample_metrics
from .perceptual import PerceptualDistance, calibrate, make_triplets
from .recipe_registry import Recipe, RecipeKind, load, register_kind, register_recipe
from .unet import UNet

__all__ = ["noisy_feature_maps", "calibrated_distance", "sample_one_step"]

_LOG_EVERY = 25


def _adam(params, recipe: Recipe):
    return torch.optim.Adam(params, lr=recipe.option("d_lr", recipe.lr),
                            betas=tuple(recipe.option("adam_betas", (0.9, 0.999))))


def _adversarial_step(disc: nn.Module, opt: torch.optim.Optimizer, real: Tensor, fake: Tensor, *, loss: str,
                      r1: float, r1_now: bool = True, **cond) -> tuple[float, Tensor]:
    """One discriminator step on ``real`` and ``fake.detach()`` (R1 with weight ``r1`` on the real
    inputs when ``r1 > 0`` and ``r1_now``); returns the loss and the real logits."""
    disc.requires_grad_(True)
    r1 = r1 if r1_now else 0.0
    real = real.detach().requires_grad_(r1 > 0)
    real_logits, fake_logits = disc(real, **cond), disc(fake.detach(), **cond)
    d_loss = (d_loss_hinge if loss == "hinge" else d_loss_nonsaturating)(real_logits, fake_logits)
    if r1 > 0:
        d_loss = d_loss + r1_penalty(real_logits, real, r1)
    opt.zero_grad(set_to_none=True)
    d_loss.backward()
    opt.step()
    disc.requires_grad_(False)  # the generator's step then computes no discriminator gradients
    return float(d_loss.detach()), real_logits.detach()


def _log(context: dict, **values) -> None:
    log = context.setdefault("log", {"step": []})
    step = context["step"] = context.get("step", 0) + 1
    if step % _LOG_EVERY == 1 or _LOG_EVERY == 1:
        log["step"].append(step)
        for k, v in values.items():
            log.setdefault(k, []).append(round(float(v), 5))


# ---- GAN and Diffusion-GAN ---------------------------------------------------------------------------
def _build_gan(recipe: Recipe) -> nn.Module:
    return Generator(z_dim=recipe.option("z_dim", 64), width=recipe.width)


def _prepare_gan(recipe, model, folder, fast) -> dict:
    torch.manual_seed(recipe.seed + 1)
    disc = Discriminator(width=recipe.option("d_width", 32))
    control = AdaptiveT(hi=recipe.option("t_hi", 0.4), step=recipe.option("t_step", 0.01)) \
        if recipe.option("diffusion", False) else None
    return {"disc": disc, "opt": _adam(disc.parameters(), recipe), "control": control, "snapshots": [], "fast": fast}


def _gan_loss(recipe, model, context):
    disc, opt, control = context["disc"], context["opt"], context["control"]
    every = max(1, (recipe.fast_steps if context.get("fast") else recipe.steps) // 10)

    def loss(model, batch, g):
        real = batch[0]
        t_max = control.t_max if control is not None else 0.0
        fake = model(torch.randn((real.shape[0], model.z_dim), generator=g))
        y_real, y_fake, t = diffuse_pair(real, fake, t_max, path=PATH, generator=g)
        d_loss, real_logits = _adversarial_step(disc, opt, y_real, y_fake, loss="nonsaturating",
                                                r1=recipe.option("r1", 0.0), t=t)
        if control is not None:
            control.observe(real_logits)
        _, y_fake, t = diffuse_pair(real, fake, t_max, path=PATH, generator=g)  # fresh times for the generator
        g_loss = g_loss_nonsaturating(disc(y_fake, t))
        _log(context, d_loss=d_loss, g_loss=float(g_loss.detach()), r=float(torch.sign(real_logits).mean()), t_max=t_max)
        if context["step"] % every == 0:
            context["snapshots"].append((context["step"], copy.deepcopy(model.state_dict())))
        return g_loss
    return loss


def _gan_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    n = 100 if fast else 1000
    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    samples = sample_generator(model, n, rng=gen)
    out = {"nfe": 1, "samples_per_second": n / (time.perf_counter() - start)}
    if classifier is not None:
        out.update(evaluate_unconditional(classifier, samples, held_out, n_fd=100 if fast else 500,
                                          generator=torch.Generator().manual_seed(1)))
        curve = []
        probe = copy.deepcopy(model)
        for step, state in context["snapshots"]:  # the raw (not averaged) generator during training
            probe.load_state_dict(state)
            x = sample_generator(probe, n, rng=torch.Generator().manual_seed(2))
            q = evaluate_unconditional(classifier, x, held_out, n_fd=100 if fast else 500,
                                       generator=torch.Generator().manual_seed(1))
            curve.append([step, round(q["mnist_fd"], 3), q["classes_at_least_5_percent"]])
        out["fd_curve_raw_generator"] = curve
    out["training_log"] = context.get("log", {})
    if context["control"] is not None:
        out["final_t_max"] = context["control"].t_max
    return out


# ---- the one-step students --------------------------------------------------------------------------------
def noisy_feature_maps(noisy: nn.Module, *, every_conv: bool = False):
    """The noisy classifier's feature maps at t = 0 as a feature network ``f(x, t, y)`` (``t`` and
    ``y`` are ignored): its two stage outputs (ADD's frozen feature network) or, with
    ``every_conv``, all four convolutions' (the perceptual distance)."""
    def features(x: Tensor, t: Tensor | None = None, y: Tensor | None = None) -> list[Tensor]:
        return noisy.feature_maps(x, torch.zeros(x.shape[0], dtype=x.dtype), every_conv=every_conv)
    return features


def calibrated_distance(noisy: nn.Module, images: Tensor, *, n: int = 2000, seed: int = 0,
                        steps: int = 300) -> PerceptualDistance:
    """LPIPS on the noisy classifier's four convolutions (t = 0), calibrated on ``n`` 2AFC triplets
    of ``images`` (:func:`course.perceptual.make_triplets`): the perceptual loss of Diffusion2GAN."""
    noisy.requires_grad_(False).eval()
    feats = noisy_feature_maps(noisy, every_conv=True)
    channels = [m.shape[1] for m in feats(images[:1])]
    dist = PerceptualDistance(lambda x: feats(x), channels)
    calibrate(dist, make_triplets(images, n, generator=torch.Generator().manual_seed(seed)), steps=steps)
    return dist.requires_grad_(False)


def _build_student(recipe: Recipe) -> nn.Module:
    return UNet(1, channels=recipe.channels, num_classes=10, patch=recipe.patch)


def _prepare_student(recipe, model, folder, fast) -> dict:
    teacher, _ = _load_teacher(recipe, folder, fast)
    model.load_state_dict(teacher.state_dict())
    torch.manual_seed(recipe.seed + 1)
    context = {"teacher": teacher, "velocity": teacher_velocity(recipe, teacher), "fast": fast}
    kind = recipe.option("discriminator", "features")
    if recipe.kind == "add_student" and recipe.option("adv_weight", 1.0) > 0:
        if kind == "features":
            noisy = load("mnist_noisy_classifier", folder=folder, allow_fast=fast).requires_grad_(False)
            disc = FeatureDiscriminator(noisy_feature_maps(noisy), (noisy.conv[0][0].out_channels,
                                                                    noisy.conv[1][0].out_channels),
                                        num_classes=10)
        elif kind == "teacher":
            c = recipe.channels
            disc = FeatureDiscriminator(teacher_features(teacher), (c[0], c[1], c[2]), num_classes=10,
                                        time_conditional=True)
        else:
            raise ValueError(f"recipe {recipe.name!r}: unknown discriminator {kind!r}; expected 'features' or 'teacher'")
        context.update(disc=disc, opt=_adam(disc.parameters(), recipe))
    if recipe.kind == "d2g_student" and recipe.option("gan_weight", 0.0) > 0:
        disc = Discriminator(width=recipe.option("d_width", 32), num_classes=10)
        context.update(disc=disc, opt=_adam(disc.parameters(), recipe))
    return context


def _add_loss(recipe, model, context):
    teacher_x0 = as_prediction_fn(context["velocity"], PATH, "velocity", "x0")
    disc = context.get("disc")
    adv_weight, distill_weight = recipe.option("adv_weight", 1.0), recipe.option("distill_weight", 1.0)
    ladd = recipe.option("discriminator", "features") == "teacher"

    def loss(model, batch, g):
        x0, y = batch
        x_s, s = student_inputs(x0, path=PATH, generator=g)
        fake = student_x0(model, x_s, s, path=PATH, y=y)
        t = torch.rand(x0.shape[0], generator=g) * 0.96 + 0.02
        target = distillation_target(teacher_x0, fake, t, path=PATH, generator=g, y=y)
        distill = add_distillation_loss(fake, target, t, path=PATH)
        total, values = distill_weight * distill, {"distill": float(distill.detach())}
        if disc is not None:
            if ladd:  # real and generated digits noised to the same t; the teacher's encoder judges
                t_d = torch.rand(x0.shape[0], generator=g) * recipe.option("t_d_max", 0.75)
                real_in, fake_in, _ = _noised_pair(x0, fake, t_d, g)
                cond = {"t": t_d, "y": y}
            else:
                real_in, fake_in, cond = x0, fake, {"y": y}
            every = recipe.option("r1_every", 1)  # lazy R1 (StyleGAN2): every k-th step, k times the weight
            d_loss, _ = _adversarial_step(disc, context["opt"], real_in, fake_in, loss="hinge",
                                          r1=every * recipe.option("r1", 0.0),
                                          r1_now=context.get("step", 0) % every == 0, **cond)
            adv = g_loss_hinge(disc(fake_in, **cond))
            total = total + adv_weight * adv
            values.update(d_loss=d_loss, adv=float(adv.detach()))
        _log(context, **values)
        return total
    return loss


def _noised_pair(real: Tensor, fake: Tensor, t: Tensor, g) -> tuple[Tensor, Tensor, Tensor]:
    return (PATH.sample(real, t, generator=g).x_t, PATH.sample(fake, t, generator=g).x_t, t)


def sample_one_step(model: nn.Module, labels: Tensor, *, steps: int = 1, generator: torch.Generator | None = None,
                    batch: int = 500) -> Tensor:
    """Class-conditional samples of a one-step student (``steps`` of ADD's sampler, 1 = x1 -> x0)."""
    model.eval()
    out = []
    for y in labels.split(batch):
        x1 = torch.randn((y.shape[0], 1, 28, 28), generator=generator)
        out.append(sample_student(model, x1, steps=steps, path=PATH, generator=generator, y=y))
    return torch.cat(out)


def _student_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    labels, out = eval_labels(fast), {}
    for steps in ((1,) if recipe.kind == "d2g_student" else (1, 2, 4)):
        gen = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        samples = sample_one_step(model, labels, steps=steps, generator=gen)
        out[f"{steps}_step" + ("s" if steps > 1 else "")] = sample_metrics(
            classifier, samples, labels, held_out, time.perf_counter() - start, steps,
            generator=torch.Generator().manual_seed(1))  # one held-out reference for every row
    out["training_log"] = context.get("log", {})
    if "pair_seconds" in context:
        out["pair_seconds"] = context["pair_seconds"]
    return out


# ---- Diffusion2GAN ------------------------------------------------------------------------------------------
def _d2g_dataset(recipe, images, labels, context) -> tuple:
    n = recipe.option("pairs", 2000) if not context["fast"] else 32
    start = time.perf_counter()
    pair_labels = torch.arange(10).repeat_interleave(n // 10)
    pairs = make_pairs(context["velocity"], pair_labels, (1, 28, 28), nfe=recipe.eval_nfe, seed=recipe.seed)
    context["pair_seconds"] = round(time.perf_counter() - start, 1)
    noisy = load("mnist_noisy_classifier", folder=context.get("folder"), allow_fast=context["fast"])
    context["perceptual"] = calibrated_distance(noisy, images, n=200 if context["fast"] else 2000, seed=recipe.seed,
                                                steps=20 if context["fast"] else 300)
    return pairs.noise, pairs.images, pairs.labels


def _d2g_loss(recipe, model, context):
    disc, gan_weight = context.get("disc"), recipe.option("gan_weight", 0.0)

    def loss(model, batch, g):
        noise, target, y = batch
        fake = student_x0(model, noise, torch.ones(noise.shape[0]), path=PATH, y=y)
        logits = None
        if disc is not None:
            d_loss, _ = _adversarial_step(disc, context["opt"], target, fake, loss="nonsaturating",
                                          r1=recipe.option("r1", 0.0), y=y)
            logits = disc(fake, y=y)
        total = diffusion2gan_loss(fake, target, context["perceptual"], logits, gan_weight=gan_weight)
        _log(context, loss=float(total.detach()))
        return total
    return loss


def _prepare_d2g(recipe, model, folder, fast) -> dict:
    context = _prepare_student(recipe, model, folder, fast)
    context["folder"] = folder
    return context


register_kind("gan", RecipeKind(_build_gan, _gan_loss, _gan_metrics, _prepare_gan, needs_classifier=True))
register_kind("add_student", RecipeKind(_build_student, _add_loss, _student_metrics, _prepare_student,
                                        needs_classifier=True))
register_kind("d2g_student", RecipeKind(_build_student, _d2g_loss, _student_metrics, _prepare_d2g,
                                        needs_classifier=True, dataset=_d2g_dataset))

_GAN = dict(steps=4000, batch_size=64, lr=2e-4, width=64, fast_steps=4, ema_decay=0.999)
register_recipe(Recipe("mnist_gan", "gan", **_GAN, options=(("adam_betas", (0.5, 0.999)),),
                       description="unconditional DCGAN-style GAN, non-saturating loss (the plain baseline)"))
register_recipe(Recipe("mnist_diffusion_gan", "gan", **_GAN,
                       options=(("adam_betas", (0.5, 0.999)), ("diffusion", True), ("t_hi", 0.4)),
                       description="the same GAN with Diffusion-GAN's augmentation: real and generated digits "
                                   "diffused to the same t <= t_max, t_max adapted to the discriminator"))
_STUDENT = dict(batch_size=64, lr=1e-4, fast_steps=2, teacher="mnist_cfm_unet", eval_w=1.0)
register_recipe(Recipe("mnist_add", "add_student", steps=1200, **_STUDENT,
                       options=(("adam_betas", (0.5, 0.999)), ("discriminator", "features"), ("r1", 0.1),
                                ("r1_every", 4), ("adv_weight", 1.0), ("distill_weight", 1.0)),
                       description="adversarial diffusion distillation of mnist_cfm_unet (w = 1): hinge loss of a "
                                   "discriminator on the noisy classifier's frozen features, plus the distillation loss"))
register_recipe(Recipe("mnist_add_distill_only", "add_student", steps=1200, **_STUDENT,
                       options=(("adam_betas", (0.5, 0.999)), ("adv_weight", 0.0), ("distill_weight", 1.0)),
                       description="ablation of mnist_add: the distillation loss alone"))
register_recipe(Recipe("mnist_ladd", "add_student", steps=1200, **_STUDENT,
                       options=(("adam_betas", (0.5, 0.999)), ("discriminator", "teacher"), ("r1", 0.0),
                                ("adv_weight", 1.0), ("distill_weight", 1.0)),
                       description="latent adversarial diffusion distillation: the discriminator on the teacher's "
                                   "encoder features of noised digits"))
register_recipe(Recipe("mnist_d2g", "d2g_student", steps=1200, **_STUDENT,
                       options=(("adam_betas", (0.5, 0.999)), ("pairs", 2000), ("gan_weight", 1.0), ("r1", 0.1)),
                       description="Diffusion2GAN: one-step student regressed onto 2 000 teacher ODE pairs with the "
                                   "calibrated perceptual distance plus a conditional GAN loss"))
register_recipe(Recipe("mnist_d2g_no_gan", "d2g_student", steps=1200, **_STUDENT,
                       options=(("adam_betas", (0.5, 0.999)), ("pairs", 2000), ("gan_weight", 0.0)),
                       description="ablation of mnist_d2g: the perceptual distance alone"))
