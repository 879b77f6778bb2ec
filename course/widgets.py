"""Interactive controls for the notebooks. Each widget is a thin shell around a plain function
that does the work and is unit-tested on its own (tests/test_widgets.py)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn

from .plotting import plot_images
from .recipes import sample_classes
from .utils import check_positive_int

__all__ = ["cfg_samples", "guidance_slider"]


def cfg_samples(model: nn.Module, w: float, *, classes=range(10), per_class: int = 4, nfe: int = 10,
                seed: int = 0) -> Tensor:
    """Class-conditional samples at guidance weight ``w``: ``per_class`` digits of each class in
    ``classes`` (class-major order), Euler with ``nfe`` steps from noise drawn from ``seed``.

    The noise depends on ``seed`` only, never on ``w``, so moving the slider changes the guidance
    of the same starting points."""
    per_class = check_positive_int(per_class, "per_class")
    labels = torch.as_tensor(list(classes), dtype=torch.long).repeat_interleave(per_class)
    if labels.numel() == 0:
        raise ValueError("expected at least one class")
    return sample_classes(model, labels, w=w, nfe=nfe, generator=torch.Generator().manual_seed(seed))


def guidance_slider(model: nn.Module, *, classes=range(10), per_class: int = 4, nfe: int = 10, seed: int = 0,
                    w_max: float = 8.0, w_step: float = 0.5):
    """An ipywidgets slider for the classifier-free guidance weight w: each value draws
    :func:`cfg_samples` as a grid (one column per class). The drawn images are in ``.result``."""
    import ipywidgets as widgets

    classes = list(classes)

    def show(w: float) -> Tensor:
        images = cfg_samples(model, w, classes=classes, per_class=per_class, nfe=nfe, seed=seed)
        grid = images.reshape(len(classes), per_class, *images.shape[1:]).transpose(0, 1).flatten(0, 1)
        fig, ax = plt.subplots(figsize=(0.6 * len(classes) + 0.5, 0.6 * per_class + 0.6))
        plot_images(ax, grid, nrow=len(classes), title=f"classifier-free guidance, w = {w:g} ({nfe} Euler steps)")
        plt.show()
        return images

    slider = widgets.FloatSlider(value=0.0, min=0.0, max=w_max, step=w_step, description="w",
                                 continuous_update=False)
    return widgets.interactive(show, w=slider)
