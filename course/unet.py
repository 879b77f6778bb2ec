"""A small U-Net for 28x28 and 32x32 images, called ``model(x, t, y=None)``.

Residual blocks with FiLM time (and class) conditioning, two resolution changes (28 -> 14 -> 7
or 32 -> 16 -> 8), skip connections by concatenation. Class conditioning has a learned *null*
class (index ``num_classes``): ``y=None`` or ``y == num_classes`` asks for the unconditional
model, which is what classifier-free guidance needs (training drops labels to the null class).

The defaults were chosen by ``benchmarks/bench_06_image_track.py --speed`` on 2 CPU cores;
see docs/design-notes.md ("Image track").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dit import MicroConditioning
from .nets import IntervalEmbedding, LabelEmbedding, SinusoidalTimeEmbedding, interval_embedding
from .text import masked_mean
from .transformer import CrossAttention
from .utils import check_batch, check_positive_int

__all__ = ["UNet", "ResBlock", "SpatialCrossAttention"]


def _norm(channels: int, groups: int) -> nn.Module:
    return nn.GroupNorm(min(groups, channels), channels) if groups else nn.Identity()


class ResBlock(nn.Module):
    """x + conv(silu(FiLM(norm(conv(silu(norm(x)))), emb))) with a 1x1 skip when widths differ."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int = 8):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class SpatialCrossAttention(nn.Module):
    """x + CrossAttention(GroupNorm(x) as HW tokens -> context): every position of a feature map
    reads the context tokens (Stable Diffusion's text conditioning). The output projection starts
    at zero, so the block starts as the identity."""

    def __init__(self, channels: int, context_dim: int, heads: int = 4, groups: int = 8):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.attn = CrossAttention(channels, context_dim, heads)
        nn.init.zeros_(self.attn.out.weight)
        nn.init.zeros_(self.attn.out.bias)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        return x + self.attn(tokens, context, context_mask).transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """Small U-Net.

    Args:
        in_channels: 1 (MNIST) or 3 (CIFAR-10); the output has the same shape as the input.
        channels: widths at the three resolutions (full, 1/2, 1/4).
        emb_dim: size of the time (and class) embedding.
        num_classes: number of classes for conditioning (``None``: unconditional); the model
            then also has a null class, index ``num_classes``.
        groups: GroupNorm groups (0: no normalisation).
        patch: 2 folds each 2x2 pixel patch into channels first (``PixelUnshuffle``), so the
            network runs at half resolution (28 -> 14 -> 7 -> 4); 1 works on pixels.
        interval: also take a second time ``r`` (``model(x, t, y, r=r)``, MeanFlow's average
            velocity) through a zero-initialised :class:`~course.nets.IntervalEmbedding`.
        cond_channels: > 0 takes a conditioning image ``low_res`` of that many channels at the
            input's size, concatenated to the input (a super-resolution stage's upsampled low-res
            image, chapter 08); the output keeps ``in_channels``.
        aug_level: also take the noise-augmentation level ``aug_level`` in [0, 1] of that image,
            embedded like t (Imagen's noise-conditioning augmentation).
        context_dim: > 0 takes a sequence of context tokens ``context`` (B, L, context_dim) with an
            optional padding mask ``context_mask`` (B, L) (chapter 09: a caption's text-encoder
            states): cross-attention from the feature maps at 1/2 and 1/4 resolution to the tokens,
            and their masked mean added to the time embedding (global conditioning).
        micro_size: > 0 also takes SDXL's micro-conditions ``size`` (B,) and ``crop`` (B, 2) in pixels
            of images up to ``micro_size`` (chapter 10: :class:`~course.dit.MicroConditioning`, added
            to the time embedding).
    """

    def __init__(self, in_channels: int = 1, channels: tuple[int, int, int] = (32, 64, 64), emb_dim: int = 128,
                 num_classes: int | None = None, groups: int = 8, patch: int = 1,
                 interval: bool = False, cond_channels: int = 0, aug_level: bool = False,
                 context_dim: int = 0, heads: int = 4, micro_size: int = 0):
        super().__init__()
        self.in_channels = check_positive_int(in_channels, "in_channels")
        if len(channels) != 3:
            raise ValueError(f"expected three widths (full, 1/2, 1/4 resolution); got {channels}")
        c0, c1, c2 = (check_positive_int(c, "channels") for c in channels)
        self.num_classes = None if num_classes is None else check_positive_int(num_classes, "num_classes")
        self.time = nn.Sequential(SinusoidalTimeEmbedding(emb_dim), nn.Linear(emb_dim, emb_dim), nn.SiLU(),
                                  nn.Linear(emb_dim, emb_dim))
        self.label = LabelEmbedding(num_classes, emb_dim) if num_classes is not None else None
        self.interval = IntervalEmbedding(emb_dim) if interval else None
        self.patch = check_positive_int(patch, "patch")
        self.cond_channels = check_positive_int(cond_channels, "cond_channels", allow_zero=True)
        self.aug = nn.Sequential(SinusoidalTimeEmbedding(emb_dim), nn.Linear(emb_dim, emb_dim)) if aug_level else None
        self.micro_size = check_positive_int(micro_size, "micro_size", allow_zero=True)
        self.micro = MicroConditioning(emb_dim, max_size=micro_size) if micro_size else None
        self.stem = nn.Sequential(nn.PixelUnshuffle(patch),
                                  nn.Conv2d((in_channels + cond_channels) * patch**2, c0, 3, padding=1))
        self.down0 = ResBlock(c0, c0, emb_dim, groups)
        self.pool0 = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim, groups)
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.mid = ResBlock(c2, c2, emb_dim, groups)
        self.up1 = ResBlock(c2 + c1, c1, emb_dim, groups)
        self.up0 = ResBlock(c1 + c0, c0, emb_dim, groups)
        self.out = nn.Sequential(_norm(c0, groups), nn.SiLU(), nn.Conv2d(c0, in_channels * patch**2, 3, padding=1),
                                 nn.PixelShuffle(patch))
        self.context_dim = check_positive_int(context_dim, "context_dim", allow_zero=True)
        if self.context_dim:
            self.pooled = nn.Linear(context_dim, emb_dim)
            self.cross = nn.ModuleList(SpatialCrossAttention(c, context_dim, heads, groups) for c in (c1, c2, c1))

    def embed(self, t: Tensor, y: Tensor | None, batch: int, r: Tensor | None = None) -> Tensor:
        emb = self.time(t) + interval_embedding(self.interval, t, r, "U-Net")
        if self.label is not None:
            return emb + self.label(y, batch)
        if y is not None:
            raise ValueError("this U-Net is unconditional (num_classes=None); got labels y")
        return emb

    def _conditioning(self, x: Tensor, low_res: Tensor | None, aug_level: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if not self.cond_channels:
            if low_res is not None or aug_level is not None:
                raise ValueError("this U-Net takes no conditioning image (cond_channels=0); got low_res or aug_level")
            return x, None
        want = (x.shape[0], self.cond_channels, *x.shape[2:])
        if not isinstance(low_res, Tensor) or tuple(low_res.shape) != want:
            got = tuple(low_res.shape) if isinstance(low_res, Tensor) else low_res
            raise ValueError(f"expected low_res of shape {want} (upsampled to the input's size); got {got}")
        if self.aug is None and aug_level is not None:
            raise ValueError("this U-Net takes no aug_level (aug_level=False)")
        if self.aug is not None and (not isinstance(aug_level, Tensor) or aug_level.shape != (x.shape[0],)):
            got = tuple(aug_level.shape) if isinstance(aug_level, Tensor) else aug_level
            raise ValueError(f"expected aug_level of shape ({x.shape[0]},); got {got}")
        extra = None if self.aug is None else self.aug(aug_level.to(x.dtype))
        return torch.cat([x, low_res.to(x.dtype)], 1), extra

    def _context(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor | None:
        if not self.context_dim:
            if context is not None or context_mask is not None:
                raise ValueError("this U-Net takes no context (context_dim=0); got context")
            return None
        if not isinstance(context, Tensor) or context.ndim != 3 or context.shape[0] != x.shape[0] \
                or context.shape[2] != self.context_dim:
            got = tuple(context.shape) if isinstance(context, Tensor) else context
            raise ValueError(f"expected context of shape ({x.shape[0]}, L, {self.context_dim}) (e.g. a caption's "
                             f"text-encoder states; the empty caption's for the unconditional model); got {got}")
        mask = context_mask if context_mask is not None else torch.ones(context.shape[:2], dtype=torch.bool)
        return self.pooled(masked_mean(context.to(x.dtype), mask))

    def encode(self, x: Tensor, t: Tensor, y: Tensor | None = None, r: Tensor | None = None,
               low_res: Tensor | None = None, aug_level: Tensor | None = None,
               context: Tensor | None = None, context_mask: Tensor | None = None,
               stem_extra: Tensor | None = None, size: Tensor | None = None,
               crop: Tensor | None = None) -> tuple:
        """The down path: ``(emb, h0, h1, h_mid, attend)``, the features the up path joins (ControlNet
        runs a trainable copy of exactly this). ``stem_extra`` is added to the stem's output (the
        embedded control image of a ControlNet copy)."""
        check_batch(x, ndim=4)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected x with {self.in_channels} channel(s); got shape {tuple(x.shape)}")
        if x.shape[-1] % self.patch or x.shape[-2] % self.patch:
            raise ValueError(f"expected height and width divisible by patch={self.patch}; got shape {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape ({x.shape[0]},); got {tuple(t.shape)}")
        emb = self.embed(t.to(x.dtype), y, x.shape[0], None if r is None else r.to(x.dtype)).to(x.dtype)
        inp, extra = self._conditioning(x, low_res, aug_level)
        if extra is not None:
            emb = emb + extra
        if self.micro is not None:
            if size is None or crop is None:
                raise ValueError("this U-Net is micro-conditioned (micro_size > 0): expected size (B,) and crop (B, 2)")
            emb = emb + self.micro(size, crop, x.shape[0]).to(x.dtype)
        elif size is not None or crop is not None:
            raise ValueError("this U-Net takes no size or crop conditions (micro_size=0)")
        pooled = self._context(x, context, context_mask)
        if pooled is not None:
            emb = emb + pooled
            context = context.to(x.dtype)

        def attend(i: int, h: Tensor) -> Tensor:
            return h if pooled is None else self.cross[i](h, context, context_mask)

        stem = self.stem(inp)
        if stem_extra is not None:
            stem = stem + stem_extra
        h0 = self.down0(stem, emb)  # (B, c0, H, W)
        h1 = attend(0, self.down1(self.pool0(h0), emb))  # (B, c1, H/2, W/2)
        h = attend(1, self.mid(self.pool1(h1), emb))  # (B, c2, H/4, W/4)
        return emb, h0, h1, h, attend

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, r: Tensor | None = None,
                low_res: Tensor | None = None, aug_level: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                residuals: tuple[Tensor, Tensor, Tensor] | None = None, size: Tensor | None = None,
                crop: Tensor | None = None) -> Tensor:
        emb, h0, h1, h, attend = self.encode(x, t, y, r, low_res, aug_level, context, context_mask, size=size,
                                             crop=crop)
        if residuals is not None:  # a ControlNet's additions to the skips and the middle (chapter 10)
            if len(residuals) != 3 or any(a.shape != b.shape for a, b in zip(residuals, (h0, h1, h), strict=True)):
                raise ValueError(f"expected residuals of shapes {tuple(h0.shape)}, {tuple(h1.shape)}, {tuple(h.shape)}")
            h0, h1, h = h0 + residuals[0], h1 + residuals[1], h + residuals[2]
        h = attend(2, self.up1(torch.cat([F.interpolate(h, size=h1.shape[-2:], mode="nearest"), h1], 1), emb))
        h = self.up0(torch.cat([F.interpolate(h, size=h0.shape[-2:], mode="nearest"), h0], 1), emb)
        return self.out(h)
