"""Checks for chapter 10 (scaling and control: DiT, ControlNet, inpainting).

Exercise 10.1  ``adaln_zero_branch(x, branch, cond, weight, bias) -> (B, N, D)``: one adaLN-Zero residual branch
Exercise 10.2  ``patchify(x, p)`` and ``unpatchify(tokens, p, shape)``: images to patch tokens and back
Exercise 10.3  ``propagate(nnf, dist, cost, source_rows, source_cols)``: one PatchMatch propagation sweep from the left and upper neighbours

Every check draws fresh inputs from ``seed``. The course's own ``course.transformer``, ``course.dit``
and ``course.inpainting`` are not answers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .ch01 import _generator
from .ch07 import _not_the_library
from .verdict import (
    CheckResult,
    Mismatch,
    call_student,
    compare,
    matches,
    run_check,
    student_dtype,
    tolerances_for,
)


# ---- 10.1 adaLN-Zero -------------------------------------------------------------------------------
def _branch(gen: torch.Generator, d: int) -> Callable:
    w = 0.5 * torch.randn(d, d, generator=gen, dtype=torch.float64)

    def branch(h: Tensor) -> Tensor:
        if h.shape[-1] != d:
            raise ValueError(f"branch expects tokens of size {d}; got {tuple(h.shape)}")
        return torch.tanh(h.to(w.dtype) @ w).to(h.dtype)
    return branch


def _adaln(x, branch, cond, weight, bias, *, form: str = "right") -> Tensor:
    c = cond if form == "no-silu" else F.silu(cond)
    mod = c @ weight.T + bias  # (B, 3D)
    shift, scale, gate = mod.chunk(3, dim=-1)
    if form == "order":
        scale, shift = shift, scale
    h = F.layer_norm(x, x.shape[-1:], eps=1e-6)
    if form == "no-norm":
        h = x
    inner = h * (scale if form == "raw-scale" else 1 + scale)[:, None, :] + shift[:, None, :]
    out = branch(inner)
    if form == "no-gate":
        return x + out
    if form == "no-residual":
        return gate[:, None, :] * out
    return x + gate[:, None, :] * out


def check_adaln_zero_branch(adaln_zero_branch: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 10.1: (shift, scale, gate) = SiLU(c) W^T + b; x + gate * branch(LN(x)(1 + scale) + shift)."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(adaln_zero_branch, "adaln_zero_branch")
        for b, n, d, c in ((3, 5, 4, 6), (2, 7, 8, 3), (4, 2, 6, 6)):
            x = torch.randn(b, n, d, generator=gen, dtype=torch.float64) * 2 + 0.5
            cond = torch.randn(b, c, generator=gen, dtype=torch.float64)
            branch = _branch(gen, d)
            where = f"for {b} sequences of {n} tokens of size {d} and conditions of size {c}"
            zero_w, zero_b = torch.zeros(3 * d, c, dtype=torch.float64), torch.zeros(3 * d, dtype=torch.float64)
            at_init = call_student(adaln_zero_branch, "adaln_zero_branch", x.clone(), branch, cond.clone(),
                                   zero_w.clone(), zero_b.clone(), where=where)
            if isinstance(at_init, Tensor) and at_init.shape == x.shape and not torch.allclose(
                    at_init.detach().double(), x, atol=1e-6):
                raise Mismatch(f"adaln_zero_branch {where}: with the modulation's weight and bias at zero the block "
                               "must return x unchanged (the gate is 0), and it does not")
            weight = 0.4 * torch.randn(3 * d, c, generator=gen, dtype=torch.float64)
            bias = 0.2 * torch.randn(3 * d, generator=gen, dtype=torch.float64)
            got = call_student(adaln_zero_branch, "adaln_zero_branch", x.clone(), branch, cond.clone(), weight.clone(),
                               bias.clone(), where=where)
            args = (x, branch, cond, weight, bias)
            compare("adaln_zero_branch", got, _adaln(*args), where=where, mistakes={
                "scales by scale itself; adaLN scales by (1 + scale), so that a zero modulation leaves the "
                "normalised tokens as they are": _adaln(*args, form="raw-scale"),
                "leaves out the gate: the branch's output is multiplied by the gate before it is added":
                    _adaln(*args, form="no-gate"),
                "returns the gated branch without the residual x": _adaln(*args, form="no-residual"),
                "reads the chunks in another order: the modulation is (shift, scale, gate), in that order":
                    _adaln(*args, form="order"),
                "does not normalise x before modulating it (layer norm over the last axis, no affine parameters)":
                    _adaln(*args, form="no-norm"),
                "feeds the condition to the linear map directly; DiT applies SiLU to it first":
                    _adaln(*args, form="no-silu"),
            })
        return ("adaln_zero_branch normalises, modulates by (1 + scale) and shift, gates the branch and adds it to x; "
                "with the modulation at zero it is the identity.")

    return run_check("10.1", "one adaLN-Zero residual branch", body)


# ---- 10.2 patchify and unpatchify -------------------------------------------------------------------
def _patchify(x: Tensor, p: int, *, order: str = "right") -> Tensor:
    b, c, h, w = x.shape
    if order == "channel-last":
        y = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    elif order == "column-major":
        y = x.reshape(b, c, h // p, p, w // p, p).permute(0, 4, 2, 1, 3, 5)
    elif order == "transposed-patch":
        y = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 5, 3)
    else:
        y = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return y.reshape(b, (h // p) * (w // p), c * p * p)


def check_patchify(patchify: Callable, unpatchify: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 10.2: raster order of patches, each flattened channel-first; unpatchify inverts it."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(patchify, "patchify")
        _not_the_library(unpatchify, "unpatchify")
        for b, c, h, w, p in ((2, 1, 8, 8, 2), (3, 3, 12, 8, 4), (1, 4, 6, 9, 3), (2, 2, 5, 5, 1)):
            x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
            where = f"for images of shape {(b, c, h, w)} and {p} x {p} patches"
            got = call_student(patchify, "patchify", x.clone(), p, where=where)
            want = _patchify(x, p)
            compare("patchify", got, want, where=where, mistakes={
                "puts the channel last inside each patch; flatten each patch channel-first (all of channel 0's "
                "p x p pixels, then channel 1's, ...)": _patchify(x, p, order="channel-last"),
                "orders the patches column by column; the tokens go row by row (raster order)":
                    _patchify(x, p, order="column-major"),
                "flattens each patch column by column; flatten each patch's rows in turn":
                    _patchify(x, p, order="transposed-patch"),
            })
            back = call_student(unpatchify, "unpatchify", want.clone(), p, (c, h, w), where=where)
            compare("unpatchify", back, x, where=where + " (unpatchify of the right tokens)")
        return "patchify cuts images into raster-ordered, channel-first patch tokens and unpatchify puts them back."

    return run_check("10.2", "patchify and unpatchify", body)


# ---- 10.3 one PatchMatch propagation sweep ------------------------------------------------------------
def _propagate(nnf: Tensor, dist: Tensor, cost: Callable, sh: int, sw: int, *, shift: str = "right",
               keep: bool = True) -> tuple[Tensor, Tensor]:
    best, d = nnf.clone(), dist.clone()
    th, tw = dist.shape
    rows, cols = torch.meshgrid(torch.arange(th), torch.arange(tw), indexing="ij")
    for dr, dc in ((0, -1), (-1, 0)):  # the left and the upper neighbour
        nr, nc = (rows + dr).clamp(min=0), (cols + dc).clamp(min=0)
        cand = nnf[nr, nc].clone()
        if shift == "right":
            cand[..., 0] -= dr
            cand[..., 1] -= dc
        elif shift == "wrong":
            cand[..., 0] += dr
            cand[..., 1] += dc
        cand[..., 0] = cand[..., 0].clamp(0, sh - 1)
        cand[..., 1] = cand[..., 1].clamp(0, sw - 1)
        c = cost(cand)
        better = c < d if keep else torch.ones_like(c, dtype=torch.bool)
        best = torch.where(better[..., None], cand, best)
        d = torch.where(better, c, d)
    return best, d


def _make_cost(tpat: Tensor, spat: Tensor) -> Callable:
    """The distances of a field of candidate source positions (T_h, T_w, 2): sums of squared
    differences between each target patch and the source patch at its candidate."""
    th, tw = tpat.shape[:2]
    sh, sw = spat.shape[:2]

    def cost(pos: Tensor) -> Tensor:
        if not isinstance(pos, Tensor) or pos.shape != (th, tw, 2) or pos.dtype != torch.long:
            raise ValueError(f"cost expects int64 source positions of shape ({th}, {tw}, 2); got "
                             f"{tuple(getattr(pos, 'shape', ()))} {getattr(pos, 'dtype', '')}")
        if int(pos[..., 0].min()) < 0 or int(pos[..., 0].max()) >= sh or int(pos[..., 1].min()) < 0 \
                or int(pos[..., 1].max()) >= sw:
            raise ValueError(f"cost got a source position outside 0..{sh - 1} x 0..{sw - 1}: clip the "
                             "candidates to the source")
        return (tpat - spat[pos[..., 0], pos[..., 1]]).pow(2).sum((-1, -2))
    return cost


def check_propagate(propagate: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 10.3: each patch tries its left and upper neighbours' matches moved by one pixel
    (right and down), clipped to the source, and keeps whatever is better."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(propagate, "propagate")
        for th, tw, sh, sw, p in ((6, 7, 9, 8, 3), (4, 4, 5, 6, 2), (8, 5, 8, 5, 3)):
            target = torch.rand(th + p - 1, tw + p - 1, generator=gen, dtype=torch.float64)
            source = torch.rand(sh + p - 1, sw + p - 1, generator=gen, dtype=torch.float64)
            k = min(p + 2, target.shape[0] - 1, target.shape[1] - 2, source.shape[0] - 2, source.shape[1] - 1)
            source[2:2 + k, 1:1 + k] = target[1:1 + k, 2:2 + k]  # a copied region: some exact matches
            tpat = target.unfold(0, p, 1).unfold(1, p, 1)  # (th, tw, p, p)
            spat = source.unfold(0, p, 1).unfold(1, p, 1)  # (sh, sw, p, p)

            cost = _make_cost(tpat, spat)

            nnf = torch.stack([torch.randint(sh, (th, tw), generator=gen), torch.randint(sw, (th, tw), generator=gen)],
                              dim=-1)
            nnf[1, 2] = torch.tensor([2, 1])  # the start of the copied region is found: it must spread
            dist = cost(nnf)
            where = f"for a {th} x {tw} field into a {sh} x {sw} source ({p} x {p} patches)"
            got = call_student(propagate, "propagate", nnf.clone(), dist.clone(), cost, sh, sw, where=where)
            if not isinstance(got, tuple) or len(got) != 2:
                raise Mismatch(f"propagate returned {type(got).__name__} {where}; expected (nnf, dist)")
            g_nnf, g_dist = got
            want_nnf, want_dist = _propagate(nnf, dist, cost, sh, sw)
            if not isinstance(g_nnf, Tensor) or g_nnf.shape != nnf.shape or g_nnf.dtype != torch.long:
                raise Mismatch(f"propagate's nnf {where} is {tuple(getattr(g_nnf, 'shape', ()))} "
                               f"{getattr(g_nnf, 'dtype', type(g_nnf).__name__)}; expected int64 {tuple(nnf.shape)}")
            compare("propagate's dist", g_dist, want_dist, where=where, mistakes={
                "copies the neighbours' matches without moving them: the left neighbour's match, one pixel to the "
                "right, is the candidate (and the upper one's, one pixel down)":
                    _propagate(nnf, dist, cost, sh, sw, shift="none")[1],
                "moves the neighbours' matches the wrong way: left neighbour -> one pixel right, upper -> one down":
                    _propagate(nnf, dist, cost, sh, sw, shift="wrong")[1],
                "takes the candidates even where they are worse; keep whichever of the current match and the "
                "candidate has the smaller distance": _propagate(nnf, dist, cost, sh, sw, keep=False)[1],
            })
            rtol, atol = tolerances_for(student_dtype("propagate's dist", g_dist, where), dist, 1e-12, 1e-12)
            if bool((g_dist.detach().double() > dist * (1 + rtol) + atol).any()):
                raise Mismatch(f"propagate {where} made some distances worse; it may only keep or improve them")
            if not matches(g_dist, cost(g_nnf), rtol=1e-9, atol=1e-9):
                raise Mismatch(f"propagate {where}: the returned distances are not the distances of the returned nnf")
        return ("propagate moves the left and upper neighbours' matches by one pixel, clips them to the source and "
                "keeps what improves: a copied region's match spreads.")

    return run_check("10.3", "one PatchMatch propagation sweep", body)
