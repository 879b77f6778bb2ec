"""Chapter 10: Diffusion Transformers (Peebles & Xie 2023) and SDXL's micro-conditioning.

A :class:`DiT` cuts its input (pixels or chapter-08 latents) into p x p patches
(:func:`~course.transformer.patchify`), embeds each linearly, adds fixed 2-D sine/cosine positions,
runs the course's :class:`~course.transformer.TransformerBlock` stack with **adaLN-Zero**
conditioning on c = embed(t) + embed(y) (+ embed(size, crop) with micro-conditioning), and maps the
tokens back with a final adaLN layer and a linear map to p^2 C numbers per patch
(:func:`~course.transformer.unpatchify`). It is called ``model(x, t, y=None)`` like the U-Net, with
the null class ``num_classes`` for classifier-free guidance, so every sampler and guidance rule of
the course applies unchanged.

**Zero initialisation** (the paper's Section 3.2): every block's modulation map *and* the final
layer's modulation and output map start at zero. Then each block is the identity and the whole
network outputs exactly 0 at initialisation (tested) - several small public DiTs leave the final
layer at its default initialisation, and the network then starts from a random function.

**Guidance on every channel.** The reference ``forward_with_cfg`` guides only the first three
channels (the eps half of a model that also learns its variance, on 4-channel latents). These
models predict one quantity per channel with no learned variance, so the course's
:func:`~course.guidance.classifier_free_guidance` guides all of them (tested on a 1-channel DiT).

**Micro-conditioning** (SDXL, Podell et al. 2023, Section 2.2): the original size of a training
image before it was resized and the offsets of the crop taken from it are embedded with Fourier
features and added to the conditioning, so that the model learns what low resolution and cropping
look like *as conditions* and, at sampling, can be asked for a large original size and crop (0, 0).
:class:`MicroConditioning` checks the ranges and refuses values outside them.

Cost: :func:`forward_gflops` counts the floating-point operations of one forward pass with
``torch.utils.flop_counter`` (multiply-adds counted as 2), the x axis of the DiT scaling plot.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nets import LabelEmbedding, SinusoidalTimeEmbedding
from .transformer import TransformerBlock, patchify, unpatchify
from .utils import check_batch, check_positive_int

__all__ = ["DiT", "MicroConditioning", "positions_2d", "forward_gflops", "degrade"]


def positions_2d(grid: int, dim: int) -> Tensor:
    """Fixed 2-D sine/cosine codes ``(grid^2, dim)`` of a grid x grid patch raster (row, then column):
    half the channels encode the row, half the column (DiT's ``get_2d_sincos_pos_embed``)."""
    grid, dim = check_positive_int(grid, "grid"), check_positive_int(dim, "dim")
    if dim % 4:
        raise ValueError(f"expected dim divisible by 4 (sin and cos for rows and columns); got {dim}")
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim // 2, 2, dtype=torch.float64) / (dim // 2))
    pos = torch.arange(grid, dtype=torch.float64)
    angles = pos[:, None] * freq[None, :]  # (grid, dim / 4)
    code = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, dim / 2)
    rows = code[:, None, :].expand(grid, grid, dim // 2)
    cols = code[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=2).reshape(grid * grid, dim).float()


class MicroConditioning(nn.Module):
    """Embeds SDXL's conditions ``(original_size, crop_top, crop_left)`` in pixels, each with Fourier
    features, into one vector of ``dim``. ``size`` must lie in [1, max_size], the crops in
    [0, max_size); anything else is refused with the range named."""

    def __init__(self, dim: int, max_size: int = 28):
        super().__init__()
        self.max_size = check_positive_int(max_size, "max_size")
        self.embed = SinusoidalTimeEmbedding(32)
        self.proj = nn.Sequential(nn.Linear(3 * 32, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, size: Tensor, crop: Tensor, batch: int) -> Tensor:
        if not isinstance(size, Tensor) or size.shape != (batch,):
            raise ValueError(f"expected size of shape ({batch},) (original size in pixels); got "
                             f"{tuple(getattr(size, 'shape', ())) or type(size).__name__}")
        if not isinstance(crop, Tensor) or crop.shape != (batch, 2):
            raise ValueError(f"expected crop of shape ({batch}, 2) (top and left offsets in pixels); got "
                             f"{tuple(getattr(crop, 'shape', ())) or type(crop).__name__}")
        if bool((size < 1).any() or (size > self.max_size).any()):
            raise ValueError(f"expected original sizes in [1, {self.max_size}] pixels; got "
                             f"{float(size.min()):g}..{float(size.max()):g}")
        if bool((crop < 0).any() or (crop >= self.max_size).any()):
            raise ValueError(f"expected crop offsets in [0, {self.max_size}) pixels; got "
                             f"{float(crop.min()):g}..{float(crop.max()):g}")
        values = torch.stack([size, crop[:, 0], crop[:, 1]], dim=1).float() / self.max_size  # (B, 3) in [0, 1]
        feats = torch.cat([self.embed(values[:, i]) for i in range(3)], dim=1)
        return self.proj(feats)


class DiT(nn.Module):
    """A Diffusion Transformer over ``in_channels x size x size`` inputs in ``patch x patch`` patches.

    Args:
        in_channels, size: the input (1 x 28 x 28 MNIST pixels, 4 x 7 x 7 latents, ...); the output
            has the same shape.
        patch: patch size (size must be divisible by it); N = (size / patch)^2 tokens.
        dim, depth, heads: the transformer's width, number of blocks and attention heads.
        num_classes: class conditioning with a null class ``num_classes`` (None: unconditional).
        micro: also take SDXL's ``size`` and ``crop`` conditions (:class:`MicroConditioning`).
    """

    def __init__(self, in_channels: int = 1, size: int = 28, patch: int = 2, dim: int = 64, depth: int = 4,
                 heads: int = 4, num_classes: int | None = 10, mlp_ratio: float = 4.0, micro: bool = False):
        super().__init__()
        self.in_channels, self.size = check_positive_int(in_channels, "in_channels"), check_positive_int(size, "size")
        self.patch = check_positive_int(patch, "patch")
        if size % patch:
            raise ValueError(f"expected the input size {size} divisible by the patch size {patch}")
        self.grid = size // patch
        self.num_classes = None if num_classes is None else check_positive_int(num_classes, "num_classes")
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.register_buffer("positions", positions_2d(self.grid, dim), persistent=False)
        self.time = nn.Sequential(SinusoidalTimeEmbedding(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = LabelEmbedding(num_classes, dim) if num_classes is not None else None
        self.micro = MicroConditioning(dim, max_size=size) if micro else None
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio=mlp_ratio, cond_dim=dim)
                                    for _ in range(check_positive_int(depth, "depth")))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final = nn.Linear(dim, in_channels * patch * patch)
        for layer in (self.final_ada[1], self.final):  # adaLN-Zero: the final layer starts at zero too
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def conditioning(self, t: Tensor, y: Tensor | None, batch: int, size: Tensor | None = None,
                     crop: Tensor | None = None) -> Tensor:
        c = self.time(t)
        if self.label is not None:
            c = c + self.label(y, batch)
        elif y is not None:
            raise ValueError("this DiT is unconditional (num_classes=None); got labels y")
        if self.micro is not None:
            if size is None or crop is None:
                raise ValueError("this DiT is micro-conditioned: expected size (B,) and crop (B, 2)")
            c = c + self.micro(size, crop, batch)
        elif size is not None or crop is not None:
            raise ValueError("this DiT takes no size or crop conditions (micro=False)")
        return c

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, size: Tensor | None = None,
                crop: Tensor | None = None) -> Tensor:
        check_batch(x, ndim=4)
        want = (self.in_channels, self.size, self.size)
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"expected x of shape (B, {', '.join(map(str, want))}); got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape ({x.shape[0]},); got {tuple(t.shape)}")
        c = self.conditioning(t.to(x.dtype), y, x.shape[0], size, crop).to(x.dtype)
        h = self.embed(patchify(x, self.patch)) + self.positions.to(x.dtype)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c)[:, None, :].chunk(2, dim=-1)
        out = self.final(self.final_norm(h) * (1 + scale) + shift)
        return unpatchify(out, self.patch, want)


