"""2-D toy distributions: small objects with ``sample(n, generator=...)``.

The Gaussian mixture is the course's workhorse because everything about it is exact: its
density, its score, and - under any Gaussian path x_t = alpha x_0 + sigma eps - the density and
score of the perturbed marginal p_t, which is again a Gaussian mixture with components
N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I). Later chapters compare learned models with this
"oracle score".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .paths import GaussianPath
from .utils import as_time, check_batch, check_positive, check_positive_int

__all__ = [
    "ToyDistribution",
    "GaussianMixture",
    "TwoMoons",
    "Checkerboard",
    "SwissRoll",
    "gaussian",
    "eight_gaussians",
    "two_class_mixture",
    "oracle_score",
    "get_toy",
    "TOY_NAMES",
]


def _numpy_seed(generator: torch.Generator | None) -> int:
    """Draw a seed for a NumPy/scikit-learn generator from a torch generator."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


class ToyDistribution:
    """A distribution over R^dim that can be sampled."""

    dim: int = 2
    name: str = "toy"

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples, shape ``(n, dim)``, float32."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GaussianMixture(ToyDistribution):
    """sum_k w_k N(mu_k, s_k^2 I): isotropic components, optional class label per component.

    Args:
        means: ``(K, D)`` component means.
        stds: ``(K,)`` component standard deviations (or a single float).
        weights: ``(K,)`` mixture weights (normalised here); equal if omitted.
        labels: ``(K,)`` integer class of each component, for conditional generation.
    """

    def __init__(self, means, stds, weights=None, labels=None, name: str = "gaussian_mixture"):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"expected means of shape (K, D); got {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        if (stds <= 0).any():
            raise ValueError(f"expected stds > 0; got {stds.tolist()}")
        weights = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(
            weights, dtype=torch.float64)
        if weights.shape != (k,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"expected {k} non-negative weights with a positive sum; got {weights.tolist()}")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != (k,):
                raise ValueError(f"expected labels of shape ({k},); got {tuple(labels.shape)}")
        self.means, self.stds, self.labels, self.name = means, stds, labels, name
        self.weights = weights / weights.sum()
        self.dim = means.shape[1]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={len(self.weights)}, dim={self.dim}, name={self.name!r})"

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    # ---- sampling ---------------------------------------------------------------------------
    def sample_components(self, n: int, *, generator: torch.Generator | None = None
                          ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples and the index of the component each came from: ``(x, k)``."""
        n = check_positive_int(n, "n")
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + self.stds[k, None] * z
        return x.float(), k

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        return self.sample_components(n, generator=generator)[0]

    def sample_labelled(self, n: int, *, generator: torch.Generator | None = None
                        ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples with their class labels: ``(x (n, D), y (n,))``."""
        if self.labels is None:
            raise ValueError(f"{self.name} has no class labels; build it with labels=...")
        x, k = self.sample_components(n, generator=generator)
        return x, self.labels[k]

    def condition(self, label: int) -> GaussianMixture:
        """The class-conditional mixture p(x | y = label)."""
        if self.labels is None:
            raise ValueError(f"{self.name} has no class labels to condition on")
        keep = self.labels == int(label)
        if not keep.any():
            raise ValueError(f"no component has label {label}; labels are {sorted(set(self.labels.tolist()))}")
        return GaussianMixture(self.means[keep], self.stds[keep], self.weights[keep],
                               self.labels[keep], name=f"{self.name}|y={label}")

    # ---- moments ----------------------------------------------------------------------------
    def mean(self) -> Tensor:
        """E[x], shape ``(D,)`` (float64)."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Cov[x], shape ``(D, D)`` (float64)."""
        m = self.mean()
        centred = self.means - m
        within = (self.weights * self.stds**2).sum() * torch.eye(self.dim, dtype=torch.float64)
        return within + (self.weights[:, None] * centred).T @ centred

    # ---- exact densities and scores of the perturbed marginals ------------------------------
    def _components(self, x: Tensor, alpha: Tensor, sigma: Tensor):
        """Per-component quantities of the mixture seen through x = alpha x_0 + sigma eps.

        p is the mixture with components N(alpha mu_k, v_k I), v_k = alpha^2 s_k^2 + sigma^2.
        Returns ``(log_joint (B, K), diff = alpha mu_k - x (B, K, D), var = v_k (B, K), a (B, 1, 1))``.
        """
        check_batch(x, trailing=(self.dim,))
        means = self.means.to(x)  # (K, D)
        a = alpha.to(x).reshape(-1, 1, 1)  # (B, 1, 1)
        var = a[..., 0] ** 2 * self.stds.to(x) ** 2 + sigma.to(x).reshape(-1, 1) ** 2  # (B, K)
        diff = a * means - x[:, None, :]  # (B, K, D): alpha mu_k - x
        log_n = -0.5 * self.dim * torch.log(2 * math.pi * var) - diff.pow(2).sum(-1) / (2 * var)
        return torch.log(self.weights.to(x)) + log_n, diff, var, a

    def _log_prob_and_score(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """log p and grad log p(x) = sum_k r_k(x) (alpha mu_k - x) / v_k, with r_k the posterior
        of component k."""
        log_joint, diff, var, _ = self._components(x, alpha, sigma)
        resp = torch.softmax(log_joint, dim=1)  # (B, K) posterior over components
        score = (resp[..., None] * diff / var[..., None]).sum(1)  # (B, D)
        return torch.logsumexp(log_joint, dim=1), score

    def posterior_mean(self, x: Tensor, t: Tensor | float, path: GaussianPath) -> Tensor:
        """E[x_0 | x_t = x] in closed form: sum_k r_k(x) (mu_k + alpha s_k^2 / v_k (x - alpha mu_k)).

        Finite wherever v_k > 0, including alpha = 0 (where it is the data mean), which the
        route through the score (x_0 = (x + sigma^2 score) / alpha) is not."""
        t = as_time(t, x)
        alpha, sigma = path.alpha(t), path.sigma(t)
        log_joint, diff, var, a = self._components(x, alpha, sigma)
        resp = torch.softmax(log_joint, dim=1)
        comp = self.means.to(x) - a * self.stds.to(x)[None, :, None] ** 2 / var[..., None] * diff
        return (resp[..., None] * comp).sum(1)

    def perturbed_log_prob(self, x: Tensor, t: Tensor | float, path: GaussianPath) -> Tensor:
        """log p_t(x) of the data pushed through ``path`` at time ``t``; shape ``(B,)``."""
        t = as_time(t, x)
        return self._log_prob_and_score(x, path.alpha(t), path.sigma(t))[0]

    def perturbed_score(self, x: Tensor, t: Tensor | float, path: GaussianPath) -> Tensor:
        """grad_x log p_t(x) in closed form; shaped like ``x``."""
        t = as_time(t, x)
        return self._log_prob_and_score(x, path.alpha(t), path.sigma(t))[1]

    def class_log_posterior(self, x: Tensor, t: Tensor | float, path: GaussianPath) -> Tensor:
        """log p_t(y | x) for every class y, exactly (Bayes' rule over the components of each
        class); shape ``(B, num_classes)``. The "noisy classifier" of a labelled mixture."""
        if self.labels is None:
            raise ValueError(f"{self.name} has no class labels")
        t = as_time(t, x)
        log_joint = self._components(x, path.alpha(t), path.sigma(t))[0]  # (B, K)
        per_class = torch.stack([torch.logsumexp(log_joint[:, self.labels == c], dim=1)
                                 for c in range(self.num_classes)], dim=1)  # (B, C)
        return per_class - torch.logsumexp(log_joint, dim=1, keepdim=True)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) of the clean data; shape ``(B,)``."""
        return self._log_prob_and_score(x, *self._clean(x))[0]

    def score(self, x: Tensor) -> Tensor:
        """grad_x log p(x) of the clean data; shaped like ``x``."""
        return self._log_prob_and_score(x, *self._clean(x))[1]

    @staticmethod
    def _clean(x: Tensor) -> tuple[Tensor, Tensor]:
        check_batch(x)
        return x.new_ones(x.shape[0]), x.new_zeros(x.shape[0])


def oracle_score(data: GaussianMixture, path: GaussianPath) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact score s(x, t) = grad log p_t(x) of mixture data under ``path``, as a model-like
    callable ``score(x, t)``: the reference every learned score model is compared with."""
    if not isinstance(data, GaussianMixture):
        raise ValueError(f"oracle_score needs a GaussianMixture; got {type(data).__name__}")

    def score(x: Tensor, t: Tensor) -> Tensor:
        return data.perturbed_score(x, t, path)

    return score


def gaussian(mean=(0.0, 0.0), std: float = 1.0) -> GaussianMixture:
    """A single isotropic Gaussian N(mean, std^2 I) (a one-component mixture)."""
    return GaussianMixture(torch.as_tensor(mean, dtype=torch.float64)[None], [check_positive(std, "std")],
                           name="gaussian")


def eight_gaussians(radius: float = 2.0, std: float = 0.1, n_modes: int = 8) -> GaussianMixture:
    """``n_modes`` equal-weight Gaussians evenly spaced on a circle (the slides' running example)."""
    n_modes = check_positive_int(n_modes, "n_modes")
    angles = 2 * math.pi * torch.arange(n_modes, dtype=torch.float64) / n_modes
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return GaussianMixture(means, std, name="eight_gaussians")


def two_class_mixture(radius: float = 2.0, std: float = 0.1, n_modes: int = 8) -> GaussianMixture:
    """The circle mixture with alternating class labels 0/1: for conditional generation."""
    base = eight_gaussians(radius, std, n_modes)
    labels = torch.arange(n_modes) % 2
    return GaussianMixture(base.means, base.stds, base.weights, labels, name="two_class_mixture")


class TwoMoons(ToyDistribution):
    """scikit-learn's two interleaving half-circles, centred and scaled to unit-ish spread."""

    name = "two_moons"

    def __init__(self, noise: float = 0.05):
        self.noise = noise

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        from sklearn.datasets import make_moons

        n = check_positive_int(n, "n")
        x, _ = make_moons(n_samples=n, noise=self.noise, random_state=_numpy_seed(generator))
        return torch.as_tensor((x - np.array([0.5, 0.25])) * 1.5, dtype=torch.float32)


class SwissRoll(ToyDistribution):
    """scikit-learn's swiss roll projected to its 2-D spiral, scaled to about [-2.5, 2.5]^2."""

    name = "swiss_roll"

    def __init__(self, noise: float = 0.3):
        self.noise = noise

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        from sklearn.datasets import make_swiss_roll

        n = check_positive_int(n, "n")
        x, _ = make_swiss_roll(n_samples=n, noise=self.noise, random_state=_numpy_seed(generator))
        return torch.as_tensor(x[:, [0, 2]] / 5.0, dtype=torch.float32)


class Checkerboard(ToyDistribution):
    """Uniform on the dark squares of a ``size x size`` board covering [-2, 2]^2."""

    name = "checkerboard"

    def __init__(self, size: int = 4):
        self.size = check_positive_int(size, "size")

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        n = check_positive_int(n, "n")
        cells = [(i, j) for i in range(self.size) for j in range(self.size) if (i + j) % 2 == 0]
        cells = torch.tensor(cells, dtype=torch.float32)  # (M, 2) dark squares
        idx = torch.randint(len(cells), (n,), generator=generator)
        u = torch.rand(n, 2, generator=generator)
        width = 4.0 / self.size
        return (cells[idx] + u) * width - 2.0


_TOYS: dict[str, Callable[[], ToyDistribution]] = {
    "eight_gaussians": eight_gaussians,
    "two_class_mixture": two_class_mixture,
    "two_moons": TwoMoons,
    "checkerboard": Checkerboard,
    "swiss_roll": SwissRoll,
}
TOY_NAMES = tuple(_TOYS)


def get_toy(name: str) -> ToyDistribution:
    """Build a toy distribution by name (one of ``TOY_NAMES``)."""
    if name not in _TOYS:
        raise ValueError(f"unknown toy distribution {name!r}; expected one of {', '.join(TOY_NAMES)}")
    return _TOYS[name]()
