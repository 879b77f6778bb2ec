"""Guidance for class-conditional models: Bayes' rule for scores, classifier guidance,
classifier-free guidance, and SDEdit.

Bayes' rule for scores: grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x), so a
time-conditioned classifier's gradient, scaled by s, turns an unconditional model into a
conditional one (s = 1 exactly; s > 1 sharpens the classes). Dhariwal & Nichol (2021) give it as
a DDPM step (Algorithm 1: the step's mean moves by s * Sigma * grad) and as a DDIM step
(Algorithm 2: eps_hat = eps - s sqrt(1 - alphabar) grad, i.e. eps - s sigma_t grad).

Classifier-free guidance (Ho & Salimans 2022) combines the conditional and the unconditional
prediction of one network trained with label dropout:

    pred_w(x, t, y) = (1 + w) pred(x, t, y) - w pred(x, t, null),

with w = 0 the plain conditional model. The combination is linear, and for a fixed (x, t) the
score, the noise eps, x_0 and the velocity of a Gaussian path are affine in each other with
the same coefficients for both terms, so the same wrapper guides score, eps, x_0 and velocity
models alike (tested in tests/test_guidance.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from .fast_samplers import ddim_step
from .paths import GaussianPath
from .utils import as_time, check_batch, check_time_scalar, expand_like

__all__ = ["classifier_free_guidance", "classifier_log_prob_grad", "classifier_guided_score",
           "classifier_guided_velocity",
           "classifier_guided_ddim_step", "classifier_guided_ddpm_step", "sdedit"]


def classifier_free_guidance(model: Callable, w: float, *, null_label: int) -> Callable:
    """``guided(x, t, y, **cond)`` = (1 + w) model(x, t, y=y, **cond) - w model(x, t, y=null, **cond),
    evaluated as one batch of 2B (one network call per step). Further conditions ``cond`` (a control
    image, SDXL's size and crop) go to both halves unchanged: tensors with a batch dimension are
    repeated, anything else (a strength) is passed as is. ``w = 0`` calls the model once, conditionally."""
    w = float(w)
    if not torch.isfinite(torch.tensor(w)) or w < 0:
        raise ValueError(f"expected a guidance weight w >= 0; got {w}")

    def guided(x: Tensor, t: Tensor, y: Tensor, **cond) -> Tensor:
        if w == 0:
            return model(x, t, y=y, **cond)
        twice = {k: torch.cat([v, v]) if isinstance(v, Tensor) and v.ndim and v.shape[0] == x.shape[0] else v
                 for k, v in cond.items()}
        both = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null_label)]), **twice)
        cond, uncond = both.chunk(2)
        return (1 + w) * cond - w * uncond

    return guided


def classifier_log_prob_grad(classifier: Callable, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """grad_x log p(y | x_t) of a classifier ``classifier(x, t) -> logits (B, C)`` by autograd
    (works under ``torch.no_grad``); shaped and typed like ``x``."""
    check_batch(x)
    if y.shape != (x.shape[0],):
        raise ValueError(f"expected labels y of shape ({x.shape[0]},); got {tuple(y.shape)}")
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logp = torch.log_softmax(classifier(xg, t), dim=1).gather(1, y[:, None].long()).sum()
        (grad,) = torch.autograd.grad(logp, xg)
    return grad.to(x.dtype)


def classifier_guided_score(score_fn: Callable, classifier: Callable, scale: float) -> Callable:
    """``guided(x, t, y)`` = score(x, t) + scale * grad_x log p(y | x_t): Bayes' rule for scores."""
    def guided(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return score_fn(x, t) + scale * classifier_log_prob_grad(classifier, x, t, y)

    return guided


def classifier_guided_velocity(velocity_fn: Callable, classifier: Callable, scale: float, path: GaussianPath
                               ) -> Callable:
    """Classifier guidance for a velocity (flow) model: the score moves by scale * grad log p(y | x_t),
    which moves the velocity by b(t) * scale * grad with b(t) = sigma (alpha' sigma / alpha - sigma'),
    the score coefficient of the velocity (-sigma / alpha on the linear path). b is infinite where
    alpha = 0 (pure noise, where the classifier sees no class); there no guidance is added."""
    def guided(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        v = velocity_fn(x, t)  # unconditional (a class-conditional U-Net called without y: its null class)
        g = classifier_log_prob_grad(classifier, x, t, y)
        alpha, sigma = path.coefficients(t, x)
        d_alpha, _ = path.derivatives(t, x)
        ok = alpha != 0
        # velocity = alpha' x / alpha + b score with b = alpha' sigma^2 / alpha - sigma sigma' (course.conversions)
        b = torch.where(ok, d_alpha * sigma**2 / torch.where(ok, alpha, torch.ones_like(alpha))
                        - expand_like(path.sigma_dsigma(as_time(t, x)), x), torch.zeros_like(alpha))
        return v + b * (scale * g)

    return guided


def classifier_guided_ddim_step(x: Tensor, t, s, eps_hat: Tensor, grad: Tensor, path: GaussianPath, *,
                                scale: float, eta: float = 0.0, z: Tensor | None = None) -> Tensor:
    """Algorithm 2 of Dhariwal & Nichol: eps_hat - scale * sigma_t * grad log p(y | x_t), then a
    DDIM step from t to s (``grad`` evaluated at (x, t))."""
    _, sigma_t = path.coefficients(t, x)
    return ddim_step(x, t, s, eps_hat - scale * sigma_t * grad, path, eta=eta, z=z)


def classifier_guided_ddpm_step(x: Tensor, t, s, eps_hat: Tensor, grad: Tensor, path: GaussianPath, *,
                                scale: float, z: Tensor) -> Tensor:
    """Algorithm 1 of Dhariwal & Nichol: the ancestral (DDPM) step from t to s has mean mu and
    variance Sigma = c^2 I; the guided step samples N(mu + scale * Sigma * grad, Sigma)."""
    a_t, s_t = path.coefficients(t, x)
    a_s, s_s = path.coefficients(s, x)
    c2 = (s_s**2 * (1 - (a_t * s_s) ** 2 / (a_s * s_t) ** 2)).clamp_min(0.0)  # DDIM eta = 1 variance
    mean = ddim_step(x, t, s, eps_hat, path, eta=1.0, z=torch.zeros_like(x))
    return mean + scale * c2 * grad + c2.sqrt() * z


def sdedit(sampler: Callable, model: Callable, x_input: Tensor, t0: float, *, path: GaussianPath, n_steps: int,
           generator: torch.Generator | None = None, **kwargs) -> Tensor:
    """SDEdit (Meng et al. 2022): perturb ``x_input`` to time ``t0`` with the forward process,
    x_t0 = alpha(t0) x + sigma(t0) eps, then run ``sampler(model, x_t0, ts, path=path, ...)`` on
    ``n_steps`` uniform steps from t0 to 0 (``generator`` also goes to a sampler that takes one). Small t0 stays faithful to the input, large t0 makes
    realistic samples that forget it; t0 = 0 returns the input unchanged."""
    check_batch(x_input, name="x_input")
    t0 = check_time_scalar(t0, "t0")
    if t0 == 0.0:
        return x_input.clone()
    x_t0 = path.sample(x_input, as_time(t0, x_input), generator=generator).x_t
    ts = torch.linspace(t0, 0.0, int(n_steps) + 1, dtype=torch.float64)
    if "generator" in inspect.signature(sampler).parameters:  # stochastic samplers share it
        kwargs.setdefault("generator", generator)
    return sampler(model, x_t0, ts, path=path, **kwargs)
