"""Jumps: flow matching on a finite state space (the third column of the slides' "(a) Flow
(b) Diffusion (c) Jump" figure), after Campbell et al. (2024) and Gat et al. (2024).

States are integers 0..K-1 (a 2-D grid of cells flattened row by row in the notebook). The
probability path mixes the data with uniform noise, in the course's time (t = 0 data, t = 1 noise):

    p_t(x | x_0) = (1 - t) [x = x_0] + t / K,      p_t(x) = (1 - t) q(x) + t / K.

Going from t to s < t, the continuous-time Markov chain that generates this path backwards jumps
with rate 1/t to a state drawn from the posterior p(x_0 = y | x_t = x):

    R_t(x -> y) = (p(x_0 = y | x_t = x) - [y = x]) / t.

One Euler step of length h jumps with probability h / t to a posterior draw, and with the exact
posterior this step is exact: if x ~ p_t, the result is distributed as p_{t-h} (``sample_jumps``'s
test checks it). A network learns the posterior by classification: cross-entropy of x_0 given
(x_t, t), the discrete counterpart of the denoising and flow-matching regressions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .samplers import SamplerStep, check_decreasing_grid
from .utils import as_time, check_positive_int

__all__ = [
    "check_states",
    "corrupt",
    "marginal",
    "exact_posterior",
    "jump_rates",
    "sample_jumps",
    "discrete_fm_loss",
    "PosteriorMLP",
    "total_variation",
]


def check_states(x: Tensor, num_states: int, name: str = "x") -> Tensor:
    """Validate integer states of shape ``(B,)`` in 0..num_states-1."""
    if not isinstance(x, Tensor) or x.ndim != 1 or x.dtype != torch.long:
        raise ValueError(f"expected {name} as a 1-D tensor of integer states (torch.long); got "
                         f"{type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}")
    if len(x) and (x.min() < 0 or x.max() >= num_states):
        raise ValueError(f"expected states in 0..{num_states - 1}; got values in "
                         f"{x.min().item()}..{x.max().item()}")
    return x


def _check_distribution(q: Tensor) -> Tensor:
    q = torch.as_tensor(q, dtype=torch.float64)
    if q.ndim != 1 or (q < 0).any() or abs(q.sum().item() - 1) > 1e-9:
        raise ValueError("expected a probability vector of shape (K,), non-negative, summing to 1")
    return q


def corrupt(x0: Tensor, t, num_states: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Draw x_t ~ p_t(. | x_0): keep x_0 with probability 1 - t, else a uniform state."""
    check_states(x0, num_states, "x0")
    t = as_time(t, x0.double())
    noise = torch.randint(0, num_states, x0.shape, generator=generator)
    replace = torch.rand(x0.shape, generator=generator, dtype=torch.float64) < t
    return torch.where(replace, noise, x0)


def marginal(q: Tensor, t: float) -> Tensor:
    """p_t = (1 - t) q + t / K."""
    q = _check_distribution(q)
    return (1 - t) * q + t / len(q)


def exact_posterior(q: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """p(x_0 = . | x_t = x) for data distribution ``q`` (shape ``(K,)``), as ``posterior(x, t)``
    returning probabilities of shape ``(B, K)``: proportional to q(y) ((1 - t)[y = x] + t / K)."""
    q = _check_distribution(q)
    k = len(q)

    def posterior(x: Tensor, t: Tensor) -> Tensor:
        check_states(x, k)
        t = as_time(t, x.double()).reshape(-1, 1)
        like = t / k + (1 - t) * nn.functional.one_hot(x, k).double()
        joint = q * like
        return joint / joint.sum(1, keepdim=True)

    return posterior


def jump_rates(posterior: Tensor, x: Tensor, t: float) -> Tensor:
    """Rows R_t(x -> .) of the backward generator, shape ``(B, K)``: off-diagonal entries are
    non-negative and each row sums to 0."""
    check_states(x, posterior.shape[1])
    return (posterior - nn.functional.one_hot(x, posterior.shape[1]).to(posterior)) / t


def sample_jumps(posterior_fn: Callable[[Tensor, Tensor], Tensor], x_init: Tensor, ts: Tensor, *,
                 generator: torch.Generator | None = None, callback: Callable | None = None,
                 **cond) -> Tensor:
    """Simulate the backward chain over the decreasing grid ``ts`` (from t = 1 to 0): from t to s
    each state jumps with probability (t - s) / t to a draw from ``posterior_fn(x, t)`` (rows of
    probabilities, shape ``(B, K)``). One posterior evaluation per step."""
    grid = check_decreasing_grid(ts)
    x = x_init
    for i in range(len(grid) - 1):
        t, s = grid[i], grid[i + 1]
        probs = posterior_fn(x, as_time(t, x.double()), **cond)
        if i == 0:  # later states are drawn here, in 0..K-1
            check_states(x, probs.shape[1], "x_init")
        target = torch.multinomial(probs.double(), 1, generator=generator).squeeze(1)
        jump = torch.rand(x.shape, generator=generator, dtype=torch.float64) < (t - s) / t
        x = torch.where(jump, target, x)
        if callback is not None:
            callback(SamplerStep(i=i, t=s, x=x))
    return x


def discrete_fm_loss(model, x0: Tensor, num_states: int, *, t_min: float = 1e-3,
                     generator: torch.Generator | None = None, **cond) -> Tensor:
    """Cross-entropy of x_0 under ``model(x_t, t)`` (logits ``(B, K)``), t ~ U[t_min, 1]."""
    check_states(x0, num_states, "x0")
    t = t_min + (1 - t_min) * torch.rand(x0.shape[0], generator=generator)
    x_t = corrupt(x0, t.double(), num_states, generator=generator)
    return nn.functional.cross_entropy(model(x_t, t, **cond), x0)


class PosteriorMLP(nn.Module):
    """Logits of p(x_0 | x_t, t) for states on a ``side x side`` grid. The input layer adds a
    learned embedding of the state (so "stay where you are" is easy to represent) to a linear
    map of its (row, column) coordinates in [-1, 1] and t; an MLP gives one logit per state."""

    def __init__(self, side: int, hidden: int = 128, depth: int = 3):
        super().__init__()
        self.side = check_positive_int(side, "side")
        self.embed = nn.Embedding(side * side, hidden)
        self.inp = nn.Linear(3, hidden)
        layers: list[nn.Module] = [nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, side * side))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        check_states(x, self.side * self.side)
        coords = torch.stack([x // self.side, x % self.side], dim=1).float() / max(self.side - 1, 1) * 2 - 1
        feats = torch.cat([coords, as_time(t, coords).reshape(-1, 1).float()], dim=1)
        return self.net(self.inp(feats) + self.embed(x))

    def posterior(self, x: Tensor, t: Tensor) -> Tensor:
        """Probabilities, shape ``(B, K)``, for ``sample_jumps``."""
        with torch.no_grad():
            return torch.softmax(self(x, t), dim=1)


def total_variation(x: Tensor, q: Tensor) -> float:
    """TV distance between the empirical histogram of states ``x`` and ``q``: 1/2 sum |p_hat - q|."""
    q = _check_distribution(q)
    check_states(x, len(q))
    counts = torch.bincount(x, minlength=len(q)).double()
    return 0.5 * (counts / counts.sum() - q).abs().sum().item()
