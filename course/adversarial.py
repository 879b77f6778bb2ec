"""Chapter 11's adversarial distillation: ADD, LADD and Diffusion2GAN on the course's path.

A student is a velocity network initialised from the teacher; at a student time s it predicts
x^_theta = x0(x_s, s) (for the linear path x_s - s v), so at s = 1 it maps pure noise to an image in
one network call.

- **ADD** (Sauer et al. 2023): the student sees real digits noised to s in ``STUDENT_TIMES``; its
  prediction is scored by (a) a discriminator of frozen features (DINOv2 in the paper; here the
  noisy classifier's features at t = 0, never the evaluation classifier that the FD is measured
  in), with trainable heads, hinge loss and R1 on the real images, and (b) the distillation loss
  c(t) || x^_theta - sg(x^_teacher(x^_theta noised to t, t)) ||^2 with c(t) = alpha(t) (ADD's
  "exponential" weighting: the teacher's prediction from a noisier input is blurrier and counts less).
- **LADD** (Sauer et al. 2024): the discriminator's features are the teacher's own, from its
  encoder at a noised input x_t (t drawn per sample): no second network, and the discriminator
  judges at every noise level. Here the teacher works on pixels, so its "latents" are images.
- **Diffusion2GAN** (Kang et al. 2024): a pair dataset (noise, the teacher's ODE endpoint from it,
  class) made once (:func:`make_pairs`), and a one-step generator regressed onto it with a
  perceptual distance plus a conditional GAN loss (:func:`diffusion2gan_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conversions import to_x0
from .nets import SinusoidalTimeEmbedding
from .ode import sample_flow_euler
from .paths import GaussianPath, LinearPath
from .utils import check_batch, check_positive_int

__all__ = ["STUDENT_TIMES", "student_x0", "student_inputs", "distillation_target", "add_distillation_loss",
           "sample_student", "FeatureDiscriminator", "teacher_features", "Pairs", "make_pairs",
           "diffusion2gan_loss"]

STUDENT_TIMES = (1.0, 0.75, 0.5, 0.25)  # ADD's four student steps, on t in [0, 1]


def student_x0(student: Callable, x_s: Tensor, s: Tensor, *, path: GaussianPath | None = None, **cond) -> Tensor:
    """The student's image x^_theta = x0 implied by its velocity at (x_s, s)."""
    path = path if path is not None else LinearPath()
    return to_x0(student(x_s, s, **cond), "velocity", x_s, s, path)


