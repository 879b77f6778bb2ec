"""Chapter 11's perceptual distance: LPIPS (Zhang et al. 2018) at MNIST scale, the 2AFC
judgements it is calibrated and scored on, and the two classical baselines (pixel L2 and SSIM).

LPIPS between images a and b, from a network's feature maps f_l (C_l x H_l x W_l) at layers l:

    d(a, b) = sum_l mean_{h,w} sum_c w_lc (f^_l(a)_chw - f^_l(b)_chw)^2,   w_lc >= 0,

where f^ is f unit-normalised over channels at every position (so each layer counts by the
direction of its feature vectors, not their size). With all w = 1 it is the "raw" distance;
calibrating ("lin") learns the weights on 2AFC judgements: for a triplet (reference, x0, x1) a judge
says which of x0, x1 is closer to the reference. Since d is linear in w, the calibration is a
logistic regression with non-negative coefficients on the per-channel distance differences
(:func:`calibrate`). :func:`multiscale` reads the network on the image and on its 2 x 2 block
averages, which doubles every receptive field (a small network sees a few pixels only).

No human judgements of MNIST exist offline, so a judge stands in for the human
(:func:`chamfer_distance`): the symmetric chamfer distance between the two images' ink, the
average distance in pixels from each ink pixel of one image to the nearest ink pixel of the other.
It is a classical measure of shape similarity for line drawings that behaves as a reader of digits
does where pixel L2 does not: a stroke moved by one pixel costs one pixel (L2 counts every pixel
of it as wrong twice), a broken or added stroke costs in proportion to how far it is from the
rest, and grey levels cost nothing (the ink is what lies above the midpoint of each image's own
darkest and brightest value). It shares nothing with the networks whose features are scored. Triplets are two random distortions of one held-out digit
(:func:`distort`: shifts, rotations, elastic warps, blur, noise, thicker or thinner strokes,
erased patches, lower contrast), kept when the judge's two distances differ by at least a margin
(the cases a person would not hesitate on; BAPPS instead averages several people).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .utils import check_batch, check_positive_int

__all__ = ["PerceptualDistance", "normalize_channels", "ink", "layer_distances", "multiscale", "ssim_distance",
           "pixel_l2",
           "DISTORTIONS", "distort", "random_distortions", "chamfer_distance", "Triplets", "make_triplets",
           "two_afc_agreement", "calibrate"]


def normalize_channels(f: Tensor, eps: float = 1e-10) -> Tensor:
    """``(B, C, H, W)`` features divided by their Euclidean norm over channels at every position."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)


def layer_distances(fa: Sequence[Tensor], fb: Sequence[Tensor]) -> list[Tensor]:
    """Per layer, the ``(B, C_l)`` spatial means of the squared differences of the unit-normalised
    features: the quantities the weights multiply (d = sum_l sum_c w_lc * out[l][:, c])."""
    if len(fa) != len(fb):
        raise ValueError(f"expected two lists of one length; got {len(fa)} and {len(fb)} feature maps")
    out = []
    for a, b in zip(fa, fb, strict=True):
        if a.shape != b.shape or a.ndim != 4:
            raise ValueError(f"expected feature maps of one shape (B, C, H, W); got {tuple(a.shape)} and {tuple(b.shape)}")
        out.append((normalize_channels(a) - normalize_channels(b)).pow(2).mean((-2, -1)))
    return out


