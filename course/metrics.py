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
from .utils import check_batch, check_positive, check_positive_int

__all__ = [
    "sliced_wasserstein",
    "energy_distance",
    "mmd_rbf",
    "expected_rbf_kernel",
    "mmd_floor",
    "NoiseFloor",
    "noise_floor",
    "mode_weights",
    "mode_weight_error",
    "Reference",
    "make_reference",
    "SampleQuality",
    "sample_quality",
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


def mmd_rbf(x: Tensor, y: Tensor, *, bandwidth: float = 0.1, chunk: int = 2048) -> float:
    """Squared maximum mean discrepancy with the Gaussian kernel k(a, b) = exp(-|a-b|^2 / (2 h^2)),
    V-statistic form (Gretton et al. 2012): mean k(x, x') + mean k(y, y') - 2 mean k(x, y).

    Its noise floor is (1/n + 1/m)(1 - E k(X, X')), exact for mixtures (:func:`mmd_floor`).
    A bandwidth near the mode width makes it local: it sees the shape of each mode rather than
    the random number of samples per mode, so it varies far less between draws than the
    energy distance or sliced W2.
    """
    x, y = _pair(x, y)
    bandwidth = check_positive(bandwidth, "bandwidth")
    return (_mean_kernel(x, x, bandwidth, chunk) + _mean_kernel(y, y, bandwidth, chunk)
            - 2 * _mean_kernel(x, y, bandwidth, chunk))


def _mean_kernel(a: Tensor, b: Tensor, bandwidth: float, chunk: int = 2048) -> float:
    """mean over all pairs of exp(-|a_i - b_j|^2 / (2 h^2)), in chunks of ``a``'s rows."""
    total = 0.0
    for i in range(0, a.shape[0], chunk):
        total += torch.exp(-torch.cdist(a[i:i + chunk], b).pow(2) / (2 * bandwidth**2)).sum().item()
    return total / (a.shape[0] * b.shape[0])


def expected_rbf_kernel(mixture: GaussianMixture, bandwidth: float) -> float:
    """E k(X, X') for independent X, X' from an isotropic Gaussian mixture, in closed form:
    sum_jk w_j w_k (h^2 / v_jk)^(D/2) exp(-|mu_j - mu_k|^2 / (2 v_jk)), v_jk = h^2 + s_j^2 + s_k^2."""
    h2 = check_positive(bandwidth, "bandwidth") ** 2
    v = h2 + mixture.stds[:, None] ** 2 + mixture.stds[None, :] ** 2  # (K, K)
    d2 = torch.cdist(mixture.means, mixture.means).pow(2)
    k = (h2 / v) ** (mixture.dim / 2) * torch.exp(-d2 / (2 * v))
    return (mixture.weights[:, None] * mixture.weights[None, :] * k).sum().item()


def mmd_floor(mixture: GaussianMixture, n: int, *, bandwidth: float = 0.1) -> float:
    """Expected :func:`mmd_rbf` between two independent sets of ``n`` samples of ``mixture``."""
    n = check_positive_int(n, "n")
    return 2 / n * (1 - expected_rbf_kernel(mixture, bandwidth))


@dataclass(frozen=True)
class NoiseFloor:
    """Distance between independent true samples of size ``n``: mean and spread over repeats."""

    mean: float
    std: float
    n: int
    repeats: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f} (n={self.n}, {self.repeats} repeats)"

    @classmethod
    def from_values(cls, values: list[float], n: int) -> NoiseFloor:
        """Mean and standard deviation of distances measured between independent true sets."""
        v = torch.tensor(values, dtype=torch.float64)
        return cls(v.mean().item(), v.std().item() if len(v) > 1 else float("nan"), n, len(v))


def noise_floor(metric: Callable[[Tensor, Tensor], float], sample: Callable[[int], Tensor], n: int,
                *, repeats: int = 5) -> NoiseFloor:
    """The distance ``metric`` between two independent sets of ``n`` true samples.

    ``sample(n)`` draws ``n`` true samples (pass a generator inside it for reproducibility).
    """
    n = check_positive_int(n, "n")
    repeats = check_positive_int(repeats, "repeats")
    return NoiseFloor.from_values([metric(sample(n), sample(n)) for _ in range(repeats)], n)


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


@dataclass(frozen=True)
class Reference:
    """True sample sets to compare against, and the noise floors at that size.

    The MMD floor is exact for a Gaussian mixture (``std`` 0) and estimated otherwise; the
    sliced-W2 floor is always estimated, over ``repeats`` pairs of independent true sets.
    """

    data: object
    n: int
    samples: tuple[Tensor, ...]  # independent true sample sets of size n
    mmd_floor: NoiseFloor
    sw_floor: NoiseFloor
    bandwidth: float
    self_kernels: tuple[float, ...] | None = None  # mean k(ref, ref') of each set, computed once


