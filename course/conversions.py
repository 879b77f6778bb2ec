"""Conversions between what a network predicts, for any Gaussian path x_t = alpha x_0 + sigma eps.

This is the only place these identities live (round-trip tested in float64). With
alpha = alpha(t), sigma = sigma(t) and their time derivatives alpha', sigma', for the Gaussian
conditional p(x_t | x_0):

    score    = grad log p_t(x_t | x_0) = -eps / sigma
    x_0      = (x_t - sigma eps) / alpha
    eps      = (x_t - alpha x_0) / sigma
    velocity = d/dt x_t = alpha' x_0 + sigma' eps              (flow matching's target)
    v        = alpha eps - sigma x_0                           (Salimans & Ho's v-prediction)

For the marginal p_t the same identities hold with eps and x_0 replaced by their posterior means
E[eps | x_t] and E[x_0 | x_t] (Tweedie's formula), which is what a network trained by denoising
regresses onto; the marginal velocity alpha' E[x_0 | x_t] + sigma' E[eps | x_t] is the drift of
the probability-flow ODE, so a score model can be sampled as a flow and a flow model as an SDE.

Every prediction is taken to the pair (x_0, eps) by solving the 2x2 linear system it forms with
x_t = alpha x_0 + sigma eps; only the half that the target needs is computed, so that e.g. a
velocity converts to eps at t = 1 of the linear path, where alpha = 0. (Where the system is
singular the prediction carries no information: eps says nothing about x_0 when alpha = 0.)

**Endpoints.** At sigma = 0 (t = 0) x_t = alpha x_0 is the data itself, so x_0 = x_t / alpha is
known but eps, and the score -eps / sigma, are not determined by an x_0 prediction; at alpha = 0
(t = 1 of the linear path) eps = x_t / sigma is known and x_0 is not determined by an eps or score
prediction. Conversions that would divide by such a zero raise a ``ValueError`` saying so instead
of returning NaN. A score converts to a velocity everywhere, through the finite product sigma
sigma' (``GaussianPath.sigma_dsigma``): velocity = alpha' x_0 - sigma sigma' score, which at t = 0
of an SDE is the probability-flow drift f - g^2 score / 2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .paths import GaussianPath
from .utils import as_time, expand_like

__all__ = [
    "PREDICTIONS",
    "check_prediction",
    "eps_to_score",
    "score_to_eps",
    "eps_to_x0",
    "x0_to_eps",
    "to_eps",
    "to_x0",
    "convert",
    "as_score_fn",
    "as_velocity_fn",
    "as_prediction_fn",
]

PREDICTIONS = ("score", "eps", "x0", "velocity", "v")


def check_prediction(name: str) -> str:
    """Return ``name`` if it is one of PREDICTIONS, else raise a ValueError listing them."""
    if name not in PREDICTIONS:
        raise ValueError(f"unknown prediction {name!r}; expected one of {', '.join(PREDICTIONS)}")
    return name


def _require(bad: Tensor, name: str, what: str, t, path: GaussianPath) -> None:
    """Raise a ValueError naming the first time where ``bad`` (a mask broadcast against x_t) holds:
    ``what`` is not determined by the prediction there."""
    if bool(bad.any()):
        times = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        rows = bad.reshape(bad.shape[0], -1).any(1) if bad.ndim else bad.reshape(1)
        at = float(times[rows.nonzero()[0, 0]]) if times.numel() == rows.numel() else float(times[0])
        raise ValueError(f"{what} is undefined where {name} (t = {at:g} of {type(path).__name__}): the "
                         "prediction does not determine it there; evaluate at times strictly inside (0, 1)")


def _require_nonzero(coef: Tensor, name: str, what: str, t, path: GaussianPath) -> None:
    """``what`` needs ``coef`` (alpha, sigma or a determinant) finite and nonzero everywhere."""
    _require((coef == 0) | ~torch.isfinite(coef), f"{name} = 0", what, t, path)


def eps_to_score(eps: Tensor, x_t: Tensor, t, path: GaussianPath) -> Tensor:
    """score = -eps / sigma(t)."""
    _, sigma = path.coefficients(t, x_t)
    _require_nonzero(sigma, "sigma", "the score", t, path)
    return -eps / sigma


def score_to_eps(score: Tensor, x_t: Tensor, t, path: GaussianPath) -> Tensor:
    """eps = -sigma(t) * score."""
    _, sigma = path.coefficients(t, x_t)
    return -sigma * score


def eps_to_x0(eps: Tensor, x_t: Tensor, t, path: GaussianPath) -> Tensor:
    """x_0 = (x_t - sigma(t) eps) / alpha(t)."""
    alpha, sigma = path.coefficients(t, x_t)
    _require_nonzero(alpha, "alpha", "x_0 from a noise or score prediction", t, path)
    return (x_t - sigma * eps) / alpha


def x0_to_eps(x0: Tensor, x_t: Tensor, t, path: GaussianPath) -> Tensor:
    """eps = (x_t - alpha(t) x_0) / sigma(t)."""
    alpha, sigma = path.coefficients(t, x_t)
    _require_nonzero(sigma, "sigma", "eps from an x_0 prediction", t, path)
    return (x_t - alpha * x0) / sigma


def to_eps(value: Tensor, source: str, x_t: Tensor, t, path: GaussianPath) -> Tensor:
    """The eps that a ``source`` prediction implies at (x_t, t)."""
    if check_prediction(source) == "eps":
        return value
    if source == "score":
        return score_to_eps(value, x_t, t, path)
    if source == "x0":
        return x0_to_eps(value, x_t, t, path)
    alpha, sigma = path.coefficients(t, x_t)
    if source == "velocity":  # solve x = a x0 + s eps, u = a' x0 + s' eps for eps
        d_alpha, d_sigma = path.derivatives(t, x_t)
        det = _velocity_determinant(alpha, sigma, d_alpha, d_sigma, t, path)
        return (alpha * value - d_alpha * x_t) / det
    return (sigma * x_t + alpha * value) / (alpha**2 + sigma**2)  # v = a eps - s x0


def _velocity_determinant(alpha, sigma, d_alpha, d_sigma, t, path: GaussianPath) -> Tensor:
    """alpha sigma' - alpha' sigma, the determinant of the system a velocity forms with x_t; an
    error where sigma' is infinite (t = 0 of the SDEs) or the system is singular."""
    det = alpha * d_sigma - d_alpha * sigma
    _require_nonzero(det, "alpha sigma' - alpha' sigma", "a conversion from a velocity (sigma'(t) is infinite or "
                     "the system singular)", t, path)
    return det