class PerceptualDistance(nn.Module):
    """LPIPS on the feature maps ``features(x) -> [f_1, ..., f_L]`` of a frozen network.

    Args:
        features: a callable returning the list of ``(B, C_l, H_l, W_l)`` maps of an image batch
            (e.g. :meth:`course.classifiers.ConvClassifier.feature_maps`); it is not trained here.
        channels: C_l of every layer.
        weights: non-negative per-channel weights, one ``(C_l,)`` tensor per layer; default all 1
            (the raw distance). Negative weights raise ``ValueError``.
    """

    def __init__(self, features: Callable[[Tensor], list[Tensor]], channels: Sequence[int],
                 weights: Sequence[Tensor] | None = None):
        super().__init__()
        self.features = features
        self.channels = [check_positive_int(c, "channels") for c in channels]
        weights = [torch.ones(c) for c in self.channels] if weights is None else list(weights)
        if len(weights) != len(self.channels) or any(w.shape != (c,) for w, c in zip(weights, self.channels,
                                                                                      strict=True)):
            raise ValueError(f"expected one weight vector per layer with shapes {[(c,) for c in self.channels]}; "
                             f"got {[tuple(w.shape) for w in weights]}")
        self.weights = nn.ParameterList(nn.Parameter(w.detach().clone().float()) for w in weights)
        self.check_weights()

    def check_weights(self) -> None:
        for i, w in enumerate(self.weights):
            if bool((w < 0).any()):
                raise ValueError(f"expected non-negative weights; layer {i} has {int((w < 0).sum())} negative")

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        maps = self.features(x)
        if len(maps) != len(self.channels) or any(m.shape[1] != c for m, c in zip(maps, self.channels, strict=True)):
            raise ValueError(f"the feature network returned maps with {[m.shape[1] for m in maps]} channels; "
                             f"expected {self.channels}")
        return maps

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """``(B,)`` distances between the image batches ``a`` and ``b`` (differentiable in both)."""
        check_batch(a, ndim=4, name="a")
        if a.shape != b.shape:
            raise ValueError(f"expected a and b of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
        self.check_weights()
        per_layer = layer_distances(self.feature_maps(a), self.feature_maps(b))
        return sum((d * w.to(d.dtype)).sum(1) for d, w in zip(per_layer, self.weights, strict=True))


def multiscale(features: Callable[[Tensor], list[Tensor]], factors: Sequence[int] = (1, 2)
               ) -> Callable[[Tensor], list[Tensor]]:
    """The feature network read at several scales: ``features`` applied to ``x`` averaged over
    ``k x k`` blocks for every ``k`` in ``factors`` (1 = the image itself), the maps of all scales
    in one list (so a :class:`PerceptualDistance` gets one weight per channel and scale).

    A convolution's features change only where its receptive field sees a change; on the image
    averaged over 2 x 2 blocks every receptive field covers twice the pixels, so displacements
    beyond the network's own field still register (the idea of multi-scale SSIM). The height and
    width must be divisible by every factor."""
    factors = [check_positive_int(k, "factors") for k in factors]
    if not factors or len(set(factors)) != len(factors):
        raise ValueError(f"expected distinct positive factors, at least one; got {factors}")

    def read(x: Tensor) -> list[Tensor]:
        check_batch(x, ndim=4)
        maps = []
        for k in factors:
            if x.shape[-2] % k or x.shape[-1] % k:
                raise ValueError(f"expected a height and width divisible by the factor {k}; got {tuple(x.shape[-2:])}")
            maps += features(F.avg_pool2d(x, k) if k > 1 else x)
        return maps
    return read


def pixel_l2(a: Tensor, b: Tensor) -> Tensor:
    """``(B,)`` mean squared pixel differences."""
    if a.shape != b.shape:
        raise ValueError(f"expected a and b of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a - b).pow(2).flatten(1).mean(1)


def _gaussian_window(size: int, sigma: float, dtype) -> Tensor:
    g = torch.exp(-((torch.arange(size, dtype=dtype) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_distance(a: Tensor, b: Tensor, *, size: int = 7, sigma: float = 1.5) -> Tensor:
    """``(B,)`` 1 - SSIM (Wang et al. 2004) of images in [-1, 1] (rescaled to [0, 1]), with a
    ``size`` x ``size`` Gaussian window, per channel, averaged over positions and channels."""
    check_batch(a, ndim=4, name="a")
    if a.shape != b.shape:
        raise ValueError(f"expected a and b of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = (a + 1) / 2, (b + 1) / 2
    c = a.shape[1]
    win = _gaussian_window(size, sigma, a.dtype).expand(c, 1, size, size)

    def blur(x):
        return F.conv2d(x, win, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return 1 - ssim.flatten(1).mean(1)


# ---- distortions ------------------------------------------------------------------------------------
def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # background -1 outside


def _shift(x, s, g):
    angle = torch.rand(x.shape[0], generator=g) * 2 * math.pi
    rows, cols = (s * torch.sin(angle)).round().long(), (s * torch.cos(angle)).round().long()
    # torch.roll wraps around; MNIST digits sit in the middle 20 x 20 of the frame, so nothing wraps for s <= 4
    return torch.stack([torch.roll(img, (int(r), int(c)), (-2, -1)) for img, r, c in zip(x, rows, cols, strict=True)])


def _rotate(x, s, g):
    angle = (torch.rand(x.shape[0], generator=g) * 2 - 1).sign() * s * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
    return _affine(x, theta)


def _elastic(x, s, g):
    b, _, h, w = x.shape
    field = torch.randn((b, 2, 4, 4), generator=g)
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=False) * (2 * s / h)
    base = F.affine_grid(torch.eye(2, 3).expand(b, 2, 3).to(x.dtype), list(x.shape), align_corners=False)
    grid = base + field.permute(0, 2, 3, 1).to(x.dtype)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def _blur(x, s, g):
    size = 2 * int(math.ceil(2 * s)) + 1
    win = _gaussian_window(size, s, x.dtype)
    return F.conv2d(F.pad(x, (size // 2,) * 4, value=-1.0), win)


def _noise(x, s, g):
    return (x + s * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(-1, 1)


def _thicken(x, s, g):
    k = 2 * int(s) + 1
    return F.max_pool2d(x, k, stride=1, padding=k // 2)


def _thin(x, s, g):
    k = 2 * int(s) + 1
    return -F.max_pool2d(-x, k, stride=1, padding=k // 2)


def _erase(x, s, g):
    out = x.clone()
    size = int(s)
    for i, img in enumerate(x):
        ink = (img[0] > 0).nonzero()
        if len(ink) == 0:
            continue
        r, c = ink[int(torch.randint(len(ink), (1,), generator=g))].tolist()
        r0, c0 = max(0, r - size // 2), max(0, c - size // 2)
        out[i, :, r0:r0 + size, c0:c0 + size] = -1.0
    return out


def _contrast(x, s, g):
    return -1 + (x + 1) * (1 - s)


# name -> (function(x, strength, generator), range of strengths drawn by random_distortions)
DISTORTIONS: dict[str, tuple[Callable, tuple[float, float]]] = {
    "shift": (_shift, (1.0, 3.0)),  # pixels
    "rotate": (_rotate, (5.0, 25.0)),  # degrees
    "elastic": (_elastic, (0.5, 2.5)),  # pixels of smooth displacement (standard deviation)
    "blur": (_blur, (0.5, 1.5)),  # Gaussian sigma in pixels
    "noise": (_noise, (0.1, 0.6)),  # standard deviation (images in [-1, 1])
    "thicken": (_thicken, (1.0, 1.99)),  # dilation radius (1 pixel)
    "thin": (_thin, (1.0, 1.99)),  # erosion radius (1 pixel)
    "erase": (_erase, (3.0, 9.0)),  # side of an erased square centred on an ink pixel
    "contrast": (_contrast, (0.2, 0.7)),  # share of the ink's contrast removed
}


def distort(x: Tensor, kind: str, strength: float, *, generator: torch.Generator | None = None) -> Tensor:
    """``(B, 1, 28, 28)`` images in [-1, 1] distorted by ``kind`` (a key of ``DISTORTIONS``) at
    ``strength`` (its units are in ``DISTORTIONS``)."""
    check_batch(x, ndim=4)
    if kind not in DISTORTIONS:
        raise ValueError(f"unknown distortion {kind!r}; expected one of {', '.join(DISTORTIONS)}")
    if strength < 0:
        raise ValueError(f"expected strength >= 0; got {strength}")
    return DISTORTIONS[kind][0](x, strength, generator)


def random_distortions(x: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, list[str]]:
    """Each image distorted by a kind drawn uniformly from ``DISTORTIONS`` at a strength drawn
    uniformly from that kind's range; returns the images and the kinds."""
    check_batch(x, ndim=4)
    names = list(DISTORTIONS)
    kinds = [names[int(i)] for i in torch.randint(len(names), (x.shape[0],), generator=generator)]
    out = torch.empty_like(x)
    for i, kind in enumerate(kinds):
        lo, hi = DISTORTIONS[kind][1]
        s = lo + (hi - lo) * float(torch.rand((), generator=generator))
        out[i:i + 1] = distort(x[i:i + 1], kind, s, generator=generator)
    return out, kinds


# ---- the judge ----------------------------------------------------------------------------------------
def _distance_to_ink(ink: Tensor) -> Tensor:
    """``(B, H*W)`` Euclidean distance of every pixel to the nearest True pixel of ``ink`` (B, H, W);
    the image diagonal where there is no ink."""
    b, h, w = ink.shape
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], 1).float()
    pair = torch.cdist(coords, coords)  # (HW, HW) pixel-centre distances
    out = []
    for part in ink.flatten(1).split(16):
        d = torch.where(part[:, None, :], pair[None], torch.inf).amin(-1)
        out.append(d.clamp(max=math.hypot(h, w)))
    return torch.cat(out)


def ink(images: Tensor) -> Tensor:
    """``(B, H, W)`` the pixels of single-channel images above the midpoint of each image's own
    darkest and brightest value (so a digit of lower contrast keeps its strokes); none in a flat image."""
    x = images[:, 0]
    lo, hi = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
    return (x > (lo + hi) / 2) & (hi - lo > 1e-6)


def chamfer_distance(a: Tensor, b: Tensor) -> Tensor:
    """``(B,)`` symmetric chamfer distance in pixels between the ink (:func:`ink`) of single-channel
    images: the mean distance from each ink pixel of ``a`` to the nearest ink pixel of ``b`` and from
    ``b`` to ``a``, averaged. 0 for identical ink; the image diagonal when one image has ink and the
    other none; 0 when neither has."""
    check_batch(a, ndim=4, name="a")
    if a.shape != b.shape or a.shape[1] != 1:
        raise ValueError(f"expected a and b of one shape (B, 1, H, W); got {tuple(a.shape)} and {tuple(b.shape)}")
    ink_a, ink_b = ink(a), ink(b)
    dt_a, dt_b = _distance_to_ink(ink_a), _distance_to_ink(ink_b)
    fa, fb = ink_a.flatten(1).double(), ink_b.flatten(1).double()

    def directed(mask, dt):
        n = mask.sum(1)
        return torch.where(n > 0, (mask * dt).sum(1) / n.clamp(min=1), 0.0)

    out = 0.5 * (directed(fa, dt_b) + directed(fb, dt_a))
    return out.to(a.dtype)


@dataclass(frozen=True)
class Triplets:
    """2AFC triplets: ``judge[i]`` is 1.0 when ``x1[i]`` is closer to ``ref[i]`` than ``x0[i]``."""

    ref: Tensor
    x0: Tensor
    x1: Tensor
    judge: Tensor
    kinds: tuple[tuple[str, str], ...]

    def __len__(self) -> int:
        return self.ref.shape[0]

    def split(self, n: int) -> tuple[Triplets, Triplets]:
        """The first ``n`` triplets and the rest."""
        first = Triplets(self.ref[:n], self.x0[:n], self.x1[:n], self.judge[:n], self.kinds[:n])
        rest = Triplets(self.ref[n:], self.x0[n:], self.x1[n:], self.judge[n:], self.kinds[n:])
        return first, rest


def make_triplets(images: Tensor, n: int, *, margin: float = 0.25, generator: torch.Generator | None = None,
                  judge: Callable[[Tensor, Tensor], Tensor] = chamfer_distance) -> Triplets:
    """``n`` triplets from ``images``: a reference drawn at random, two independent random
    distortions of it, judged by ``judge`` (smaller = closer); a triplet is kept when the judge's
    two distances differ by at least ``margin`` times the larger. Reproducible from ``generator``."""
    check_batch(images, ndim=4)
    check_positive_int(n, "n")
    if not 0 <= margin < 1:
        raise ValueError(f"expected 0 <= margin < 1; got {margin}")
    refs, x0s, x1s, judged, kinds = [], [], [], [], []
    kept = 0
    for _ in range(100):
        m = max(64, 2 * (n - kept))
        ref = images[torch.randint(images.shape[0], (m,), generator=generator)]
        x0, k0 = random_distortions(ref, generator=generator)
        x1, k1 = random_distortions(ref, generator=generator)
        d0, d1 = judge(ref, x0), judge(ref, x1)
        keep = (d0 - d1).abs() >= margin * torch.maximum(d0, d1).clamp(min=1e-12)
        refs.append(ref[keep])
        x0s.append(x0[keep])
        x1s.append(x1[keep])
        judged.append((d1 < d0)[keep].float())
        kinds += [(a, b) for a, b, k in zip(k0, k1, keep.tolist(), strict=True) if k]
        kept += int(keep.sum())
        if kept >= n:
            break
    else:
        raise ValueError(f"could not find {n} triplets with margin {margin}; lower the margin")
    return Triplets(torch.cat(refs)[:n], torch.cat(x0s)[:n], torch.cat(x1s)[:n], torch.cat(judged)[:n],
                    tuple(kinds[:n]))


@torch.no_grad()
def two_afc_agreement(distance: Callable[[Tensor, Tensor], Tensor], triplets: Triplets, *, batch: int = 500) -> float:
    """The share of triplets on which ``distance`` agrees with the judge (a tie counts one half)."""
    scores = []
    for i in range(0, len(triplets), batch):
        s = slice(i, i + batch)
        d0, d1 = distance(triplets.ref[s], triplets.x0[s]), distance(triplets.ref[s], triplets.x1[s])
        says_x1 = (d1 < d0).float() + 0.5 * (d1 == d0).float()
        scores.append(says_x1 * triplets.judge[s] + (1 - says_x1) * (1 - triplets.judge[s]))
    return float(torch.cat(scores).mean())


def calibrate(distance: PerceptualDistance, triplets: Triplets, *, steps: int = 3000, lr: float = 0.05,
              batch: int = 500) -> list[float]:
    """Learn ``distance``'s non-negative weights on ``triplets`` (in place): logistic regression of
    the judge on d(ref, x0) - d(ref, x1) (linear in the weights), Adam, weights clipped at 0 after
    every step as in LPIPS. The per-channel distances are computed once, so a step costs one small
    matrix product; the loss is convex, and the default 3 000 steps come close to its minimum on
    the course's triplets (300 stopped 1 to 2 points of held-out agreement short). Returns the losses."""
    check_positive_int(steps, "steps")
    with torch.no_grad():
        diffs = []
        for i in range(0, len(triplets), batch):
            s = slice(i, i + batch)
            fr = distance.feature_maps(triplets.ref[s])
            d0 = layer_distances(fr, distance.feature_maps(triplets.x0[s]))
            d1 = layer_distances(fr, distance.feature_maps(triplets.x1[s]))
            diffs.append([a - b for a, b in zip(d0, d1, strict=True)])
        per_layer = [torch.cat([d[layer] for d in diffs]) for layer in range(len(distance.channels))]
    opt = torch.optim.Adam(distance.weights.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        margin = sum((d * w).sum(1) for d, w in zip(per_layer, distance.weights, strict=True))  # d0 - d1
        loss = F.binary_cross_entropy_with_logits(margin, triplets.judge.to(margin.dtype))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for w in distance.weights:
                w.clamp_(min=0.0)
        losses.append(loss.item())
    return losses
