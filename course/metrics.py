"""Distances between point clouds, always read beside their noise floor.

A distance between a finite sample and the truth is never zero: two independent samples of
the true distribution, of the same size, are already apart. :func:`noise_floor` measures that
distance, and a sampler is as good as the data allow when its distance is close to the floor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .toy_data import GaussianMixture
from .utils import check_batch, check_positive_int

__all__ = [
    "sliced_wasserstein",
    "energy_distance",
    "NoiseFloor",
    "noise_floor",
    "mode_weights",
    "mode_weight_error",
]


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    check_batch(x, name="x")
    check_batch(y, name="y")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"expected samples of the same shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    return x.flatten(1).double(), y.flatten(1).double()


def sliced_wasserstein(x: Tensor, y: Tensor, *, n_projections: int = 512, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random directions of W2^2 between
    the 1-D projections (Rabin et al. 2011). Needs equally many samples in ``x`` and ``y``.

    The directions come from ``seed``, so two calls compare the same projections.
    """
    x, y = _pair(x, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"expected as many samples in x as in y; got {x.shape[0]} and {y.shape[0]}")
    n_projections = check_positive_int(n_projections, "n_projections")
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], n_projections, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)  # (D, P) unit vectors
    px, _ = torch.sort(x @ dirs, dim=0)  # (n, P) sorted projections
    py, _ = torch.sort(y @ dirs, dim=0)
    return math.sqrt((px - py).pow(2).mean().item())


def _mean_distance(a: Tensor, b: Tensor, chunk: int = 2048) -> float:
    total = 0.0
    for i in range(0, a.shape[0], chunk):
        total += torch.cdist(a[i:i + chunk], b).sum().item()
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo), V-statistic form:
    all pairs including i = j, so it is >= 0 and its noise floor is positive."""
    x, y = _pair(x, y)
    return 2 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y)


@dataclass(frozen=True)
class NoiseFloor:
    """Distance between independent true samples of size ``n``: mean and spread over repeats."""

    mean: float
    std: float
    n: int
    repeats: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f} (n={self.n}, {self.repeats} repeats)"


def noise_floor(metric: Callable[[Tensor, Tensor], float], sample: Callable[[int], Tensor], n: int,
                *, repeats: int = 5) -> NoiseFloor:
    """The distance ``metric`` between two independent sets of ``n`` true samples.

    ``sample(n)`` draws ``n`` true samples (pass a generator inside it for reproducibility).
    """
    n = check_positive_int(n, "n")
    repeats = check_positive_int(repeats, "repeats")
    values = torch.tensor([metric(sample(n), sample(n)) for _ in range(repeats)], dtype=torch.float64)
    std = values.std().item() if repeats > 1 else float("nan")
    return NoiseFloor(values.mean().item(), std, n, repeats)


def mode_weights(x: Tensor, mixture: GaussianMixture) -> Tensor:
    """Fraction of samples assigned to each component (by the most probable component); ``(K,)``."""
    check_batch(x, trailing=(mixture.dim,))
    means = mixture.means.to(torch.float64)
    x = x.double()
    log_r = (torch.log(mixture.weights)
             - mixture.dim * torch.log(mixture.stds)
             - torch.cdist(x, means).pow(2) / (2 * mixture.stds**2))  # (n, K) up to a constant
    k = log_r.argmax(dim=1)
    return torch.bincount(k, minlength=len(mixture.weights)).double() / x.shape[0]


def mode_weight_error(x: Tensor, mixture: GaussianMixture) -> float:
    """max_k |fraction of samples in mode k - w_k|."""
    return (mode_weights(x, mixture) - mixture.weights).abs().max().item()
