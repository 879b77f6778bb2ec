"""Checks for chapter 09 (text-to-image: CLIP, cross-attention, guidance with the empty caption).

Exercise 9.1  ``clip_loss(image_features, text_features, logit_scale) -> scalar``: CLIP's symmetric InfoNCE
Exercise 9.2  ``cross_attention(queries, keys, values, key_mask) -> (B, N, d_v)``: image tokens reading a caption
Exercise 9.3  ``guided_velocity(model, z, t, context, context_mask, empty_context, empty_mask, w)``: CFG
              with the empty caption
Exercise 9.4  ``stroke_thickness(images) -> (N,)``: the thickness a caption's "bold" and "thin" refer to

Every check draws fresh inputs from ``seed``. The course's own ``course.clip``, ``course.transformer``,
``course.text_to_image`` and ``course.captions`` are not answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ch01 import _generator
from .ch07 import _not_the_library
from .verdict import CheckResult, Mismatch, call_student, compare, gradients, matches, run_check


# ---- 9.1 CLIP's loss -----------------------------------------------------------------------------
def _clip_loss(img: Tensor, txt: Tensor, s: Tensor, *, normalise: str = "both", direction: str = "both",
               scale: str = "exp", reduce: str = "mean") -> Tensor:
    if normalise in ("both", "image"):
        img = F.normalize(img, dim=1)
    if normalise in ("both", "text"):
        txt = F.normalize(txt, dim=1)
    factor = {"exp": s.exp(), "raw": s, "divide": 1 / s}[scale]
    logits = factor * img @ txt.T
    target = torch.arange(img.shape[0])
    red = "sum" if reduce == "sum" else "mean"
    rows, cols = F.cross_entropy(logits, target, reduction=red), F.cross_entropy(logits.T, target, reduction=red)
    return {"both": (rows + cols) / 2, "rows": rows, "cols": cols, "sum": rows + cols}[direction]


def check_clip_loss(clip_loss: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 9.1: normalise both, logits = exp(logit_scale) cosines, mean of the two cross-entropies."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(clip_loss, "clip_loss")
        cases = [(6, 4, "random"), (5, 8, "random"), (4, 3, "identical")]
        for b, e, kind in cases:
            img = torch.randn(b, e, generator=gen, dtype=torch.float64) * (1 + 2 * torch.rand(b, 1, generator=gen,
                                                                                              dtype=torch.float64))
            txt = img + 0.7 * torch.randn(b, e, generator=gen, dtype=torch.float64)
            if kind == "identical":  # every image and caption the same direction: the loss is log B
                img = torch.ones(b, e, dtype=torch.float64) * 3.0
                txt = torch.ones(b, e, dtype=torch.float64)
            s = torch.tensor(float(0.5 + 2 * torch.rand((), generator=gen)), dtype=torch.float64)
            leaves = [img.clone().requires_grad_(True), txt.clone().requires_grad_(True), s.clone().requires_grad_(True)]
            where = f"for {b} pairs of {e}-dimensional features and logit_scale {s.item():.3f}"
            if kind == "identical":
                where += " (all features the same direction: the answer is log B)"
            got = call_student(clip_loss, "clip_loss", *leaves, where=where)
            if not isinstance(got, Tensor) or got.numel() != 1:
                raise Mismatch(f"clip_loss returned {type(got).__name__} {tuple(getattr(got, 'shape', ()))} {where}; "
                               "expected a scalar tensor")
            args = (img, txt, s)
            expected = _clip_loss(*args)
            compare("clip_loss", got.reshape(()), expected.detach(), where=where, mistakes={
                "uses only the image -> text cross-entropy (rows of the logits); CLIP averages it with the text -> "
                "image one (columns)": _clip_loss(*args, direction="rows"),
                "uses only the text -> image cross-entropy (columns); CLIP averages it with the image -> text one":
                    _clip_loss(*args, direction="cols"),
                "adds the two cross-entropies; CLIP takes their mean": _clip_loss(*args, direction="sum"),
                "does not normalise the features: the logits are scaled cosines, so divide each row by its norm "
                "first": _clip_loss(*args, normalise="none"),
                "normalises only the image features; normalise the text features too":
                    _clip_loss(*args, normalise="image"),
                "normalises only the text features; normalise the image features too":
                    _clip_loss(*args, normalise="text"),
                "multiplies by logit_scale itself; it is the log of the factor: multiply the cosines by "
                "exp(logit_scale)": _clip_loss(*args, scale="raw"),
                "divides by logit_scale as a temperature; logit_scale is log(1 / temperature): multiply by "
                "exp(logit_scale)": _clip_loss(*args, scale="divide"),
                "sums the cross-entropies over the batch; take the mean over the B pairs":
                    _clip_loss(*args, reduce="sum"),
            })
            if not got.requires_grad:
                raise Mismatch(f"clip_loss {where} has no gradient path to the features and logit_scale")
            grads = gradients(got, leaves)
            refs = [x.clone().requires_grad_(True) for x in args]
            want = torch.autograd.grad(_clip_loss(*refs), refs)
            for name, g, w in zip(("image_features", "text_features", "logit_scale"), grads, want, strict=True):
                if g is None or not matches(g, w, rtol=1e-4, atol=1e-8, dtype=got.dtype):
                    raise Mismatch(f"clip_loss {where}: the value is right but its gradient with respect to {name} "
                                   "is not (is something detached, or computed outside torch?)")
        return ("clip_loss normalises both towers, scales the cosines by exp(logit_scale) and averages the image -> "
                "text and text -> image cross-entropies, with gradients to the features and the temperature.")

    return run_check("9.1", "CLIP's symmetric InfoNCE loss", body)


# ---- 9.2 cross-attention with a padding mask -----------------------------------------------------
def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, scale: str = "sqrt", use_mask: str = "keys",
            axis: int = -1) -> Tensor:
    d = q.shape[-1]
    factor = {"sqrt": 1 / math.sqrt(d), "none": 1.0, "d": 1 / d}[scale]
    scores = factor * q @ k.transpose(1, 2)  # (B, N, L)
    if use_mask == "keys":
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    elif use_mask == "inverted":
        scores = scores.masked_fill(mask[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=axis)
    if use_mask == "after":  # the padded weights zeroed after the softmax: the rest no longer sums to 1
        weights = weights * mask[:, None, :]
    return weights @ v


def check_cross_attention(cross_attention: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 9.2: softmax over the real keys of q k^T / sqrt(d), times v; padding changes nothing."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(cross_attention, "cross_attention")
        for b, n, length, d, dv in ((3, 5, 6, 4, 3), (2, 7, 4, 8, 8), (4, 3, 9, 2, 5)):
            q = torch.randn(b, n, d, generator=gen, dtype=torch.float64)
            k = torch.randn(b, length, d, generator=gen, dtype=torch.float64)
            v = torch.randn(b, length, dv, generator=gen, dtype=torch.float64)
            real = torch.randint(1, length, (b,), generator=gen)
            real[0] = length  # one caption without padding
            mask = torch.arange(length)[None, :] < real[:, None]
            where = f"for {b} batches of {n} queries reading {length} keys of size {d} (values of size {dv})"
            got = call_student(cross_attention, "cross_attention", q.clone(), k.clone(), v.clone(), mask.clone(),
                               where=where)
            args = (q, k, v, mask)
            if isinstance(got, Tensor) and got.shape == (b, n, length):
                raise Mismatch(f"cross_attention returned the attention weights (B, N, L) = {tuple(got.shape)} "
                               f"{where}; return the weighted values (B, N, d_v)")
            if isinstance(got, Tensor) and got.shape == (b, n, dv) and got.is_floating_point():
                bad = ~torch.isfinite(got.detach()).flatten(1).all(1)  # batches with NaN or inf
                if bad.any() and torch.equal(bad, mask.all(1)):
                    raise Mismatch(f"cross_attention {where} returns NaN exactly for the caption without padding: "
                                   "it attends to the padding instead of the real tokens (key_mask is True for real "
                                   "tokens), so that caption has no key left")
                if bad.any() and torch.equal(bad, ~mask.all(1)):
                    raise Mismatch(f"cross_attention {where} returns NaN exactly for the padded captions: the softmax "
                                   "runs over the queries, where a padded key's scores are all -inf; take the softmax "
                                   "over the keys (the last axis of q k^T)")
            compare("cross_attention", got, _attend(*args), where=where, mistakes={
                "does not scale the scores: divide q k^T by sqrt(d), the key size": _attend(*args, scale="none"),
                "divides the scores by d; the scale is 1 / sqrt(d)": _attend(*args, scale="d"),
                "ignores key_mask: padded caption tokens get attention weight (set their scores to -inf before "
                "the softmax)": _attend(*args, use_mask="none"),
                "attends to the padding instead of the real tokens: key_mask is True for real tokens":
                    _attend(*args, use_mask="inverted"),
                "zeroes the padded tokens' weights after the softmax, so the real weights no longer sum to 1; mask "
                "the scores with -inf before the softmax, not the weights after it": _attend(*args, use_mask="after"),
                "takes the softmax over the queries; each query's weights over the keys must sum to 1 (softmax "
                "over the last axis of q k^T)": _attend(*args, axis=1),
            })
            # padding is invisible: other keys and values at the padded positions change nothing
            junk_k, junk_v = k.clone(), v.clone()
            junk_k[~mask] = 50 * torch.randn(int((~mask).sum()), d, generator=gen, dtype=torch.float64)
            junk_v[~mask] = 50 * torch.randn(int((~mask).sum()), dv, generator=gen, dtype=torch.float64)
            again = call_student(cross_attention, "cross_attention", q.clone(), junk_k, junk_v, mask.clone(),
                                 where=where)
            if not matches(again, _attend(*args), rtol=1e-4, atol=1e-6, dtype=got.dtype):
                raise Mismatch(f"cross_attention {where}: other keys and values at the padded positions change the "
                               "output; padded tokens must get exactly zero weight (mask the scores before the "
                               "softmax, not the weights after it)")
        return ("cross_attention weights the values by the softmax of q k^T / sqrt(d) over the real tokens only; "
                "what sits at padded positions does not matter.")

    return run_check("9.2", "cross-attention from image tokens to a padded caption", body)


# ---- 9.3 guidance with the empty caption -----------------------------------------------------------
class _TextModel(nn.Module):
    """A planted ``model(z, t, context=..., context_mask=...)``: a velocity that depends on z, t and
    the masked mean of the context."""

    def __init__(self, gen: torch.Generator, channels: int, dim: int):
        super().__init__()
        self.mix = nn.Parameter(0.5 * torch.randn(dim, channels, generator=gen, dtype=torch.float64))
        self.calls = 0

    def forward(self, z: Tensor, t: Tensor, *, context: Tensor, context_mask: Tensor) -> Tensor:
        self.calls += 1
        if not isinstance(t, Tensor) or t.shape != (z.shape[0],):
            raise ValueError(f"model expects t of shape ({z.shape[0]},); got {tuple(getattr(t, 'shape', ()))}")
        if context.shape[0] != z.shape[0] or context_mask.shape != context.shape[:2]:
            raise ValueError(f"model expects a context with one row per sample ({z.shape[0]}) and a mask of shape "
                             f"(B, L); got context {tuple(context.shape)} and mask {tuple(context_mask.shape)} (expand "
                             "the empty caption's row to the batch)")
        dtype = z.dtype  # computes in float64, answers in the caller's precision
        z, t, context = z.to(self.mix.dtype), t.to(self.mix.dtype), context.to(self.mix.dtype)
        weight = context_mask.to(context.dtype)[..., None]
        pooled = (context * weight).sum(1) / weight.sum(1)
        out = torch.tanh(z) * (1 + t[:, None, None, None]) + (pooled @ self.mix)[:, :, None, None]
        return out.to(dtype)


def _guided(model, z, t, ctx, mask, e_ctx, e_mask, w, *, form: str = "right") -> Tensor:
    b = z.shape[0]
    cond = model(z, t, context=ctx, context_mask=mask)
    uncond = model(z, t, context=e_ctx.expand(b, *e_ctx.shape[1:]), context_mask=e_mask.expand(b, e_mask.shape[1]))
    return {"right": (1 + w) * cond - w * uncond, "w-form": w * cond + (1 - w) * uncond,
            "swapped": (1 + w) * uncond - w * cond, "cond": cond, "plus": cond + w * uncond}[form]


def check_guided_velocity(guided_velocity: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 9.3: (1 + w) v(z, t, caption) - w v(z, t, empty caption)."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(guided_velocity, "guided_velocity")
        for b, c, length, dim, w in ((4, 2, 5, 3, 2.0), (3, 1, 7, 6, 0.5), (2, 3, 4, 2, 0.0)):
            model = _TextModel(gen, c, dim)
            z = torch.randn(b, c, 3, 3, generator=gen, dtype=torch.float64)
            t = torch.rand(b, generator=gen, dtype=torch.float64)
            ctx = torch.randn(b, length, dim, generator=gen, dtype=torch.float64)
            mask = torch.arange(length)[None, :] < torch.randint(1, length + 1, (b, 1), generator=gen)
            e_ctx = torch.randn(1, length, dim, generator=gen, dtype=torch.float64)
            e_mask = torch.zeros(1, length, dtype=torch.bool)
            e_mask[0, 0] = True  # <bos> only
            where = f"for {b} latents of shape {tuple(z.shape[1:])}, captions of {length} tokens and w = {w:g}"
            got = call_student(guided_velocity, "guided_velocity", model, z.clone(), t.clone(), ctx.clone(),
                               mask.clone(), e_ctx.clone(), e_mask.clone(), w, where=where)
            args = (model, z, t, ctx, mask, e_ctx, e_mask, w)
            with torch.no_grad():
                expected = _guided(*args)
                mistakes = {
                    "uses w cond + (1 - w) uncond; the course's guidance is (1 + w) cond - w uncond (w = 0 is the "
                    "plain conditional model)": _guided(*args, form="w-form"),
                    "swaps the caption and the empty caption": _guided(*args, form="swapped"),
                    "adds w times the unconditional prediction; subtract it: (1 + w) cond - w uncond":
                        _guided(*args, form="plus"),
                }
                if w:
                    mistakes["returns the conditional velocity alone; guidance extrapolates away from the empty "
                             "caption's prediction"] = _guided(*args, form="cond")
            compare("guided_velocity", got, expected, where=where, mistakes=mistakes)
        return ("guided_velocity extrapolates from the empty caption's velocity to the caption's by (1 + w), with "
                "the empty caption expanded to the batch.")

    return run_check("9.3", "classifier-free guidance with the empty caption", body)


# ---- 9.4 stroke thickness --------------------------------------------------------------------------
def _thickness(x: Tensor, *, unit: bool = True, tv: str = "both", factor: float = 2.0, power: int = 1) -> Tensor:
    p = ((x + 1) / 2).clamp(0, 1) if unit else x
    p = p[:, 0]
    dv, dh = (p[:, 1:] - p[:, :-1]).abs() ** power, (p[:, :, 1:] - p[:, :, :-1]).abs() ** power
    total = {"both": dv.sum((1, 2)) + dh.sum((1, 2)), "rows": dh.sum((1, 2)), "cols": dv.sum((1, 2))}[tv]
    return factor * p.sum((1, 2)) / total


def check_stroke_thickness(stroke_thickness: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 9.4: 2 sum(p) / TV(p), p = (x + 1) / 2 the ink, TV over both directions."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(stroke_thickness, "stroke_thickness")
        n = 6
        x = -torch.ones(n, 1, 28, 28, dtype=torch.float64)
        sizes = []
        for i in range(n):  # a bar of random width and length, with soft grey edges on some
            w, length = int(torch.randint(1, 6, (), generator=gen)), int(torch.randint(8, 20, (), generator=gen))
            top, left = int(torch.randint(1, 28 - length, (), generator=gen)), int(torch.randint(1, 20, (), generator=gen))
            x[i, 0, top:top + length, left:left + w] = 1.0
            if i % 2:
                x[i, 0, top:top + length, left + w] = float(2 * torch.rand((), generator=gen) - 1)
            sizes.append((w, length))
        where = f"for {n} images (1, 28, 28) of bars of widths and lengths {sizes}"
        got = call_student(stroke_thickness, "stroke_thickness", x.clone(), where=where)
        compare("stroke_thickness", got, _thickness(x), where=where, mistakes={
            "works on x in [-1, 1] directly; the ink is p = (x + 1) / 2 in [0, 1] (background 0)":
                _thickness(x, unit=False),
            "counts the total variation along the rows only; add the differences between neighbouring rows too":
                _thickness(x, tv="rows"),
            "counts the total variation down the columns only; add the differences between neighbouring columns too":
                _thickness(x, tv="cols"),
            "leaves out the factor 2: a bar's outline is counted on both sides, TV = 2 (L + w)":
                _thickness(x, factor=1.0),
            "squares the differences; the total variation sums their absolute values": _thickness(x, power=2),
        })
        return "stroke_thickness gives 2 x ink / total variation: w L / (L + w) for a w x L bar, the stroke width w."

    return run_check("9.4", "the stroke thickness a caption's 'bold' refers to", body)
