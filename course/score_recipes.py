"""Chapters 02-04 on digits: an unconditional score model of MNIST (``mnist_score_vp``).

The 2-D chapters train a small MLP in seconds. On digits, as in Song's score-SDE tutorial, the
same DSM loss on the VP SDE trains a U-Net whose noise prediction gives the score
``s = -eps_hat / sigma(t)`` (``as_score_fn``). Chapter 02 samples it with the reverse SDE,
chapter 03 measures its bits per dimension with the probability-flow ODE, chapter 04 samples it
with DDIM and DPM-Solver at a few NFE. Everything here is a plain function of the model:

- :func:`digit_score_fn` the score of the shipped model;
- :func:`sample_digits` samples with a named sampler and a step count;
- :func:`dequantize` and :func:`digit_bits_per_dim` the likelihood of 8-bit digits in bits/dim.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .conversions import as_score_fn
from .fast_samplers import sample_ddim, sample_dpm_solver_pp_2m, sampling_grid
from .losses import dsm_loss
from .ode import bits_per_dim, log_likelihood
from .recipe_registry import IMAGE_SHAPES, Recipe, RecipeKind, register_kind, register_recipe
from .samplers import sample_pc, sample_reverse_em, time_grid
from .sde import VPSDE
from .unet import UNet
from .utils import check_positive_int

__all__ = ["SDE", "T_MIN", "SAMPLERS", "digit_score_fn", "sample_digits", "dequantize", "digit_bits_per_dim"]

SDE = VPSDE()  # beta from 0.1 to 20, as in chapters 01-04
T_MIN = 1e-3  # DSM trains on t ~ U[T_MIN, 1]; samplers and the likelihood stop there
SAMPLERS = ("reverse_em", "pc", "ddim", "dpm_solver_pp_2m")


def digit_score_fn(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """The score ``s(x, t) = -eps_hat(x, t) / sigma(t)`` of a noise-predicting model on :data:`SDE`."""
    return as_score_fn(model, SDE, "eps")


@torch.no_grad()
def sample_digits(model: nn.Module, n: int, *, sampler: str = "ddim", steps: int = 20,
                  generator: torch.Generator | None = None, batch: int = 500) -> Tensor:
    """``n`` digits ``(n, 1, 28, 28)`` from the prior N(0, I) at t = 1 down to :data:`T_MIN`.

    ``sampler``: ``"reverse_em"`` (chapter 02, uniform grid), ``"pc"`` (reverse EM predictor plus one
    Langevin corrector step, SNR 0.16: 2 NFE per step), ``"ddim"`` or ``"dpm_solver_pp_2m"``
    (chapter 04, on the log-SNR grid); ``steps`` predictor steps."""
    n, steps = check_positive_int(n, "n"), check_positive_int(steps, "steps")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    model.eval()
    score = digit_score_fn(model)
    out = []
    for start in range(0, n, batch):
        x1 = torch.randn((min(batch, n - start), *IMAGE_SHAPES["mnist"]), generator=generator)
        if sampler == "reverse_em":
            x = sample_reverse_em(score, x1, time_grid(steps, t_min=T_MIN), sde=SDE, generator=generator)
        elif sampler == "pc":
            x = sample_pc(score, x1, time_grid(steps, t_min=T_MIN), sde=SDE, predictor="euler_maruyama",
                          corrector_steps=1, snr=0.16, generator=generator)
        else:
            grid = sampling_grid(steps, path=SDE, kind="logsnr", t_min=T_MIN)
            solver = sample_ddim if sampler == "ddim" else sample_dpm_solver_pp_2m
            x = solver(score, x1, grid, path=SDE)
        out.append(x)
    return torch.cat(out)


def dequantize(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """8-bit digits in [-1, 1] (pixel k in 0..255 stored as k / 127.5 - 1) to continuous data:
    ``(k + u) / 128 - 1`` with u ~ U[0, 1), uniform dequantisation, so that a density of the result
    bounds the probability of the pixels (:func:`course.ode.bits_per_dim`)."""
    k = (images.double() + 1) * 127.5
    pixels = k.round()
    if (k - pixels).abs().max() > 1e-3 or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError("expected 8-bit images stored as k / 127.5 - 1 with k in 0..255 (the course's MNIST)")
    u = torch.rand(images.shape, generator=generator, dtype=torch.float64)
    return (pixels + u) / 128 - 1


def digit_bits_per_dim(model: nn.Module, images: Tensor, *, generator: torch.Generator | None = None,
                       rtol: float = 1e-4, atol: float = 1e-4, batch: int = 50) -> tuple[Tensor, int]:
    """Bits per dimension of 8-bit ``images`` under the model: dequantise (:func:`dequantize`),
    integrate the probability-flow ODE with a one-probe Rademacher Hutchinson divergence from
    :data:`T_MIN` to 1 (RK45 at ``rtol``/``atol``, float64), and convert the log-density of
    x_{T_MIN} to bits (:func:`course.ode.bits_per_dim`). Returns ``(bpd per image, NFE)``, the
    NFE summed over batches of ``batch``."""
    model = copy.deepcopy(model).double().eval()  # float64 for the ODE, without changing the caller's model
    x = dequantize(images, generator)
    score = digit_score_fn(model)
    bpd, nfe = [], 0
    for part in x.split(check_positive_int(batch, "batch")):
        res = log_likelihood(score, part, sde=SDE, t_min=T_MIN, divergence="hutchinson", probe="rademacher",
                             rtol=rtol, atol=atol, generator=generator)
        bpd.append(bits_per_dim(res.log_prob, part[0].numel()))
        nfe += res.nfe
    return torch.cat(bpd), nfe


# ---- the recipe kind -------------------------------------------------------------------------------
def _build(recipe: Recipe) -> nn.Module:
    return UNet(IMAGE_SHAPES[recipe.data][0], channels=recipe.channels, patch=recipe.patch)  # no labels


def _loss(recipe, model, context):
    def loss(model, batch, g):
        x, _ = batch  # the labels are not used: an unconditional model
        return dsm_loss(model, x, SDE, prediction="eps", t_min=T_MIN, generator=g)
    return loss


def _metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    from .image_metrics import evaluate_unconditional

    gen = torch.Generator().manual_seed(1)
    n = 50 if fast else 500
    start = time.perf_counter()
    samples = sample_digits(model, n, sampler="ddim", steps=recipe.eval_nfe, generator=gen)
    seconds = time.perf_counter() - start
    out = {"sampler": "ddim", "nfe": recipe.eval_nfe, "samples_per_second": n / seconds}
    if classifier is not None:  # missing where the evaluation classifier is not trained (a bare folder)
        quality = evaluate_unconditional(classifier, samples, held_out, n_fd=n, generator=gen)
        out.update({k: v for k, v in quality.items() if k != "class_shares"})
    images = held_out.images[: 4 if fast else 100]
    start = time.perf_counter()
    bpd, nfe = digit_bits_per_dim(model, images, generator=gen)
    out.update({"bits_per_dim": float(bpd.mean()), "bits_per_dim_se": float(bpd.std() / len(bpd) ** 0.5),
                "bits_per_dim_digits": len(images), "likelihood_nfe": nfe,
                "likelihood_seconds": time.perf_counter() - start})
    return out


register_kind("score_unet", RecipeKind(_build, _loss, _metrics, needs_classifier=True))
register_recipe(Recipe("mnist_score_vp", "score_unet", steps=3000, batch_size=128, lr=2e-3, ema_decay=0.999,
                       fast_steps=20, eval_nfe=20, label_dropout=0.0,
                       description="unconditional U-Net on MNIST digits, DSM loss on the VP SDE (eps prediction); "
                                   "the digits of chapters 02-04"))
