"""Chapter 10: inpainting, by diffusion and by PatchMatch.

**Diffusion inpainting by replacement** (RePaint, Lugmayr et al. 2022, for a flow model on the
linear path x_t = (1 - t) x_0 + t eps): run the sampler from t = 1 to 0 and, after every step to
time s, overwrite the known pixels with a fresh forward sample of the known image at s,
x_s[known] = (1 - s) x_0[known] + s eps. The unknown pixels are generated in a context that is
always consistent with the known ones at the current noise level; at s = 0 the known pixels are
the input exactly (tested bit for bit). ``resample`` > 1 is RePaint's harmonisation: after a step,
noise the whole image back to the previous time and redo the step, so the generated region can
adapt to the known one.

**PatchMatch** (Barnes et al. 2009): a nearest-neighbour field (NNF) maps every p x p patch of a
target image to its most similar patch of a source image (sum of squared differences). It starts
random and improves by **propagation** (a neighbour's match, shifted by one pixel, is often a good
match here too, because images are coherent) and **random search** (candidates drawn around the
current match in windows that halve in size). Here both run in parallel over all patches, one
propagation sweep checking the four neighbours at once (a Jacobi form of the paper's alternating
scan order), which vectorises in torch. :func:`patchmatch_inpaint` fills a hole the classic way
(Wexler et al. 2007): alternate the NNF from patches touching the hole to fully known patches with
a vote, each hole pixel the mean of what the overlapping matched patches put there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .ode import sample_flow_euler
from .utils import check_positive_int

__all__ = ["inpaint_replace", "inpaint_paste", "random_holes", "mask_condition", "inpaint_conditioned", "patchmatch", "patchmatch_inpaint", "check_known_mask", "hole_mask",
           "HOLES"]

# the holes of the chapter's measurements: (rows, columns) slices of a 28 x 28 digit
HOLES = {"centre": (slice(8, 20), slice(8, 20)), "bottom half": (slice(14, 28), slice(0, 28)),
         "right half": (slice(0, 28), slice(14, 28))}


def hole_mask(n: int, hole: str, side: int = 28) -> Tensor:
    """The ``known`` mask ``(n, 1, side, side)`` (True: given) with the hole ``hole`` (a key of
    ``HOLES``, defined on 28 x 28 and scaled to ``side``) unknown."""
    if hole not in HOLES:
        raise ValueError(f"unknown hole {hole!r}; expected one of {', '.join(HOLES)}")
    known = torch.ones(check_positive_int(n, "n"), 1, side, side, dtype=torch.bool)
    rows, cols = (slice(s.start * side // 28, s.stop * side // 28) for s in HOLES[hole])
    known[:, :, rows, cols] = False
    return known


def check_known_mask(x: Tensor, known: Tensor) -> Tensor:
    """``known`` as a boolean mask of ``x``'s shape (True: the pixel is given)."""
    if not isinstance(known, Tensor) or known.dtype != torch.bool or known.shape != x.shape:
        got = f"{tuple(known.shape)} {known.dtype}" if isinstance(known, Tensor) else type(known).__name__
        raise ValueError(f"expected a boolean mask of the images' shape {tuple(x.shape)} (True where known); got {got}")
    return known


@torch.no_grad()
def inpaint_replace(velocity: Callable, x_known: Tensor, known: Tensor, *, nfe: int = 20, resample: int = 1,
                    jump: int = 1, generator: torch.Generator | None = None, **cond) -> Tensor:
    """Fill the pixels where ``known`` is False with ``velocity(x, t, **cond)``'s flow (Euler,
    ``nfe`` uniform steps), replacing the known pixels by their forward sample after every step.

    ``resample`` > 1 repeats every stretch of ``jump`` steps that many times, noising the whole image
    back to the stretch's start between repeats (RePaint's schedule: jump length j, r resamplings;
    the paper uses j = 10, r = 10). ``jump=1`` resamples every single step. Either way the sampler
    makes ``nfe * resample`` network calls."""
    known = check_known_mask(x_known, known)
    nfe, resample = check_positive_int(nfe, "nfe"), check_positive_int(resample, "resample")
    jump = check_positive_int(jump, "jump")
    ts = torch.linspace(1.0, 0.0, nfe + 1, dtype=x_known.dtype)
    x = torch.randn(x_known.shape, generator=generator, dtype=x_known.dtype)
    x = torch.where(known, ts[0] * x + (1 - ts[0]) * x_known, x)
    for start in range(0, nfe, jump):
        end = min(start + jump, nfe)
        for u in range(resample):
            for i in range(start, end):
                t, s = ts[i], ts[i + 1]
                x = x + (s - t) * velocity(x, torch.full((x.shape[0],), float(t), dtype=x.dtype), **cond)
                eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
                x = torch.where(known, (1 - s) * x_known + s * eps, x)
            if u < resample - 1:  # back to t = ts[start]: x_t = a x_s + sqrt(t^2 - a^2 s^2) eps, a = (1 - t) / (1 - s)
                t, s = ts[start], ts[end]
                a = (1 - t) / (1 - s)
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
                x = a * x + (t**2 - a**2 * s**2).clamp_min(0).sqrt() * noise
    return torch.where(known, x_known, x)  # at s = 0 the forward sample is x_known itself; exact by construction


