"""Chapter 11's GAN building blocks: a small generator and a timestep-conditioned discriminator,
the three GAN losses the chapter uses, the R1 penalty, and Diffusion-GAN's diffusion augmentation
with its adaptive maximum noise level.

Notation: the discriminator returns *logits* ``D(y, t)`` of shape ``(B,)`` (no sigmoid); a real
image is one the discriminator should score high.

- non-saturating loss (Goodfellow et al. 2014): L_D = softplus(-D(real)) + softplus(D(fake)),
  L_G = softplus(-D(fake)), i.e. -log sigmoid(D(fake)); the generator's gradient does not vanish
  while the discriminator wins, unlike log(1 - sigmoid(D(fake))).
- hinge loss (ADD, StyleGAN-T): L_D = relu(1 - D(real)) + relu(1 + D(fake)), L_G = -D(fake).
- R1 (Mescheder et al. 2018): gamma / 2 * E ||grad_y D(y)||^2 on real inputs only, which pulls the
  discriminator towards zero gradient on the data, the fixed point where a perfect generator stays.
- Diffusion-GAN (Wang et al. 2022): real and generated images are both diffused along the course's
  path to the *same* times t <= t_max before the discriminator sees them, y = (1 - t) x + t eps,
  with t drawn with density proportional to t on [0, t_max] (the paper's "priority" distribution);
  the generator's gradient flows through the (differentiable) diffusion. ``t_max`` grows while the
  discriminator overfits, measured by r = E[sign D(y_real, t)] against a target of 0.6
  (:class:`AdaptiveT`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nets import SinusoidalTimeEmbedding
from .paths import GaussianPath, LinearPath
from .utils import check_batch, check_positive_int

__all__ = ["Generator", "Discriminator", "d_loss_nonsaturating", "g_loss_nonsaturating", "d_loss_hinge",
           "g_loss_hinge", "r1_penalty", "priority_times", "diffuse_pair", "AdaptiveT", "sample_generator"]


def _check_logits(name: str, logits: Tensor) -> Tensor:
    if not isinstance(logits, Tensor) or logits.ndim != 1 or logits.numel() == 0:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"expected {name} as discriminator logits of shape (B,); got {got}")
    return logits


def d_loss_nonsaturating(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The discriminator's loss -log sigmoid(D(real)) - log(1 - sigmoid(D(fake))), averaged."""
    return (F.softplus(-_check_logits("real_logits", real_logits)).mean()
            + F.softplus(_check_logits("fake_logits", fake_logits)).mean())


def g_loss_nonsaturating(fake_logits: Tensor) -> Tensor:
    """The generator's non-saturating loss -log sigmoid(D(fake)), averaged."""
    return F.softplus(-_check_logits("fake_logits", fake_logits)).mean()


