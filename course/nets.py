"""Small networks for 2-D data, called as ``model(x, t) -> Tensor`` like every model of the course."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .utils import check_batch, check_positive_int

__all__ = ["SinusoidalTimeEmbedding", "LabelEmbedding", "IntervalEmbedding", "TimeMLP"]


class SinusoidalTimeEmbedding(nn.Module):
    """Fourier features of t in [0, 1]: sin and cos at frequencies 2 pi * geometric(1, max_freq).

    The transformer positional encoding (Vaswani et al. 2017) as used for diffusion time in
    DDPM, rescaled to continuous t in [0, 1].
    """

    def __init__(self, dim: int = 32, max_freq: float = 100.0):
        super().__init__()
        dim = check_positive_int(dim, "dim")
        if dim % 2:
            raise ValueError(f"expected an even embedding dim; got {dim}")
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), dim // 2))
        self.register_buffer("freqs", 2 * math.pi * freqs)

    def forward(self, t: Tensor) -> Tensor:
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs  # (B, dim/2)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (B, dim)


class LabelEmbedding(nn.Embedding):
    """A learned embedding of class labels ``0..num_classes - 1`` plus the *null* class
    ``num_classes``, which ``y=None`` selects: the unconditional model that classifier-free
    guidance needs (training drops labels to it). Shared by ``TimeMLP`` and ``UNet``."""

    def __init__(self, num_classes: int, dim: int):
        self.num_classes = check_positive_int(num_classes, "num_classes")
        super().__init__(num_classes + 1, dim)

    def forward(self, y: Tensor | None, batch: int) -> Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=self.weight.device)
        if y.shape != (batch,) or y.dtype != torch.long:
            raise ValueError(f"expected y of shape ({batch},) and dtype int64; got {tuple(y.shape)} {y.dtype}")
        if y.min() < 0 or y.max() > self.num_classes:
            raise ValueError(f"expected labels in 0..{self.num_classes - 1}, or {self.num_classes} for the null "
                             f"class; got values from {y.min().item()} to {y.max().item()}")
        return super().forward(y)


class IntervalEmbedding(nn.Module):
    """An embedding of the interval t - r of a two-time model u(x, t, r=r) (MeanFlow's average
    velocity), added to the time embedding. Its output layer starts at zero, so a model built
    with it and loaded with a one-time model's weights computes exactly that model at first
    (tested), whatever r is."""

    def __init__(self, dim: int, max_freq: float = 100.0):
        super().__init__()
        self.embed = SinusoidalTimeEmbedding(dim, max_freq)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, t: Tensor, r: Tensor | None) -> Tensor:
        if r is None:
            r = t
        if r.shape != t.shape:
            raise ValueError(f"expected r of shape {tuple(t.shape)} like t; got {tuple(r.shape)}")
        return self.proj(self.embed(t - r))


def interval_embedding(module: IntervalEmbedding | None, t: Tensor, r: Tensor | None, owner: str):
    """``module(t, r)``, or 0 for a one-time model called without ``r``."""
    if module is None:
        if r is not None:
            raise ValueError(f"this {owner} takes one time (interval=False); got r")
        return 0.0
    return module(t, r)


class TimeMLP(nn.Module):
    """An MLP on [x, embed(t)] with SiLU activations: small and fast on a CPU.

    Args:
        dim: data dimension (2 for the toys); the output has the same dimension.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        t_dim: size of the time embedding.
        num_classes: number of classes for conditioning (``None``: unconditional). A learned label
            embedding is added to the time embedding; index ``num_classes`` is the null class,
            which ``y=None`` also selects (classifier-free guidance, as in ``course.unet.UNet``).
        interval: also take a second time ``r`` (``model(x, t, r=r)``, MeanFlow), through an
            :class:`IntervalEmbedding` of t - r; ``r=None`` means r = t.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, t_dim: int = 32,
                 num_classes: int | None = None, interval: bool = False):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        check_positive_int(hidden, "hidden")
        check_positive_int(depth, "depth")
        self.embed = SinusoidalTimeEmbedding(t_dim)
        self.num_classes = None if num_classes is None else check_positive_int(num_classes, "num_classes")
        self.label = None if num_classes is None else LabelEmbedding(num_classes, t_dim)
        self.interval = IntervalEmbedding(t_dim) if interval else None
        layers, width = [], dim + t_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        check_batch(x, trailing=(self.dim,))
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape ({x.shape[0]},); got {tuple(t.shape)}")
        emb = self.embed(t)
        if self.label is not None:
            emb = emb + self.label(y, x.shape[0])
        elif y is not None:
            raise ValueError("this TimeMLP is unconditional (num_classes=None); got labels y")
        emb = emb + interval_embedding(self.interval, t, r, "TimeMLP")
        h = torch.cat([x, emb.to(x.dtype)], dim=1)  # (B, dim + t_dim)
        return self.net(h)  # (B, dim)
