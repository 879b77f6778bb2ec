"""Chapter 10: SDXL's refiner as a velocity field that hands over at a switch time.

SDXL samples with its base model from pure noise and hands the latent over to a *refiner*, a model
trained only on low noise levels, for the last part of the trajectory (the refiner is "specialised
on high-quality, high-resolution data and small noise levels", Podell et al. 2023, Section 2.5).
With time running from t = 1 (noise) to t = 0 (data), :func:`refined_velocity` is the base's
velocity for t >= ``t_switch`` and the refiner's below; :func:`low_noise_cfm_loss` trains the
refiner on t ~ U[0, t_switch] only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .flow_matching import cfm_loss_terms
from .paths import GaussianPath
from .utils import check_batch, check_time_scalar

__all__ = ["refined_velocity", "low_noise_cfm_loss"]


def refined_velocity(base: Callable, refiner: Callable, t_switch: float) -> Callable:
    """``v(x, t, **cond)``: ``base`` where t >= t_switch, ``refiner`` where t < t_switch (per sample)."""
    t_switch = check_time_scalar(t_switch, "t_switch")

    def v(x: Tensor, t: Tensor, **cond) -> Tensor:
        low = t < t_switch
        if bool(low.all()):
            return refiner(x, t, **cond)
        if not bool(low.any()):
            return base(x, t, **cond)
        mask = low.reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(mask, refiner(x, t, **cond), base(x, t, **cond))

    return v


def low_noise_cfm_loss(model, x0: Tensor, path: GaussianPath, t_max: float, *,
                       generator: torch.Generator | None = None, **cond) -> Tensor:
    """The CFM loss with t ~ U[0, t_max]: a refiner's training, on low noise levels only."""
    check_batch(x0, name="x0")
    t_max = check_time_scalar(t_max, "t_max")
    if t_max <= 0:
        raise ValueError(f"expected 0 < t_max <= 1; got {t_max}")
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    t = t_max * torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype)
    return cfm_loss_terms(model, x0, eps, t, path, **cond).mean()
