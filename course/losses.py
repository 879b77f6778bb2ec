"""Denoising score matching (Vincent 2011; Song et al. 2021, eq. 7).

    L(theta) = E_t E_{x_0} E_eps [ lambda(t) || s_theta(x_t, t) - grad log p(x_t | x_0) ||^2 ],
    x_t = alpha(t) x_0 + sigma(t) eps,   grad log p(x_t | x_0) = -eps / sigma(t).

Because s_theta - (-eps/sigma) = -(eps_hat - eps)/sigma with eps_hat = -sigma s_theta, the loss
is computed in eps space with weight w(t) = lambda(t) / sigma(t)^2, which is numerically stable
near t = 0 whatever the network predicts:

==============  ================  ===============================================
weighting       lambda(t)         w(t) = lambda / sigma^2
==============  ================  ===============================================
``"sigma2"``    sigma(t)^2        1   (Song & Ermon 2019; DDPM's "simple" loss)
``"likelihood"`` g(t)^2           g(t)^2 / sigma(t)^2   (Song et al. 2021b)
==============  ================  ===============================================

Squared norms are averaged over data dimensions (so the loss does not grow with image size)
and over the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .conversions import check_prediction, convert
from .paths import GaussianPath
from .utils import as_time, check_batch, check_time_scalar

__all__ = ["WEIGHTINGS", "dsm_weight", "dsm_loss_terms", "dsm_loss", "sample_times"]

WEIGHTINGS = ("sigma2", "likelihood")


def dsm_weight(path: GaussianPath, t: Tensor, weighting: str) -> Tensor:
    """w(t) = lambda(t) / sigma(t)^2 for the named weighting; shape of ``t``."""
    if weighting == "sigma2":
        return torch.ones_like(t)
    if weighting == "likelihood":
        if not hasattr(path, "diffusion"):
            raise ValueError("likelihood weighting needs an SDE (a path with a diffusion g(t))")
        return path.diffusion(t) ** 2 / path.sigma(t) ** 2
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")


def sample_times(n: int, *, t_min: float = 1e-3, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """t ~ U[t_min, 1], shape ``(n,)``; t_min > 0 keeps the score finite."""
    t_min = check_time_scalar(t_min, "t_min")
    return t_min + (1 - t_min) * torch.rand(n, generator=generator, dtype=dtype, device=device)


def dsm_loss_terms(model, x0: Tensor, t: Tensor, eps: Tensor, path: GaussianPath, *,
                   prediction: str = "eps", weighting: str = "sigma2", **cond) -> Tensor:
    """Per-sample DSM loss w(t) * mean_d (eps_hat - eps)^2 at given ``t`` and ``eps``; ``(B,)``."""
    check_batch(x0, name="x0")
    t = as_time(t, x0)
    if eps.shape != x0.shape:
        raise ValueError(f"expected eps of shape {tuple(x0.shape)}; got {tuple(eps.shape)}")
    check_prediction(prediction)
    x_t = path.sample(x0, t, eps=eps).x_t
    eps_hat = convert(model(x_t, t, **cond), prediction, "eps", x_t, t, path)
    sq = (eps_hat - eps).pow(2).flatten(1).mean(1)  # (B,)
    return dsm_weight(path, t, weighting) * sq


def dsm_loss(model, x0: Tensor, path: GaussianPath, *, prediction: str = "eps",
             weighting: str = "sigma2", t_min: float = 1e-3,
             generator: torch.Generator | None = None, **cond) -> Tensor:
    """The DSM loss of ``model`` on a batch ``x0``, with t ~ U[t_min, 1] and fresh noise."""
    t = sample_times(x0.shape[0], t_min=t_min, generator=generator, dtype=x0.dtype, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return dsm_loss_terms(model, x0, t, eps, path, prediction=prediction, weighting=weighting,
                          **cond).mean()