def student_inputs(x0: Tensor, *, times: tuple[float, ...] = STUDENT_TIMES, path: GaussianPath | None = None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Real images noised to a student time drawn uniformly from ``times`` per row: ``(x_s, s)``."""
    check_batch(x0, ndim=None)
    if not times or any(not 0 < s <= 1 for s in times):
        raise ValueError(f"expected student times in (0, 1]; got {times}")
    path = path if path is not None else LinearPath()
    s = torch.tensor(times, dtype=x0.dtype)[torch.randint(len(times), (x0.shape[0],), generator=generator)]
    return path.sample(x0, s, generator=generator).x_t, s


@torch.no_grad()
def distillation_target(teacher_x0: Callable, x_student: Tensor, t: Tensor, *, path: GaussianPath | None = None,
                        generator: torch.Generator | None = None, **cond) -> Tensor:
    """ADD's target: the teacher's x0-prediction ``teacher_x0(x_t, t, **cond)`` at the student's
    image noised to t, with no gradient (the stop-grad of the slide)."""
    path = path if path is not None else LinearPath()
    x_t = path.sample(x_student.detach(), t, generator=generator).x_t
    return teacher_x0(x_t, t, **cond).detach()


def add_distillation_loss(x_student: Tensor, target: Tensor, t: Tensor, *, path: GaussianPath | None = None) -> Tensor:
    """mean_i c(t_i) * mean((x_student_i - target_i)^2) with c(t) = alpha(t); ``target`` must
    carry no gradient (from :func:`distillation_target`)."""
    if x_student.shape != target.shape:
        raise ValueError(f"expected the student's images and the targets of one shape; got "
                         f"{tuple(x_student.shape)} and {tuple(target.shape)}")
    if target.requires_grad:
        raise ValueError("expected a target without gradient (the teacher's prediction is a stop-gradient target)")
    if t.shape != (x_student.shape[0],):
        raise ValueError(f"expected t of shape ({x_student.shape[0]},); got {tuple(t.shape)}")
    path = path if path is not None else LinearPath()
    return (path.alpha(t) * (x_student - target).pow(2).flatten(1).mean(1)).mean()


@torch.no_grad()
def sample_student(student: Callable, x1: Tensor, *, steps: int = 1, times: tuple[float, ...] = STUDENT_TIMES,
                   path: GaussianPath | None = None, generator: torch.Generator | None = None, **cond) -> Tensor:
    """ADD's few-step sampler from noise ``x1``: predict x0 at the first of ``steps`` evenly spaced
    entries of ``times`` (1.0 first), noise it to the next one, predict again; ``steps`` network calls."""
    if not 1 <= steps <= len(times):
        raise ValueError(f"expected 1 <= steps <= {len(times)}; got {steps}")
    path = path if path is not None else LinearPath()
    chosen = [times[round(i * (len(times) - 1) / max(steps - 1, 1))] for i in range(steps)] if steps > 1 else [times[0]]
    x = x1
    for i, s in enumerate(chosen):
        ss = torch.full((x.shape[0],), s, dtype=x.dtype)
        x0 = student_x0(student, x, ss, path=path, **cond)
        if i + 1 < len(chosen):
            x = path.sample(x0, torch.full_like(ss, chosen[i + 1]), generator=generator).x_t
    return x0


class FeatureDiscriminator(nn.Module):
    """A discriminator on a frozen network's feature maps: ``features(x, t) -> [f_1, ..., f_L]``
    (not trained here), one trainable head per map (3x3 convolution, leaky ReLU, 1x1 convolution
    to one logit per position, averaged), the heads' logits summed. With ``num_classes`` each head
    adds a projection term <embed_l(y), mean-pooled hidden>; with ``time_conditional`` each head's
    hidden layer is shifted by an embedding of t (LADD judges at any noise level)."""

    def __init__(self, features: Callable, channels: tuple[int, ...], *, hidden: int = 64,
                 num_classes: int | None = None, time_conditional: bool = False, emb_dim: int = 64):
        super().__init__()
        self.features = features
        self.channels = tuple(check_positive_int(c, "channels") for c in channels)
        self.hidden = check_positive_int(hidden, "hidden")
        self.heads = nn.ModuleList(nn.Conv2d(c, hidden, 3, padding=1) for c in self.channels)
        self.read = nn.ModuleList(nn.Conv2d(hidden, 1, 1) for _ in self.channels)
        self.num_classes = None if num_classes is None else check_positive_int(num_classes, "num_classes")
        self.project = (nn.ModuleList(nn.Embedding(num_classes, hidden) for _ in self.channels)
                        if num_classes is not None else None)
        self.time = (nn.Sequential(SinusoidalTimeEmbedding(emb_dim), nn.Linear(emb_dim, len(self.channels) * hidden))
                     if time_conditional else None)

    def forward(self, x: Tensor, t: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        check_batch(x, ndim=4)
        if self.time is not None and (t is None or t.shape != (x.shape[0],)):
            raise ValueError(f"this discriminator is time-conditional: expected t of shape ({x.shape[0]},)")
        if self.project is not None and (y is None or y.shape != (x.shape[0],)):
            raise ValueError(f"this discriminator is class-conditional: expected y of shape ({x.shape[0]},)")
        maps = self.features(x, t, y)
        if len(maps) != len(self.channels) or any(m.shape[1] != c for m, c in zip(maps, self.channels, strict=True)):
            raise ValueError(f"the feature network returned maps with {[m.shape[1] for m in maps]} channels; "
                             f"expected {list(self.channels)}")
        shifts = self.time(t.to(x.dtype)).chunk(len(self.channels), 1) if self.time is not None else None
        out = torch.zeros(x.shape[0], dtype=x.dtype)
        for i, (f, head, read) in enumerate(zip(maps, self.heads, self.read, strict=True)):
            h = head(f)
            if shifts is not None:
                h = h + shifts[i][:, :, None, None]
            h = F.leaky_relu(h, 0.2)
            out = out + read(h).mean((1, 2, 3))
            if self.project is not None:
                out = out + (self.project[i](y) * h.mean((-2, -1))).sum(1) / self.hidden ** 0.5
        return out


def teacher_features(teacher: nn.Module) -> Callable:
    """LADD's feature network: the teacher U-Net's encoder outputs ``(h0, h1, h_mid)`` at
    ``(x_t, t, y)`` (:meth:`course.unet.UNet.encode`)."""
    def features(x: Tensor, t: Tensor, y: Tensor | None) -> list[Tensor]:
        _, h0, h1, h, _ = teacher.encode(x, t, y)
        return [h0, h1, h]
    return features


@dataclass(frozen=True)
class Pairs:
    """Diffusion2GAN's dataset: the noise, the teacher's ODE endpoint from it, the class."""

    noise: Tensor
    images: Tensor
    labels: Tensor

    def __post_init__(self):
        if self.noise.shape != self.images.shape or self.labels.shape != (self.noise.shape[0],):
            raise ValueError(f"expected noise and images of one shape and one label per pair; got "
                             f"{tuple(self.noise.shape)}, {tuple(self.images.shape)} and {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.noise.shape[0]


@torch.no_grad()
def make_pairs(velocity: Callable, labels: Tensor, shape: tuple[int, ...], *, nfe: int = 20, seed: int = 0,
               batch: int = 500) -> Pairs:
    """Run the teacher's ODE (``velocity(x, t, y=...)``, Euler, ``nfe`` uniform steps from t = 1)
    from fresh noise for every label; reproducible from ``seed``."""
    check_positive_int(nfe, "nfe")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((labels.shape[0], *shape), generator=gen)
    ts = torch.linspace(1.0, 0.0, nfe + 1)
    images = torch.cat([sample_flow_euler(velocity, n, ts, y=y)
                        for n, y in zip(noise.split(batch), labels.split(batch), strict=True)])
    return Pairs(noise, images, labels)


def diffusion2gan_loss(fake: Tensor, target: Tensor, perceptual: Callable[[Tensor, Tensor], Tensor],
                       fake_logits: Tensor | None = None, *, gan_weight: float = 0.0) -> Tensor:
    """Diffusion2GAN's generator loss: mean perceptual distance between the one-step output
    ``fake`` and the teacher's endpoint ``target`` of the same noise, plus ``gan_weight`` times the
    non-saturating generator loss on ``fake_logits`` (required when ``gan_weight > 0``)."""
    if fake.shape != target.shape:
        raise ValueError(f"expected generated and target images of one shape; got {tuple(fake.shape)} and "
                         f"{tuple(target.shape)}")
    if gan_weight < 0:
        raise ValueError(f"expected gan_weight >= 0; got {gan_weight}")
    loss = perceptual(fake, target).mean()
    if gan_weight > 0:
        if fake_logits is None:
            raise ValueError("gan_weight > 0 needs the discriminator's logits on the generated images")
        loss = loss + gan_weight * F.softplus(-fake_logits).mean()
    return loss
