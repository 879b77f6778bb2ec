"""Chapter 09's data: captions for MNIST digits written from the label and from attributes measured
on each image, so that what a caption asks for can be measured on a generated image too.

**Attributes** (:func:`digit_attributes`, images in [-1, 1], ink p = (x + 1) / 2 clamped to [0, 1]):

- ``thickness`` = 2 sum(p) / TV(p), TV the total variation sum |p(i+1, j) - p(i, j)| + |p(i, j+1) - p(i, j)|.
  For a binary bar of width w and length L it is 2 w L / (2 L + 2 w) = w L / (L + w), which tends to
  the stroke width w for a long stroke (tested on drawn bars).
- ``slant`` = sum p (x - x_c)(y - y_c) / sum p (y - y_c)^2, with y pointing up: the horizontal shift
  per unit of height of the least-squares line x = x_c + s (y - y_c) through the ink. 0 is upright,
  positive leans right (exact for sheared bars, tested).
- ``width``: the width in pixels of the bounding box of the pixels with p > 0.5. MNIST's digits are
  size-normalised to a 20-pixel box (the median height is 20 pixels in every class of the offline
  set), so their size varies in width, not in height: "narrow" and "wide" are the size words.

A blank image has thickness 0, slant 0 and width 0.

**Levels** (:class:`AttributeScale`): per class, the tertiles of each attribute on the training
digits: the lower third is level -1 ("thin", "upright", "narrow"), the upper third +1 ("bold",
"slanted", "wide"), the middle 0 (never mentioned). Per class, because a bold one has less ink than
a thin eight.

**Captions** (:func:`make_captions`): each image's caption names its digit (a word or a numeral)
and each attribute at an extreme level with probability ``mention`` (0.8), through one of several
templates and synonyms, deterministically from ``(seed, variant, index)``. The ``held_out``
templates are never used for training (they also bring words the training captions never use, such
as "photo": the tokenizer maps them to ``<unk>``). Alongside the strings comes what each caption
requests: (N, 3) levels with 0 for "not mentioned".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .utils import check_positive_int

__all__ = ["ATTRIBUTES", "DIGIT_WORDS", "ATTRIBUTE_WORDS", "TRAIN_TEMPLATES", "HELD_OUT_TEMPLATES",
           "digit_attributes", "AttributeScale", "make_captions", "caption_for", "Captions", "vocabulary"]

ATTRIBUTES = ("thickness", "slant", "width")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ATTRIBUTE_WORDS = {  # (attribute, level) -> synonyms
    ("thickness", -1): ("thin", "fine", "light"), ("thickness", 1): ("bold", "thick", "heavy"),
    ("slant", -1): ("upright", "straight", "vertical"), ("slant", 1): ("slanted", "tilted", "leaning"),
    ("width", -1): ("narrow", "slim"), ("width", 1): ("wide", "broad"),
}
# {adj}: the attribute words, {name}: the digit. "bare" forms are used when no attribute is named.
TRAIN_TEMPLATES = {
    "described": ("a {adj} {name}", "{adj} {name}", "the digit {name}, {adj}", "a handwritten {name} that is {adj}",
                  "an image of a {adj} {name}", "a {adj} handwritten digit {name}"),
    "bare": ("a {name}", "the digit {name}", "{name}", "a handwritten {name}", "an image of a {name}"),
}
HELD_OUT_TEMPLATES = {
    "described": ("a photo of the digit {name}, {adj}", "my {adj} number {name}", "{name} written in a {adj} hand"),
    "bare": ("a photo of the digit {name}", "number {name}", "{name} written by hand"),
}
_JOINS = (" ", ", ", " and ")


def vocabulary() -> tuple[str, ...]:
    """Every word of the training captions, sorted (the tokenizer's vocabulary after its specials)."""
    from .text import words

    found = set(DIGIT_WORDS) | {str(d) for d in range(10)} | {"and"}
    for synonyms in ATTRIBUTE_WORDS.values():
        found.update(synonyms)
    for forms in TRAIN_TEMPLATES.values():
        for template in forms:
            found.update(words(template.replace("{adj}", "").replace("{name}", "")))
    return tuple(sorted(found))


def _check_images(images) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 1 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected grey images (N, 1, H, W) in [-1, 1] as a float tensor; got {got}")
    return images


def digit_attributes(images: Tensor) -> Tensor:
    """``(N, 3)`` float64: thickness, slant and width (pixels) of each image (see the module docstring)."""
    p = ((_check_images(images).double() + 1) / 2).clamp(0, 1)[:, 0]
    n, h, w = p.shape
    mass = p.sum((1, 2))
    tv = (p[:, 1:] - p[:, :-1]).abs().sum((1, 2)) + (p[:, :, 1:] - p[:, :, :-1]).abs().sum((1, 2))
    thickness = torch.where(tv > 0, 2 * mass / tv.clamp_min(1e-12), 0.0)
    rows = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    safe = mass.clamp_min(1e-12)[:, None, None]
    y = -(rows - (p * rows).sum((1, 2))[:, None, None] / safe)  # up is positive
    x = cols - (p * cols).sum((1, 2))[:, None, None] / safe
    syy = (p * y * y).sum((1, 2))
    slant = torch.where(syy > 0, (p * x * y).sum((1, 2)) / syy.clamp_min(1e-12), 0.0)
    ink = (p > 0.5).any(1)  # (N, W): columns with ink
    idx = torch.arange(w)
    first = torch.where(ink, idx, w).min(1).values
    last = torch.where(ink, idx, -1).max(1).values
    width = (last - first + 1).clamp_min(0).double()
    return torch.stack([thickness, slant, width], dim=1)


@dataclass(frozen=True)
class AttributeScale:
    """Per-class tertiles of each attribute: ``low``/``high`` of shape (classes, 3)."""

    low: Tensor
    high: Tensor

    @classmethod
    def fit(cls, images: Tensor, labels: Tensor, *, classes: int = 10) -> AttributeScale:
        attrs = digit_attributes(images)
        if labels.shape != (attrs.shape[0],):
            raise ValueError(f"expected labels of shape ({attrs.shape[0]},); got {tuple(labels.shape)}")
        low, high = torch.zeros(classes, 3, dtype=torch.float64), torch.zeros(classes, 3, dtype=torch.float64)
        for c in range(classes):
            mine = attrs[labels == c]
            if len(mine) < 3:
                raise ValueError(f"expected at least 3 images of class {c} to fit the tertiles; got {len(mine)}")
            low[c], high[c] = mine.quantile(1 / 3, dim=0), mine.quantile(2 / 3, dim=0)
        return cls(low, high)

    def levels(self, images: Tensor, labels: Tensor) -> Tensor:
        """``(N, 3)`` int64 in {-1, 0, 1}: below the class's lower tertile, between, above the upper."""
        attrs = digit_attributes(images)
        low, high = self.low[labels], self.high[labels]
        return (attrs > high).long() - (attrs < low).long()


@dataclass(frozen=True)
class Captions:
    texts: tuple[str, ...]
    requested: Tensor  # (N, 3) int64: the level each caption asks for, 0 where it names none
    labels: Tensor  # (N,)


def caption_for(digit: int, requested: dict[str, int] | None = None, *, template: str | None = None,
                numeral: bool = False, join: str = " ") -> str:
    """One caption: ``digit`` with the attribute levels ``requested`` (e.g. ``{"thickness": 1}``),
    in ``template`` (default: the first training template of its form), the first synonym of each
    word; ``numeral`` writes "7" instead of "seven"."""
    if not isinstance(digit, int) or not 0 <= digit <= 9:
        raise ValueError(f"expected a digit 0-9; got {digit!r}")
    requested = {k: v for k, v in (requested or {}).items() if v}
    for key, value in requested.items():
        if key not in ATTRIBUTES or value not in (-1, 1):
            raise ValueError(f"expected requests among {ATTRIBUTES} with levels -1 or 1; got {key!r}: {value!r}")
    adj = join.join(ATTRIBUTE_WORDS[(a, requested[a])][0] for a in ATTRIBUTES if a in requested)
    if template is None:
        template = TRAIN_TEMPLATES["described" if adj else "bare"][0]
    name = str(digit) if numeral else DIGIT_WORDS[digit]
    return template.format(adj=adj, name=name)


def make_captions(labels: Tensor, levels: Tensor, *, seed: int = 0, variant: int = 0, split: str = "train",
                  mention: float = 0.8) -> Captions:
    """A caption per image from its label and attribute ``levels`` (``AttributeScale.levels``),
    deterministic in ``(seed, variant, index)``; ``split`` "train" or "held_out" picks the templates."""
    templates = {"train": TRAIN_TEMPLATES, "held_out": HELD_OUT_TEMPLATES}.get(split)
    if templates is None:
        raise ValueError(f"expected split 'train' or 'held_out'; got {split!r}")
    if levels.shape != (labels.shape[0], len(ATTRIBUTES)):
        raise ValueError(f"expected levels of shape ({labels.shape[0]}, {len(ATTRIBUTES)}); got {tuple(levels.shape)}")
    if not 0 <= mention <= 1:
        raise ValueError(f"expected 0 <= mention <= 1; got {mention}")
    check_positive_int(seed, "seed", allow_zero=True)
    texts, requested = [], torch.zeros(levels.shape, dtype=torch.long)
    for i, (label, row) in enumerate(zip(labels.tolist(), levels.tolist(), strict=True)):
        rng = np.random.default_rng([seed, variant, i])
        named = [a for a, level in enumerate(row) if level != 0 and rng.random() < mention]
        rng.shuffle(named)
        adj = _JOINS[rng.integers(len(_JOINS))].join(
            str(rng.choice(ATTRIBUTE_WORDS[(ATTRIBUTES[a], row[a])])) for a in named)
        forms = templates["described" if named else "bare"]
        name = str(label) if rng.random() < 0.3 else DIGIT_WORDS[label]
        texts.append(forms[rng.integers(len(forms))].format(adj=adj, name=name))
        for a in named:
            requested[i, a] = row[a]
    return Captions(tuple(texts), requested, labels.clone())