def d_loss_hinge(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The discriminator's hinge loss relu(1 - D(real)) + relu(1 + D(fake)), averaged."""
    return (F.relu(1 - _check_logits("real_logits", real_logits)).mean()
            + F.relu(1 + _check_logits("fake_logits", fake_logits)).mean())


def g_loss_hinge(fake_logits: Tensor) -> Tensor:
    """The generator's hinge loss -D(fake), averaged."""
    return -_check_logits("fake_logits", fake_logits).mean()


def r1_penalty(real_logits: Tensor, real_inputs: Tensor, gamma: float = 1.0) -> Tensor:
    """gamma / 2 * E_batch ||d D / d y||^2 at the real inputs ``real_inputs`` (which must require
    grad and be what ``real_logits`` was computed from); differentiable in the discriminator's
    weights (``create_graph=True``), so it can be minimised."""
    _check_logits("real_logits", real_logits)
    if not real_inputs.requires_grad:
        raise ValueError("expected real_inputs with requires_grad=True (call real.requires_grad_() before D)")
    if gamma < 0:
        raise ValueError(f"expected gamma >= 0; got {gamma}")
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return 0.5 * gamma * grad.pow(2).flatten(1).sum(1).mean()


def priority_times(n: int, t_max: float, generator: torch.Generator | None = None, *,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` times on [0, t_max] with density 2 t / t_max^2 (Diffusion-GAN's "priority": larger
    times, where the discriminator is least sure, are drawn more often): t = t_max sqrt(u)."""
    if not 0.0 <= t_max <= 1.0:
        raise ValueError(f"expected 0 <= t_max <= 1; got {t_max}")
    return t_max * torch.rand(check_positive_int(n, "n"), generator=generator, dtype=dtype).sqrt()


def diffuse_pair(real: Tensor, fake: Tensor, t_max: float, *, path: GaussianPath | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Diffuse real and generated images to the same times: returns ``(y_real, y_fake, t)`` with
    ``y = alpha(t) x + sigma(t) eps`` for each (independent noise, one t per row shared by
    ``real[i]`` and ``fake[i]``), t from :func:`priority_times`. ``t_max = 0`` returns the
    inputs unchanged (the plain GAN). Gradients flow to ``fake``."""
    check_batch(real, ndim=None)
    if real.shape != fake.shape:
        raise ValueError(f"expected real and fake of one shape; got {tuple(real.shape)} and {tuple(fake.shape)}")
    path = path if path is not None else LinearPath()
    t = priority_times(real.shape[0], t_max, generator, dtype=real.dtype)
    if t_max == 0.0:
        return real, fake, t
    eps_real = torch.randn(real.shape, generator=generator, dtype=real.dtype)
    eps_fake = torch.randn(fake.shape, generator=generator, dtype=fake.dtype)
    return path.sample(real, t, eps=eps_real).x_t, path.sample(fake, t, eps=eps_fake).x_t, t


@dataclass
class AdaptiveT:
    """Diffusion-GAN's controller of the maximum time: ``t_max = lo + p (hi - lo)``; every
    ``interval`` observations p moves by ``step`` up when r = E[sign D(y_real, t)] > ``target``
    (the discriminator is sure of the real data: it overfits, so show it noisier images) and down
    otherwise, clipped to [0, 1]."""

    lo: float = 0.0
    hi: float = 0.5
    target: float = 0.6
    step: float = 0.02
    interval: int = 4
    p: float = 0.0
    history: list[float] = field(default_factory=list)  # t_max after every update
    _signs: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not 0.0 <= self.lo <= self.hi <= 1.0:
            raise ValueError(f"expected 0 <= lo <= hi <= 1; got lo={self.lo}, hi={self.hi}")
        if not -1.0 < self.target < 1.0:
            raise ValueError(f"expected a target r in (-1, 1); got {self.target}")
        check_positive_int(self.interval, "interval")

    @property
    def t_max(self) -> float:
        return self.lo + self.p * (self.hi - self.lo)

    @property
    def r(self) -> float | None:
        """The overfitting measure of the observations since the last update (None before any)."""
        return sum(self._signs) / len(self._signs) if self._signs else None

    def observe(self, real_logits: Tensor) -> None:
        """Record the discriminator's logits on (diffused) real images; update every ``interval``."""
        self._signs.append(float(torch.sign(_check_logits("real_logits", real_logits.detach())).mean()))
        if len(self._signs) >= self.interval:
            direction = 1.0 if self.r > self.target else -1.0
            self.p = min(1.0, max(0.0, self.p + direction * self.step))
            self._signs.clear()
            self.history.append(self.t_max)


class Generator(nn.Module):
    """A DCGAN-style generator z -> 28x28 image in [-1, 1]: a linear map to 7x7 features, two
    nearest-neighbour upsamplings with 3x3 convolutions (14, 28), tanh. ``num_classes`` adds a
    label embedding to z (class-conditional)."""

    def __init__(self, z_dim: int = 64, width: int = 64, out_channels: int = 1, num_classes: int | None = None):
        super().__init__()
        self.z_dim, w = check_positive_int(z_dim, "z_dim"), check_positive_int(width, "width")
        self.num_classes = None if num_classes is None else check_positive_int(num_classes, "num_classes")
        self.label = nn.Embedding(num_classes, z_dim) if num_classes is not None else None
        self.w = w
        self.fc = nn.Linear(z_dim, 2 * w * 7 * 7)

        def block(c_in, c_out):
            return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                                 nn.GroupNorm(8, c_out), nn.LeakyReLU(0.2))

        self.body = nn.Sequential(nn.GroupNorm(8, 2 * w), nn.LeakyReLU(0.2), block(2 * w, w), block(w, w // 2),
                                  nn.Conv2d(w // 2, out_channels, 3, padding=1), nn.Tanh())

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        check_batch(z, ndim=2)
        if z.shape[1] != self.z_dim:
            raise ValueError(f"expected z of shape (B, {self.z_dim}); got {tuple(z.shape)}")
        if self.label is not None:
            if y is None or y.shape != (z.shape[0],):
                raise ValueError(f"this generator is class-conditional: expected y of shape ({z.shape[0]},)")
            z = z + self.label(y)
        elif y is not None:
            raise ValueError("this generator is unconditional (num_classes=None); got labels y")
        return self.body(self.fc(z).view(-1, 2 * self.w, 7, 7))


class Discriminator(nn.Module):
    """A small convolutional discriminator ``D(y, t)`` -> logits ``(B,)``: three stride-2 stages
    (28 -> 14 -> 7 -> 4) with leaky ReLUs, each shifted by an embedding of the diffusion time t
    (t = 0 for a plain GAN, which then ignores it), a linear read-out, and with ``num_classes`` a
    projection term <embed(y), features> (Miyato & Koyama 2018)."""

    def __init__(self, in_channels: int = 1, width: int = 32, num_classes: int | None = None, emb_dim: int = 64):
        super().__init__()
        self.in_channels, w = check_positive_int(in_channels, "in_channels"), check_positive_int(width, "width")
        widths = (w, 2 * w, 4 * w)
        self.stages = nn.ModuleList()
        c_in = in_channels
        for c in widths:
            self.stages.append(nn.Conv2d(c_in, c, 4 if c_in == in_channels else 3, stride=2, padding=1))
            c_in = c
        self.time = nn.Sequential(SinusoidalTimeEmbedding(emb_dim), nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.shift = nn.ModuleList(nn.Linear(emb_dim, c) for c in widths)
        self.feature_dim = 4 * w * 4 * 4
        self.read = nn.Linear(self.feature_dim, 1)
        self.num_classes = None if num_classes is None else check_positive_int(num_classes, "num_classes")
        self.project = nn.Embedding(num_classes, self.feature_dim) if num_classes is not None else None

    def forward(self, x: Tensor, t: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        check_batch(x, ndim=4)
        if x.shape[1] != self.in_channels or x.shape[-2:] != (28, 28):
            raise ValueError(f"expected images of shape (B, {self.in_channels}, 28, 28); got {tuple(x.shape)}")
        t = torch.zeros(x.shape[0], dtype=x.dtype) if t is None else t
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape ({x.shape[0]},); got {tuple(t.shape)}")
        emb = self.time(t.to(x.dtype))
        h = x
        for conv, shift in zip(self.stages, self.shift, strict=True):
            h = F.leaky_relu(conv(h) + shift(emb)[:, :, None, None], 0.2)
        h = h.flatten(1)
        out = self.read(h).squeeze(1)
        if self.project is not None:
            if y is None or y.shape != (x.shape[0],):
                raise ValueError(f"this discriminator is class-conditional: expected y of shape ({x.shape[0]},)")
            out = out + (self.project(y) * h).sum(1) / self.feature_dim ** 0.5
        elif y is not None:
            raise ValueError("this discriminator is unconditional (num_classes=None); got labels y")
        return out


@torch.no_grad()
def sample_generator(generator: nn.Module, n: int, *, rng: torch.Generator | None = None,
                     y: Tensor | None = None, batch: int = 500) -> Tensor:
    """``n`` images of a :class:`Generator` from standard normal z (one network call each)."""
    generator.eval()
    z = torch.randn((check_positive_int(n, "n"), generator.z_dim), generator=rng)
    parts = [generator(a, None if y is None else y[i:i + batch]) for i, a in zip(range(0, n, batch), z.split(batch),
                                                                               strict=True)]
    return torch.cat(parts)
