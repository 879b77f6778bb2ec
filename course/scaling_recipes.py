"""Chapter 10's recipes: DiTs (the scaling grid and the shipped one), SDXL's micro-conditioning and
refiner, and ControlNet, all on 28x28 MNIST pixels.

- kind ``dit``: a class-conditional :class:`~course.dit.DiT` of size ``option("size")`` (one of
  ``DIT_SIZES``) and patch ``recipe.patch``, trained with the rectified-flow (CFM) loss and 10 % label
  dropout like ``mnist_cfm_unet``. Metrics as for ``mnist_cfm_unet`` plus the forward GFLOPs per
  sample. ``mnist_dit`` is shipped; ``mnist_dit_{xs,s,m}_p{4,7}`` and ``mnist_unet_grid`` (the
  chapter-06 U-Net for as many steps) are the scaling grid, trained by
  ``benchmarks/bench_10_scaling_control.py``.
- kind ``micro_unet``: the chapter-06 U-Net trained on digits passed through
  :func:`~course.dit.degrade` (a share downscaled, a share cropped); with ``option("micro")`` it is
  also conditioned on the recorded size and crop (SDXL is a U-Net too). Metrics: sharpness and
  centring of samples for each request in ``MICRO_REQUESTS`` (accuracy and FD for the first).
  ``mnist_unet_micro`` and ``mnist_unet_degraded`` (the same data, no conditions) are shipped.
- kind ``refiner``: a class-conditional U-Net trained on low noise levels only
  (:func:`~course.refiner.low_noise_cfm_loss`, t <= ``option("t_switch")``); metrics compare the
  base ``option("base")`` alone with base + refiner at the same number of steps.
- kind ``inpaint_unet``: ``mnist_inpaint_unet``, a U-Net that takes the known pixels and the mask
  (:func:`~course.inpainting.mask_condition`) as two more input channels, trained on random holes;
  metrics: class accuracy of its completions of the chapter's held-out digits for every hole in
  ``HOLES``.
- kind ``controlnet``: a :class:`~course.controlnet.ControlNet` on the frozen ``option("base")``
  U-Net, trained on edge maps of the training digits; metrics: edge IoU of the samples' edges with
  the control and class accuracy, beside the base model's for the same labels.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import Tensor, nn

from .controlnet import ControlNet, edge_map
from .dit import DiT, degrade, forward_gflops
from .flow_matching import cfm_loss
from .guidance import classifier_free_guidance
from .image_metrics import centre_of_mass, laplacian_sharpness
from .image_recipes import (
    PATH,
    _build_cfm_unet,
    _cfm_unet_loss,
    cfm_unet_metrics,
    drop_labels,
    eval_labels,
    sample_classes,
    sample_metrics,
)
from .inpainting import HOLES, hole_mask, inpaint_conditioned, mask_condition, random_holes
from .ode import sample_flow_euler
from .recipe_registry import (
    RECIPES,
    Recipe,
    RecipeKind,
    get_recipe,
    load,
    register_kind,
    register_recipe,
)
from .refiner import low_noise_cfm_loss, refined_velocity
from .unet import UNet

__all__ = ["DIT_SIZES", "MICRO_REQUESTS", "GRID", "edge_iou", "centring_offset", "micro_conditions",
           "sample_refined"]

DIT_SIZES = {"xs": (32, 2, 2), "s": (64, 4, 4), "m": (96, 6, 6), "l": (128, 8, 8)}  # dim, depth, heads
# (name, original size, crop (top, left)) asked for at sampling
MICRO_REQUESTS = (("full size, crop (0, 0)", 28, (0, 0)), ("size 8, crop (0, 0)", 8, (0, 0)),
                  ("full size, crop (6, 6)", 28, (6, 6)))
GRID_STEPS = 1500
GRID = tuple(f"mnist_dit_{size}_p{patch}" for size in ("xs", "s", "m") for patch in (7, 4))
DATA_CENTRE = (14.0, 14.0)  # where MNIST puts the centre of mass (held-out mean: 14.00, 14.01)


def edge_iou(images: Tensor, control: Tensor) -> Tensor:
    """Per-image intersection over union of the edge pixels of ``images`` (:func:`edge_map`) and the
    binary control ``control`` (1 = edge, -1 = none). Shape ``(N,)``."""
    a, b = edge_map(images) > 0, control > 0
    union = (a | b).flatten(1).sum(1)
    return (a & b).flatten(1).sum(1) / union.clamp_min(1)


def centring_offset(images: Tensor) -> Tensor:
    """Per-image distance in pixels of the ink's centre of mass from MNIST's centre (14, 14)."""
    return (centre_of_mass(images) - torch.tensor(DATA_CENTRE, dtype=torch.float64)).norm(dim=1)


def micro_conditions(n: int, size: int, crop: tuple[int, int]) -> dict:
    """``size`` and ``crop`` tensors of one request for ``n`` samples (the model's keyword arguments)."""
    return {"size": torch.full((n,), float(size)), "crop": torch.tensor([list(crop)] * n, dtype=torch.float32)}


# ---- DiT --------------------------------------------------------------------------------------------
def _build_dit(recipe: Recipe) -> nn.Module:
    size = recipe.option("size")
    if size not in DIT_SIZES:
        raise ValueError(f"recipe {recipe.name!r}: unknown DiT size {size!r}; expected one of {', '.join(DIT_SIZES)}")
    dim, depth, heads = DIT_SIZES[size]
    return DiT(1, 28, recipe.patch, dim=dim, depth=depth, heads=heads, num_classes=10)


def _gflops(model: nn.Module, **cond) -> float:
    x = torch.zeros(1, 1, 28, 28)
    return forward_gflops(model, x, torch.full((1,), 0.5), y=torch.zeros(1, dtype=torch.long), **cond)


@torch.no_grad()
def _dit_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    return {**cfm_unet_metrics(recipe, model, held_out, fast, classifier, context), "gflops_per_forward": _gflops(model)}


register_kind("dit", RecipeKind(_build_dit, _cfm_unet_loss, _dit_metrics, needs_classifier=True))
for _size in ("xs", "s", "m"):
    for _patch in (7, 4):
        register_recipe(Recipe(
            f"mnist_dit_{_size}_p{_patch}", "dit", steps=GRID_STEPS, batch_size=128, lr=1e-3, patch=_patch,
            fast_steps=2, options=(("size", _size),),
            description=f"scaling grid: DiT-{_size.upper()}/{_patch} on MNIST pixels, {GRID_STEPS} steps (not shipped: "
                        "benchmarks/bench_10_scaling_control.py trains it)"))
register_recipe(replace(get_recipe("mnist_cfm_unet"), name="mnist_unet_grid", steps=GRID_STEPS, fast_steps=2,
                        description=f"scaling grid: the chapter-06 U-Net for {GRID_STEPS} steps (not shipped)"))
register_recipe(Recipe(
    "mnist_dit", "dit", steps=6000, batch_size=128, lr=1e-3, patch=7, fast_steps=2, options=(("size", "m"),),
    description="class-conditional DiT-M/7 on MNIST pixels (16 tokens), adaLN-Zero, rectified flow, 10% label "
                "dropout (CFG); the grid's best quality per training second"))


# ---- micro-conditioning -----------------------------------------------------------------------------
def _build_micro(recipe: Recipe) -> nn.Module:
    return UNet(1, channels=recipe.channels, num_classes=10, patch=recipe.patch,
                micro_size=28 if recipe.option("micro") else 0)


def _micro_loss(recipe, model, context):
    micro = bool(recipe.option("micro"))

    def loss(model, batch, g):
        x, y = batch
        x, size, crop = degrade(x, generator=g)
        cond = {"size": size, "crop": crop} if micro else {}
        return cfm_loss(model, x, PATH, generator=g, y=drop_labels(y, recipe.label_dropout, g), **cond)
    return loss


@torch.no_grad()
def _micro_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    micro = bool(recipe.option("micro"))
    labels, out = eval_labels(fast), {}
    requests = MICRO_REQUESTS if micro else (("unconditioned", None, None),)
    for name, size, crop in requests:
        gen = torch.Generator().manual_seed(1)
        cond = micro_conditions(len(labels), size, crop) if micro else {}
        start = time.perf_counter()
        samples = sample_classes(model, labels, w=recipe.eval_w, nfe=recipe.eval_nfe, generator=gen, **cond)
        seconds = time.perf_counter() - start
        entry = {"sharpness": float(laplacian_sharpness(samples).mean()),
                 "centre_offset_px": float(centring_offset(samples.clamp(-1, 1)).mean())}
        if name == requests[0][0]:
            entry.update(sample_metrics(classifier, samples, labels, held_out, seconds, 2 * recipe.eval_nfe,
                                        generator=gen, data=recipe.data))
        out[name] = entry
    out["held_out_sharpness"] = float(laplacian_sharpness(held_out.images).mean())
    out["held_out_centre_offset_px"] = float(centring_offset(held_out.images).mean())
    return out


register_kind("micro_unet", RecipeKind(_build_micro, _micro_loss, _micro_metrics, needs_classifier=True))
for _name, _micro in (("mnist_unet_micro", True), ("mnist_unet_degraded", False)):
    register_recipe(Recipe(
        _name, "micro_unet", steps=2000, batch_size=128, lr=2e-3, channels=(32, 64, 64), patch=2, fast_steps=2,
        options=(("micro", _micro),),
        description="the chapter-06 U-Net on MNIST digits of which half are downscaled (original size 8-27 px) and "
                    "half cropped (offsets 1-6 px), " + ("conditioned on the original size and the crop (SDXL)"
                                                         if _micro else "without the size and crop conditions")))


# ---- refiner ----------------------------------------------------------------------------------------
def _base_name(recipe: Recipe) -> str:
    name = recipe.option("base")
    if name not in RECIPES or RECIPES[name].kind != "cfm_unet":
        raise ValueError(f"recipe {recipe.name!r} names {name!r} as its base; expected a recipe of kind 'cfm_unet'")
    return name


def _prepare_with_base(recipe, model, folder, fast) -> dict:
    return {"base": load(_base_name(recipe), folder=folder, allow_fast=fast)}


def _refiner_loss(recipe, model, context):
    t_switch = float(recipe.option("t_switch"))

    def loss(model, batch, g):
        x, y = batch
        return low_noise_cfm_loss(model, x, PATH, t_switch, generator=g, y=drop_labels(y, recipe.label_dropout, g))
    return loss


@torch.no_grad()
def sample_refined(base: nn.Module, refiner: nn.Module | None, labels: Tensor, *, t_switch: float, w: float = 1.0,
                   nfe: int = 20, generator: torch.Generator | None = None, batch: int = 500) -> Tensor:
    """Class-conditional samples: Euler with CFG on the base for t >= ``t_switch`` and on the refiner
    below (the base throughout when ``refiner`` is None), ``nfe`` uniform steps."""
    fields = [classifier_free_guidance(m.eval(), w, null_label=10) for m in (base, refiner) if m is not None]
    field = fields[0] if refiner is None else refined_velocity(fields[0], fields[1], t_switch)
    ts = torch.linspace(1.0, 0.0, nfe + 1)
    return torch.cat([sample_flow_euler(field, torch.randn((len(y), 1, 28, 28), generator=generator), ts, y=y)
                      for y in labels.split(batch)])


@torch.no_grad()
def _refiner_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    labels, t_switch = eval_labels(fast), float(recipe.option("t_switch"))
    out = {"t_switch": t_switch, "w": recipe.eval_w, "euler_steps": recipe.eval_nfe}
    for name, refiner in (("base alone", None), ("base + refiner", model)):
        gen = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        samples = sample_refined(context["base"], refiner, labels, t_switch=t_switch, w=recipe.eval_w,
                                 nfe=recipe.eval_nfe, generator=gen)
        entry = sample_metrics(classifier, samples, labels, held_out, time.perf_counter() - start,
                               2 * recipe.eval_nfe, generator=gen, data=recipe.data)
        entry["sharpness"] = float(laplacian_sharpness(samples).mean())
        out[name] = entry
    return out


register_kind("refiner", RecipeKind(_build_cfm_unet, _refiner_loss, _refiner_metrics, _prepare_with_base,
                                    needs_classifier=True))
register_recipe(Recipe(
    "mnist_refiner", "refiner", steps=1500, batch_size=128, lr=2e-3, channels=(32, 64, 64), patch=2, fast_steps=2,
    options=(("base", "mnist_cfm_unet"), ("t_switch", 0.3)),
    description="SDXL-style refiner for mnist_cfm_unet: the same U-Net trained on t <= 0.3 only"))


# ---- ControlNet -------------------------------------------------------------------------------------
def _build_controlnet(recipe: Recipe) -> nn.Module:
    base = get_recipe(_base_name(recipe))
    return ControlNet(UNet(1, channels=base.channels, num_classes=10, patch=base.patch),
                      hint_width=int(recipe.option("hint_width", 16)))


def _prepare_controlnet(recipe, model, folder, fast) -> dict:
    context = _prepare_with_base(recipe, model, folder, fast)
    model.base.load_state_dict(context["base"].state_dict())
    model.copy.load_state_dict(context["base"].state_dict())
    return context


def _controlnet_loss(recipe, model, context):
    def loss(model, batch, g):
        x, y = batch
        return cfm_loss(model, x, PATH, generator=g, y=drop_labels(y, recipe.label_dropout, g), control=edge_map(x))
    return loss


@torch.no_grad()
def _controlnet_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    chosen = held_out.per_class(5 if fast else 50, generator=torch.Generator().manual_seed(2))
    labels, control = chosen.labels, edge_map(chosen.images)
    out = {"w": recipe.eval_w, "euler_steps": recipe.eval_nfe, "controls": len(labels),
           "train_seconds": round(context["train_seconds"], 1)}
    for name, net, cond in (("base (no control)", context["base"], {}), ("controlnet", model, {"control": control})):
        gen = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        samples = sample_classes(net, labels, w=recipe.eval_w, nfe=recipe.eval_nfe, generator=gen, **cond)
        entry = sample_metrics(classifier, samples, labels, held_out, time.perf_counter() - start,
                               2 * recipe.eval_nfe, generator=gen, data=recipe.data)
        entry["edge_iou"] = float(edge_iou(samples.clamp(-1, 1), control).mean())
        out[name] = entry
    return out


register_kind("controlnet", RecipeKind(_build_controlnet, _controlnet_loss, _controlnet_metrics, _prepare_controlnet,
                                       needs_classifier=True))
register_recipe(Recipe(
    "mnist_controlnet", "controlnet", steps=1500, batch_size=128, lr=1e-3, fast_steps=2,
    options=(("base", "mnist_cfm_unet"), ("hint_width", 16)),
    description="ControlNet on the frozen mnist_cfm_unet: a trainable copy of its down path joined by zero "
                "convolutions, controlled by the edge maps of digits"))


# ---- mask-conditioned inpainting --------------------------------------------------------------------
def _build_inpaint(recipe: Recipe) -> nn.Module:
    return UNet(1, channels=recipe.channels, patch=recipe.patch, cond_channels=2)


def _inpaint_loss(recipe, model, context):
    def loss(model, batch, g):
        x, _ = batch
        return cfm_loss(model, x, PATH, generator=g, low_res=mask_condition(x, random_holes(len(x), generator=g)))
    return loss


def inpainting_digits(held_out, fast: bool = False):
    """The held-out digits the chapter completes: 50 per class (5 in fast mode), seed 3."""
    return held_out.per_class(5 if fast else 50, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _inpaint_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    digits = inpainting_digits(held_out, fast)
    out = {"digits": len(digits), "euler_steps": recipe.eval_nfe}
    for hole in HOLES:
        known = hole_mask(len(digits), hole)
        start = time.perf_counter()
        filled = inpaint_conditioned(model.eval(), digits.images, known, nfe=recipe.eval_nfe,
                                     generator=torch.Generator().manual_seed(4))
        entry = {"ms_per_image": 1000 * (time.perf_counter() - start) / len(digits),
                 "mse_on_hole": float((filled - digits.images)[~known].pow(2).mean())}
        if classifier is not None:
            entry["class_accuracy"] = float((classifier(filled).argmax(1) == digits.labels).double().mean())
        out[hole] = entry
    return out


register_kind("inpaint_unet", RecipeKind(_build_inpaint, _inpaint_loss, _inpaint_metrics, needs_classifier=True))
register_recipe(Recipe(
    "mnist_inpaint_unet", "inpaint_unet", steps=2000, batch_size=128, lr=2e-3, channels=(32, 64, 64), patch=2,
    fast_steps=2,
    description="mask-conditioned U-Net for inpainting: the noisy digit plus its known pixels and the mask as two "
                "more input channels (Stable Diffusion's inpainting model at MNIST scale), unconditional, rectified "
                "flow, trained on the chapter's holes and random rectangles"))
