"""Guidance for class-conditional models.

Classifier-free guidance (Ho & Salimans 2022) combines the conditional and the unconditional
prediction of one network trained with label dropout:

    pred_w(x, t, y) = (1 + w) pred(x, t, y) - w pred(x, t, null),

with w = 0 the plain conditional model. The combination is linear, and for a fixed (x, t) the
score, the noise eps, x_0 and the velocity of a Gaussian path are affine in each other with
the same coefficients for both terms, so the same wrapper guides score, eps, x_0 and velocity
models alike (tested in tests/test_guidance.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["classifier_free_guidance"]


def classifier_free_guidance(model: Callable, w: float, *, null_label: int) -> Callable:
    """``guided(x, t, y)`` = (1 + w) model(x, t, y=y) - w model(x, t, y=null), evaluated as one
    batch of 2B (one network call per step). ``w = 0`` calls the model once, conditionally."""
    w = float(w)
    if not torch.isfinite(torch.tensor(w)) or w < 0:
        raise ValueError(f"expected a guidance weight w >= 0; got {w}")

    def guided(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        if w == 0:
            return model(x, t, y=y)
        both = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null_label)]))
        cond, uncond = both.chunk(2)
        return (1 + w) * cond - w * uncond

    return guided