def to_x0(value: Tensor, source: str, x_t: Tensor, t, path: GaussianPath) -> Tensor:
    """The x_0 that a ``source`` prediction implies at (x_t, t)."""
    if check_prediction(source) == "x0":
        return value
    if source in ("eps", "score"):
        return eps_to_x0(to_eps(value, source, x_t, t, path), x_t, t, path)
    alpha, sigma = path.coefficients(t, x_t)
    if source == "velocity":
        d_alpha, d_sigma = path.derivatives(t, x_t)
        det = _velocity_determinant(alpha, sigma, d_alpha, d_sigma, t, path)
        return (d_sigma * x_t - sigma * value) / det
    return (alpha * x_t - sigma * value) / (alpha**2 + sigma**2)


def convert(value: Tensor, source: str, target: str, x_t: Tensor, t, path: GaussianPath) -> Tensor:
    """Convert a prediction between ``"score"``, ``"eps"``, ``"x0"``, ``"velocity"`` and ``"v"``."""
    check_prediction(source), check_prediction(target)
    if source == target:
        return value
    if target == "eps":
        return to_eps(value, source, x_t, t, path)
    if target == "score":
        return eps_to_score(to_eps(value, source, x_t, t, path), x_t, t, path)
    if target == "x0":
        return to_x0(value, source, x_t, t, path)
    if target == "velocity" and source == "score":  # alpha' x0 - sigma sigma' score: finite at sigma = 0
        d_alpha, _ = path.derivatives(t, x_t)
        sds = path.sigma_dsigma(as_time(t, x_t))
        return d_alpha * to_x0(value, source, x_t, t, path) - expand_like(sds, x_t) * value
    x0, eps = to_x0(value, source, x_t, t, path), to_eps(value, source, x_t, t, path)
    if target == "velocity":
        d_alpha, d_sigma = path.derivatives(t, x_t)
        _require(~torch.isfinite(d_sigma), "1 / sigma' = 0", f"a velocity from a {source} prediction (sigma' is "
                 "infinite; a score converts)", t, path)
        return d_alpha * x0 + d_sigma * eps
    alpha, sigma = path.coefficients(t, x_t)
    return alpha * eps - sigma * x0


def as_prediction_fn(model, path: GaussianPath, source: str, target: str) -> Callable:
    """Wrap a network that predicts ``source`` into a callable ``f(x, t, **cond)`` returning
    ``target``: this is where a network's parameterisation is adapted to a sampler."""
    check_prediction(source), check_prediction(target)

    def fn(x: Tensor, t: Tensor, **cond) -> Tensor:
        return convert(model(x, t, **cond), source, target, x, t, path)

    return fn


def as_score_fn(model, path: GaussianPath, prediction: str = "eps") -> Callable:
    """Wrap a network that predicts ``prediction`` into a score function ``score(x, t, **cond)``
    (the SDE and ODE samplers of chapters 02-04 take score functions)."""
    return as_prediction_fn(model, path, prediction, "score")


def as_velocity_fn(model, path: GaussianPath, prediction: str = "eps") -> Callable:
    """Wrap a network that predicts ``prediction`` into a velocity field ``v(x, t, **cond)``
    (the flow-matching samplers of chapter 05 take velocity fields)."""
    return as_prediction_fn(model, path, prediction, "velocity")
