"""Image classifiers: the evaluation classifier (clean images) and the time-conditioned "noisy"
classifier of classifier guidance, ``classifier(x)`` / ``noisy(x, t)`` -> logits.

Both are the same small CNN (two conv stages, 28 -> 14 -> 7, then a 128-d feature layer). The
noisy one adds FiLM time conditioning to every stage, so it can read x_t at any t of the path
it was trained on. ``features(x)`` gives the 128-d layer that MNIST-FD is computed in.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .nets import SinusoidalTimeEmbedding
from .utils import check_batch, check_positive_int

__all__ = ["ConvClassifier"]


class ConvClassifier(nn.Module):
    """A small CNN classifier; ``time_conditional=True`` makes it a noisy classifier ``f(x, t)``.

    Args:
        in_channels: 1 for MNIST, 3 for CIFAR-10.
        num_classes: number of classes.
        width: channels of the first stage (the second has twice as many).
        feature_dim: size of the feature layer (MNIST-FD's feature space).
        time_conditional: condition on t in [0, 1] (FiLM after each stage).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 128,
                 time_conditional: bool = False, emb_dim: int = 64):
        super().__init__()
        self.in_channels = check_positive_int(in_channels, "in_channels")
        w = check_positive_int(width, "width")
        self.conv = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                          nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()),
            nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.GroupNorm(8, 2 * w), nn.SiLU(),
                          nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU()),
        ])
        self.time_conditional = time_conditional
        if time_conditional:
            self.time = nn.Sequential(SinusoidalTimeEmbedding(emb_dim), nn.Linear(emb_dim, emb_dim), nn.SiLU())
            self.film = nn.ModuleList([nn.Linear(emb_dim, 2 * w), nn.Linear(emb_dim, 4 * w)])
        self.fc = nn.Linear(2 * w * 4 * 4, feature_dim)
        self.out = nn.Linear(feature_dim, check_positive_int(num_classes, "num_classes"))

    def feature_maps(self, x: Tensor, t: Tensor | None = None, *, every_conv: bool = False) -> list[Tensor]:
        """The two stages' outputs, ``(B, w, 28, 28)`` and ``(B, 2w, 14, 14)`` for MNIST; with
        ``every_conv`` the output of every convolution's activation, four maps (w, w, 2w, 2w
        channels), as LPIPS reads every layer of its network."""
        return self._stages(x, t, every_conv=every_conv)

    def _stages(self, x: Tensor, t: Tensor | None, *, every_conv: bool = False) -> list[Tensor]:
        check_batch(x, ndim=4)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected x with {self.in_channels} channel(s); got shape {tuple(x.shape)}")
        if self.time_conditional:
            if t is None or t.shape != (x.shape[0],):
                raise ValueError(f"this classifier is time-conditional: expected t of shape ({x.shape[0]},); "
                                 f"got {None if t is None else tuple(t.shape)}")
            emb = self.time(t.to(x.dtype))
        elif t is not None:
            raise ValueError("this classifier reads clean images only; got a time t")
        h, maps = x, []
        for i, stage in enumerate(self.conv):
            if every_conv:
                h = stage[:3](h)  # the first convolution, its norm and activation
                maps.append(h)
                h = stage[3:](h)
            else:
                h = stage(h)
            if self.time_conditional:
                scale, shift = self.film[i](emb)[:, :, None, None].chunk(2, dim=1)
                h = h * (1 + scale) + shift
            maps.append(h)
        return maps

    def features(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """The ``(B, feature_dim)`` features the logits are computed from."""
        h = F.adaptive_avg_pool2d(self._stages(x, t)[-1], 4).flatten(1)  # (B, 2w * 16)
        return F.silu(self.fc(h))

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        return self.out(self.features(x, t))
