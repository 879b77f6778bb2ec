"""Conversions between what a network predicts, for any Gaussian path x_t = alpha x_0 + sigma eps.

This is the only place these identities live (round-trip tested in float64). With
alpha = alpha(t) and sigma = sigma(t), for the Gaussian conditional p(x_t | x_0):

    score = grad log p_t(x_t | x_0) = -eps / sigma
    x_0   = (x_t - sigma eps) / alpha
    eps   = (x_t - alpha x_0) / sigma

For the marginal p_t the same identities hold with eps and x_0 replaced by their posterior means
E[eps | x_t] and E[x_0 | x_t] (Tweedie's formula), which is what a network trained by denoising
regresses onto.
"""

from __future__ import annotations

from torch import Tensor

from .paths import GaussianPath
from .utils import as_time, expand_like

__all__ = ["PREDICTIONS", "eps_to_score", "score_to_eps", "eps_to_x0", "x0_to_eps", "convert", "as_score_fn"]

PREDICTIONS = ("score", "eps", "x0")


def _coefficients(path: GaussianPath, x: Tensor, t) -> tuple[Tensor, Tensor]:
    t = as_time(t, x)
    return expand_like(path.alpha(t), x), expand_like(path.sigma(t), x)


def eps_to_score(eps: Tensor, x_t: Tensor, t, path: GaussianPath) -> Tensor:
    """score = -eps / sigma(t)."""
    _, sigma = _coefficients(path, x_t, t)
    return -eps / sigma


def score_to_eps(score: Tensor, x_t: Tensor, t, path: GaussianPath) -> Tensor:
    """eps = -sigma(t) * score."""
    _, sigma = _coefficients(path, x_t, t)
    return -sigma * score


def eps_to_x0(eps: Tensor, x_t: Tensor, t, path: GaussianPath) -> Tensor:
    """x_0 = (x_t - sigma(t) eps) / alpha(t)."""
    alpha, sigma = _coefficients(path, x_t, t)
    return (x_t - sigma * eps) / alpha


def x0_to_eps(x0: Tensor, x_t: Tensor, t, path: GaussianPath) -> Tensor:
    """eps = (x_t - alpha(t) x_0) / sigma(t)."""
    alpha, sigma = _coefficients(path, x_t, t)
    return (x_t - alpha * x0) / sigma


def convert(value: Tensor, source: str, target: str, x_t: Tensor, t, path: GaussianPath) -> Tensor:
    """Convert a prediction between ``"score"``, ``"eps"`` and ``"x0"`` (through eps)."""
    for name in (source, target):
        if name not in PREDICTIONS:
            raise ValueError(f"unknown prediction {name!r}; expected one of {', '.join(PREDICTIONS)}")
    if source == target:
        return value
    if source == "score":
        value = score_to_eps(value, x_t, t, path)
    elif source == "x0":
        value = x0_to_eps(value, x_t, t, path)
    if target == "score":
        return eps_to_score(value, x_t, t, path)
    if target == "x0":
        return eps_to_x0(value, x_t, t, path)
    return value


def as_score_fn(model, path: GaussianPath, prediction: str = "eps"):
    """Wrap a network that predicts ``prediction`` into a score function ``score(x, t, **cond)``.

    Samplers take score functions; this is where a network's parameterisation is adapted.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}")

    def score_fn(x: Tensor, t: Tensor, **cond) -> Tensor:
        return convert(model(x, t, **cond), prediction, "score", x, t, path)

    return score_fn
