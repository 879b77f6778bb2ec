"""Chapter 10: ControlNet (Zhang, Rao & Agrawala 2023) on the course's U-Net.

The base U-Net is frozen. A **trainable copy of its down path** (stem, the two down blocks and the
middle block, initialised with the base's weights) reads the noisy input plus the embedded control
image (edge maps, stroke drawings), and its three feature maps reach the base through **zero
convolutions**, 1x1 convolutions whose weight *and* bias start at zero; they are added to the
features the base's up path joins (its two skips and its middle output). The control image enters
the copy through a small convolutional "hint" network that also ends in a zero convolution.

So at initialisation every addition is exactly zero and the ControlNet computes the base model bit
for bit (tested), while the gradients still reach the copy (through the zero convolutions' weights,
whose gradient is the copy's features times the upstream gradient). ``strength`` scales every
addition at sampling: 0 is the base model.

``controlnet(x, t, y=None, control=c)`` has the base's call signature plus the control image.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import UNet
from .utils import check_positive_int

__all__ = ["ControlNet", "zero_conv", "edge_map"]


def zero_conv(cin: int, cout: int) -> nn.Conv2d:
    """A 1x1 convolution whose weight and bias are zero: it outputs 0 until training moves it."""
    conv = nn.Conv2d(check_positive_int(cin, "cin"), check_positive_int(cout, "cout"), 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNet(nn.Module):
    """A frozen :class:`~course.unet.UNet` plus a trainable, zero-joined copy of its down path."""

    def __init__(self, base: UNet, control_channels: int = 1, hint_width: int = 16):
        super().__init__()
        if not isinstance(base, UNet):
            raise ValueError(f"expected a course UNet as the base model; got {type(base).__name__}")
        if base.context_dim or base.cond_channels or base.interval is not None or base.micro is not None:
            raise ValueError("expected a class-conditional or unconditional base U-Net (no context, low_res, r or size)")
        self.base = base.requires_grad_(False).eval()
        self.copy = copy.deepcopy(base).requires_grad_(True)
        for unused in (self.copy.up1, self.copy.up0, self.copy.out):  # the copy is an encoder only
            unused.requires_grad_(False)
        self.control_channels = check_positive_int(control_channels, "control_channels")
        c0, c1, c2 = base.down0.conv1.out_channels, base.down1.conv1.out_channels, base.mid.conv1.out_channels
        w = check_positive_int(hint_width, "hint_width")
        self.hint = nn.Sequential(nn.Conv2d(control_channels, w, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.PixelUnshuffle(base.patch),
                                  zero_conv(w * base.patch**2, c0))
        self.zero = nn.ModuleList([zero_conv(c0, c0), zero_conv(c1, c1), zero_conv(c2, c2)])
        self.num_classes, self.in_channels = base.num_classes, base.in_channels

    def train(self, mode: bool = True) -> ControlNet:
        super().train(mode)
        self.base.eval()  # frozen
        return self

    def residuals(self, x: Tensor, t: Tensor, y: Tensor | None, control: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        want = (x.shape[0], self.control_channels, *x.shape[2:])
        if not isinstance(control, Tensor) or tuple(control.shape) != want:
            got = tuple(control.shape) if isinstance(control, Tensor) else type(control).__name__
            raise ValueError(f"expected a control image of shape {want}; got {got}")
        _, h0, h1, h, _ = self.copy.encode(x, t, y, stem_extra=self.hint(control.to(x.dtype)))
        return tuple(z(f) for z, f in zip(self.zero, (h0, h1, h), strict=True))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, control: Tensor | None = None,
                strength: float = 1.0) -> Tensor:
        if control is None:
            raise ValueError("a ControlNet needs control=... (the control image); the base model is .base")
        extra = self.residuals(x, t, y, control)
        return self.base(x, t, y, residuals=tuple(strength * r for r in extra))


def edge_map(images: Tensor, threshold: float = 0.5) -> Tensor:
    """Binary edges ``(N, 1, H, W)`` in {-1, 1} of images in [-1, 1]: pixels where the ink
    p = (x + 1) / 2 changes by more than ``threshold`` towards a 4-neighbour (the outline of the
    strokes, a Canny-like control at MNIST scale)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected grey images (N, 1, H, W); got {tuple(getattr(images, 'shape', ()))}")
    p = ((images + 1) / 2).clamp(0, 1)
    padded = F.pad(p, (1, 1, 1, 1), mode="replicate")
    diffs = torch.stack([(padded[..., 1:-1, 2:] - p).abs(), (padded[..., 1:-1, :-2] - p).abs(),
                         (padded[..., 2:, 1:-1] - p).abs(), (padded[..., :-2, 1:-1] - p).abs()])
    return torch.where(diffs.amax(0) > threshold, 1.0, -1.0).to(images.dtype)
