"""Small networks for 2-D data, called as ``model(x, t) -> Tensor`` like every model of the course."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .utils import check_batch, check_positive_int

__all__ = ["SinusoidalTimeEmbedding", "TimeMLP"]


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


class TimeMLP(nn.Module):
    """An MLP on [x, embed(t)] with SiLU activations: small and fast on a CPU.

    Args:
        dim: data dimension (2 for the toys); the output has the same dimension.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        t_dim: size of the time embedding.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, t_dim: int = 32):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        check_positive_int(hidden, "hidden")
        check_positive_int(depth, "depth")
        self.embed = SinusoidalTimeEmbedding(t_dim)
        layers, width = [], dim + t_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        check_batch(x, trailing=(self.dim,))
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape ({x.shape[0]},); got {tuple(t.shape)}")
        h = torch.cat([x, self.embed(t).to(x.dtype)], dim=1)  # (B, dim + t_dim)
        return self.net(h)  # (B, dim)