def forward_gflops(model: nn.Module, *args, **kwargs) -> float:
    """GFLOPs of one forward pass ``model(*args, **kwargs)`` (``torch.utils.flop_counter``; a
    multiply-add is 2 operations). Divide by the batch size for a per-sample figure."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops() / 1e9


def degrade(images: Tensor, *, small_share: float = 0.5, crop_share: float = 0.5, min_size: int = 8,
            max_crop: int = 6, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SDXL's two training-data artefacts at MNIST scale, with the conditions that record them.

    A share ``small_share`` of the images is *low-resolution*: downscaled to an original size s drawn
    uniformly from [min_size, side - 1] (area averaging) and upscaled back with bilinear
    interpolation, so it is blurred; the others keep s = side. A share ``crop_share``, drawn
    independently, is *cropped*: the side x side window starting at (top, left), both drawn
    uniformly from [1, max_crop], of the image extended with background (-1) below and to the right,
    so the digit moves up and to the left and may lose its top or left edge; the others have crop
    (0, 0). Returns ``(images, size (N,), crop (N, 2))`` with sizes and offsets in pixels (float)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected square images (N, C, H, H); got {tuple(getattr(images, 'shape', ()))}")
    n, side = images.shape[0], images.shape[2]
    if not (0 <= small_share <= 1 and 0 <= crop_share <= 1):
        raise ValueError(f"expected shares in [0, 1]; got small_share={small_share}, crop_share={crop_share}")
    if not 1 <= min_size < side:
        raise ValueError(f"expected 1 <= min_size < {side}; got {min_size}")
    if not 1 <= max_crop < side:
        raise ValueError(f"expected 1 <= max_crop < {side}; got {max_crop}")
    out = images.clone()
    size = torch.full((n,), float(side))
    small = torch.rand(n, generator=generator) < small_share
    drawn = torch.randint(min_size, side, (n,), generator=generator)
    for s in drawn[small].unique().tolist():
        rows = small & (drawn == s)
        low = F.interpolate(images[rows], size=(s, s), mode="area")
        out[rows] = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
        size[rows] = float(s)
    crop = torch.zeros(n, 2)
    cropped = torch.rand(n, generator=generator) < crop_share
    offsets = torch.randint(1, max_crop + 1, (n, 2), generator=generator)
    crop[cropped] = offsets[cropped].float()
    padded = F.pad(out, (0, max_crop, 0, max_crop), value=-1.0)
    top, left = crop[:, 0].long(), crop[:, 1].long()
    rows = (top[:, None] + torch.arange(side))[:, :, None]  # (N, H, 1)
    cols = (left[:, None] + torch.arange(side))[:, None, :]  # (N, 1, W)
    out = padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    return out.contiguous(), size, crop