def random_holes(n: int, *, side: int = 28, generator: torch.Generator | None = None) -> Tensor:
    """Training masks ``(n, 1, side, side)`` (True: known) for a mask-conditioned model: a quarter of
    them one of ``HOLES`` each, the rest a random rectangle with sides in [side/4, 3 side/5] anywhere."""
    n = check_positive_int(n, "n")
    known = torch.ones(n, 1, side, side, dtype=torch.bool)
    kind = torch.randint(0, 4 * len(HOLES), (n,), generator=generator)
    size = torch.randint(side // 4, 3 * side // 5 + 1, (n, 2), generator=generator)
    corner = (torch.rand(n, 2, generator=generator) * (side - size + 1)).long()
    names = list(HOLES)
    for i in range(n):
        if kind[i] < len(HOLES):
            known[i] = hole_mask(1, names[int(kind[i])], side)[0]
        else:
            (r, c), (h, w) = corner[i].tolist(), size[i].tolist()
            known[i, :, r:r + h, c:c + w] = False
    return known


def mask_condition(x_known: Tensor, known: Tensor) -> Tensor:
    """The conditioning image of a mask-conditioned model: the known pixels (0 in the hole) and the
    mask (1 known, -1 hole), ``(N, 2 C, H, W)`` (Stable Diffusion's inpainting model feeds the same)."""
    known = check_known_mask(x_known, known)
    return torch.cat([torch.where(known, x_known, 0.0), known.to(x_known.dtype) * 2 - 1], dim=1)


@torch.no_grad()
def inpaint_conditioned(model: Callable, x_known: Tensor, known: Tensor, *, nfe: int = 20,
                        generator: torch.Generator | None = None) -> Tensor:
    """Fill the hole with a model trained for it, ``model(x, t, low_res=mask_condition(...))``
    (Euler, ``nfe`` steps); the known pixels are pasted back at the end."""
    cond = mask_condition(x_known, known)
    ts = torch.linspace(1.0, 0.0, check_positive_int(nfe, "nfe") + 1, dtype=x_known.dtype)
    x = torch.randn(x_known.shape, generator=generator, dtype=x_known.dtype)
    return torch.where(known, x_known, sample_flow_euler(model, x, ts, low_res=cond))


@torch.no_grad()
def inpaint_paste(velocity: Callable, x_known: Tensor, known: Tensor, *, nfe: int = 20,
                  generator: torch.Generator | None = None, **cond) -> Tensor:
    """The naive baseline: sample freely (Euler, ``nfe`` steps) and paste the known pixels into the
    result at the end, so the generated part never sees them."""
    known = check_known_mask(x_known, known)
    ts = torch.linspace(1.0, 0.0, check_positive_int(nfe, "nfe") + 1, dtype=x_known.dtype)
    x = torch.randn(x_known.shape, generator=generator, dtype=x_known.dtype)
    return torch.where(known, x_known, sample_flow_euler(velocity, x, ts, **cond))


def _patches(img: Tensor, p: int) -> Tensor:
    """All p x p patches of ``(C, H, W)`` as rows ``((H-p+1)(W-p+1), C p^2)``, in raster order of their top-left."""
    return F.unfold(img[None], p)[0].T


def patchmatch(target: Tensor, source: Tensor, patch: int = 5, *, iters: int = 5, valid: Tensor | None = None,
               generator: torch.Generator | None = None, init: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The nearest-neighbour field from ``target`` to ``source`` (both ``(C, H, W)``): for every
    p x p target patch (by its top-left, raster order) the index of a source patch and its sum of
    squared differences. ``valid`` (source patches, boolean) restricts the matches; ``init`` is a
    field to start from (default: random). Returns ``(index (P,), distance (P,))``."""
    p, iters = check_positive_int(patch, "patch"), check_positive_int(iters, "iters", allow_zero=True)
    if target.ndim != 3 or source.ndim != 3 or target.shape[0] != source.shape[0]:
        raise ValueError(f"expected target and source images (C, H, W) with the same channels; got "
                         f"{tuple(target.shape)} and {tuple(source.shape)}")
    th, tw = target.shape[1] - p + 1, target.shape[2] - p + 1
    sh, sw = source.shape[1] - p + 1, source.shape[2] - p + 1
    if min(th, tw, sh, sw) < 1:
        raise ValueError(f"expected images of at least {p} x {p} pixels for {p} x {p} patches")
    tp, sp = _patches(target, p), _patches(source, p)
    big = torch.finfo(tp.dtype).max
    ok = torch.ones(sh * sw, dtype=torch.bool) if valid is None else valid.reshape(-1)
    if ok.shape != (sh * sw,) or not bool(ok.any()):
        raise ValueError(f"expected a boolean valid mask of {sh * sw} source patches with at least one True")
    allowed = ok.nonzero().squeeze(1)

    def cost(idx: Tensor) -> Tensor:
        return torch.where(ok[idx], (tp - sp[idx]).pow(2).sum(1), big)

    best = allowed[torch.randint(len(allowed), (th * tw,), generator=generator)] if init is None else init.clone()
    dist = cost(best)
    rows, cols = torch.arange(th * tw) // tw, torch.arange(th * tw) % tw
    for _ in range(iters):
        # propagation: each neighbour's match, shifted back by the offset between the two target patches
        grid = best.reshape(th, tw)
        for dr, dc in ((0, -1), (-1, 0), (0, 1), (1, 0)):
            nr, nc = (rows + dr).clamp(0, th - 1), (cols + dc).clamp(0, tw - 1)
            cand = grid[nr, nc]
            cr, cc = (cand // sw - (nr - rows)).clamp(0, sh - 1), (cand % sw - (nc - cols)).clamp(0, sw - 1)
            cand = cr * sw + cc
            d = cost(cand)
            better = d < dist
            best, dist = torch.where(better, cand, best), torch.where(better, d, dist)
        # random search in windows around the current match, halving from the whole image
        radius = max(sh, sw)
        while radius >= 1:
            off = torch.randint(-radius, radius + 1, (2, th * tw), generator=generator)
            cr, cc = (best // sw + off[0]).clamp(0, sh - 1), (best % sw + off[1]).clamp(0, sw - 1)
            cand = cr * sw + cc
            d = cost(cand)
            better = d < dist
            best, dist = torch.where(better, cand, best), torch.where(better, d, dist)
            radius //= 2
    return best, dist


@torch.no_grad()
def patchmatch_inpaint(image: Tensor, known: Tensor, *, patch: int = 5, em_iters: int = 6, nnf_iters: int = 4,
                       generator: torch.Generator | None = None) -> Tensor:
    """Fill the hole (``known`` False) of ``image`` ``(C, H, W)`` from its own known patches:
    alternate PatchMatch (target patches compared on their known and currently filled pixels, sources
    fully known) with a vote. The known pixels are returned unchanged."""
    if image.ndim != 3:
        raise ValueError(f"expected one image (C, H, W); got {tuple(image.shape)}")
    known = check_known_mask(image, known)
    p = check_positive_int(patch, "patch")
    c, h, w = image.shape
    sh, sw = h - p + 1, w - p + 1
    valid = F.unfold((~known).any(0, keepdim=True)[None].float(), p)[0].sum(0) == 0  # fully known patches
    if not bool(valid.any()):
        raise ValueError(f"the hole leaves no fully known {p} x {p} patch to copy from")
    fill = image.clone()
    fill[~known] = image[known].mean()
    counts = F.fold(torch.ones(1, c * p * p, sh * sw, dtype=image.dtype), (h, w), p)[0]
    nnf = None
    for _ in range(check_positive_int(em_iters, "em_iters")):
        nnf, _ = patchmatch(fill, fill, p, iters=nnf_iters, valid=valid, generator=generator, init=nnf)
        votes = F.fold(_patches(fill, p)[nnf].T[None], (h, w), p)[0] / counts  # mean of the matched patches' pixels
        fill = torch.where(known, image, votes)
    return fill