def make_reference(data, n: int, *, repeats: int = 4, bandwidth: float = 0.1,
                   generator: torch.Generator | None = None) -> Reference:
    """Draw ``repeats`` reference sets of size ``n`` and the noise floors of both distances."""
    n, repeats = check_positive_int(n, "n"), check_positive_int(repeats, "repeats")
    refs = tuple(data.sample(n, generator=generator) for _ in range(repeats))
    pairs = [(data.sample(n, generator=generator), data.sample(n, generator=generator))
             for _ in range(repeats)]

    def floor(metric):
        return NoiseFloor.from_values([metric(a, b) for a, b in pairs], n)

    if isinstance(data, GaussianMixture):
        mmd = NoiseFloor(mmd_floor(data, n, bandwidth=bandwidth), 0.0, n, 0)
    else:
        mmd = floor(lambda a, b: mmd_rbf(a, b, bandwidth=bandwidth))
    pairs_self = tuple(_mean_kernel(*(_pair(r, r)), bandwidth) for r in refs)
    return Reference(data, n, refs, mmd, floor(sliced_wasserstein), bandwidth, pairs_self)


def _ratio_se(a: float, a_se: float, floor: NoiseFloor) -> float:
    """Standard error of a / floor.mean by the delta method (independent estimates)."""
    f_se = floor.std / math.sqrt(floor.repeats) if floor.repeats > 0 else 0.0
    return abs(a / floor.mean) * math.sqrt((a_se / a) ** 2 + (f_se / floor.mean) ** 2)


@dataclass(frozen=True)
class SampleQuality:
    """Distances of generated samples to the truth, each beside its noise floor, with standard
    errors over the compared pairs of sets."""

    mmd: float
    mmd_se: float
    mmd_floor: NoiseFloor
    sliced_w2: float
    sliced_w2_se: float
    sw_floor: NoiseFloor
    mode_error: float  # mean over the generated sets; NaN when the data is not a mixture

    @property
    def mmd_ratio(self) -> float:
        return self.mmd / self.mmd_floor.mean

    @property
    def mmd_ratio_se(self) -> float:
        return _ratio_se(self.mmd, self.mmd_se, self.mmd_floor)

    @property
    def sw_ratio(self) -> float:
        return self.sliced_w2 / self.sw_floor.mean

    @property
    def sw_ratio_se(self) -> float:
        return _ratio_se(self.sliced_w2, self.sliced_w2_se, self.sw_floor)

    def __str__(self) -> str:
        return (f"MMD {self.mmd_ratio:5.2f}x floor  SW2 {self.sw_ratio:5.2f}x floor  "
                f"mode-weight error {self.mode_error:.4f}")


def _mmds(pairs, reference: Reference) -> list[float]:
    """mmd_rbf of each (generated, reference) pair, reusing each set's own kernel mean."""
    h, self_x, out = reference.bandwidth, {}, []
    for j, (x, y) in enumerate(pairs):
        a, b = _pair(x, y)
        if id(x) not in self_x:
            self_x[id(x)] = _mean_kernel(a, a, h)
        kyy = reference.self_kernels[j] if reference.self_kernels is not None else _mean_kernel(b, b, h)
        out.append(self_x[id(x)] + kyy - 2 * _mean_kernel(a, b, h))
    return out


def sample_quality(x: Tensor, reference: Reference) -> SampleQuality:
    """Compare generated samples with the reference.

    ``x`` holds either one set of ``n`` samples, compared with every reference set (averaging
    out the reference's own fluctuations), or ``repeats`` independent sets of ``n`` stacked
    (``repeats * n`` rows), set j compared with reference set j (averaging out both sides).
    """
    n, r = reference.n, len(reference.samples)
    if x.shape[0] == n:
        pairs = [(x, ref) for ref in reference.samples]
    elif x.shape[0] == n * r:
        pairs = list(zip(x.split(n), reference.samples, strict=True))
    else:
        raise ValueError(f"expected {n} samples, or {r} sets of {n} stacked ({n * r}); got {x.shape[0]}")

    def mean_se(values):
        v = torch.tensor(values, dtype=torch.float64)
        return v.mean().item(), (v.std().item() / math.sqrt(len(v)) if len(v) > 1 else float("nan"))

    mmd, mmd_se = mean_se(_mmds(pairs, reference))
    sw, sw_se = mean_se([sliced_wasserstein(a, b) for a, b in pairs])
    mixture = reference.data if isinstance(reference.data, GaussianMixture) else None
    sets = list({id(a): a for a, _ in pairs}.values())
    mode = (sum(mode_weight_error(a, mixture) for a in sets) / len(sets)
            if mixture is not None else float("nan"))
    return SampleQuality(mmd, mmd_se, reference.mmd_floor, sw, sw_se, reference.sw_floor, mode)
