"""Chapter 08: cascaded generation (Ho et al. 2022, "Cascaded diffusion models"; Imagen's
64 -> 256 -> 1024) at MNIST scale: a class-conditional base model makes 14x14 digits, and a
super-resolution (SR) model makes the 28x28 digit conditioned on the upsampled 14x14 image.

The SR model is a flow model like every other: ``sr(x_t, t, low_res=up(l), aug_level=s)`` predicts the
velocity of the 28x28 image, with the conditioning image concatenated to its input. Trained on
real digits, it sees low-res inputs l = down(x) of the training data; at sampling it sees the base
model's outputs, which carry the base model's artefacts. *Noise-conditioning augmentation* closes
that gap: during training the low-res image is itself noised on the linear path,
l_s = (1 - s) l + s eps with s ~ U[0, s_max], and s is given to the model; at sampling a fixed
level s is applied to the base sample. The SR model then learns not to trust the fine detail of its
conditioning image, only what survives the noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .flow_matching import cfm_loss
from .image_recipes import sample_classes
from .ode import sample_flow_euler
from .paths import LinearPath
from .utils import check_batch, check_positive_int

__all__ = ["Cascade", "downsample", "upsample", "augment_low_res", "sr_loss", "sample_cascade"]

PATH = LinearPath()


def downsample(x: Tensor, factor: int = 2) -> Tensor:
    """The low-res image: the mean of each ``factor x factor`` block (28x28 -> 14x14 for 2)."""
    check_batch(x, ndim=4)
    factor = check_positive_int(factor, "factor")
    if x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"expected height and width divisible by {factor}; got shape {tuple(x.shape)}")
    return F.avg_pool2d(x, factor)


def upsample(low: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """``low`` resized to ``size`` by bilinear interpolation: the SR model's conditioning image."""
    check_batch(low, ndim=4)
    return F.interpolate(low, size=tuple(size), mode="bilinear", align_corners=False)


def augment_low_res(low: Tensor, level: Tensor | float, *, generator: torch.Generator | None = None) -> Tensor:
    """Noise-conditioning augmentation: ``(1 - s) low + s eps`` on the linear path, ``s = level``
    (a float or one level per image, in [0, 1]); level 0 returns ``low`` unchanged."""
    check_batch(low, ndim=4)
    level = torch.as_tensor(level, dtype=low.dtype)
    if level.ndim == 0:
        level = level.expand(low.shape[0])
    if level.shape != (low.shape[0],):
        raise ValueError(f"expected one augmentation level or one per image ({low.shape[0]},); got {tuple(level.shape)}")
    if ((level < 0) | (level > 1)).any():
        raise ValueError(f"expected augmentation levels in [0, 1]; got min {float(level.min())}, max {float(level.max())}")
    eps = torch.randn(low.shape, generator=generator, dtype=low.dtype)
    s = level[:, None, None, None]
    return (1 - s) * low + s * eps


def sr_loss(model: nn.Module, x: Tensor, *, max_aug: float, generator: torch.Generator | None = None) -> Tensor:
    """The SR stage's CFM loss on full-res images ``x``: condition on the upsampled, noise-augmented
    low-res image ``up(aug(down(x), s))``, s ~ U[0, max_aug] per image (0: no augmentation)."""
    if not 0 <= max_aug <= 1:
        raise ValueError(f"expected 0 <= max_aug <= 1; got {max_aug}")
    s = torch.rand(x.shape[0], generator=generator, dtype=x.dtype) * max_aug
    cond = upsample(augment_low_res(downsample(x), s, generator=generator), x.shape[-2:])
    return cfm_loss(model, x, PATH, generator=generator, low_res=cond, aug_level=s)


class Cascade(nn.Module):
    """A base model on low-res images and a super-resolution model, trained and shipped together.

    Args:
        base: a class-conditional ``base(l_t, t, y=...)`` on low-res images (with a null class for CFG).
        sr: ``sr(x_t, t, low_res=..., aug_level=...)`` on full-res images (e.g. a
            :class:`~course.unet.UNet` with ``cond_channels=1, aug_level=True``).
        low_shape, image_shape: (channels, height, width) of the two stages.
    """

    def __init__(self, base: nn.Module, sr: nn.Module, low_shape=(1, 14, 14), image_shape=(1, 28, 28)):
        super().__init__()
        self.base, self.sr = base, sr
        self.low_shape, self.image_shape = tuple(low_shape), tuple(image_shape)
        self.num_classes = getattr(base, "num_classes", None)

    def forward(self, *args, **kwargs):
        raise TypeError("a Cascade has two models: sample it with sample_cascade, or call .base and .sr")


@torch.no_grad()
def sample_cascade(cascade: Cascade, labels: Tensor, *, w: float = 1.0, nfe_base: int = 20, nfe_sr: int = 10,
                   aug_level: float = 0.1, generator: torch.Generator | None = None,
                   return_low: bool = False, low: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Class-conditional full-res samples: the base model with CFG at weight ``w`` (``nfe_base``
    Euler steps), then the SR model (``nfe_sr`` Euler steps) on the base sample augmented at
    ``aug_level``. With ``return_low`` also the base model's low-res samples. Given ``low`` (one
    low-res image per label, e.g. downsampled real digits), the base stage is skipped and the SR
    stage super-resolves ``low``: the cascade's SR stage measured apart from its base model."""
    cascade.eval()
    if low is None:
        low = sample_classes(cascade.base, labels, w=w, nfe=nfe_base, generator=generator, shape=cascade.low_shape)
    elif tuple(low.shape) != (labels.shape[0], *cascade.low_shape):
        raise ValueError(f"expected low of shape {(labels.shape[0], *cascade.low_shape)} (one low-res image per "
                         f"label); got {tuple(low.shape)}")
    ts = torch.linspace(1.0, 0.0, check_positive_int(nfe_sr, "nfe_sr") + 1)
    out = []
    for part in low.split(500):
        level = torch.full((part.shape[0],), float(aug_level))
        cond = upsample(augment_low_res(part, level, generator=generator), cascade.image_shape[1:])
        x1 = torch.randn((part.shape[0], *cascade.image_shape), generator=generator)
        out.append(sample_flow_euler(cascade.sr, x1, ts, low_res=cond, aug_level=level))
    images = torch.cat(out)
    return (images, low) if return_low else images
