"""Interactive controls for the notebooks. Each widget is a thin shell around a plain function
that does the work and is unit-tested on its own (tests/test_widgets.py).

A widget alone shows nothing until a kernel runs it, or until JupyterLab trusts the notebook and
restores the saved widget state. :func:`interactive_figure` therefore displays, beside the live
widget, a PNG of its figure at the default values: JupyterLab shows the widget when it can and
the picture otherwise (an untrusted notebook, a static viewer, a saved file without a kernel)."""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from .plotting import plot_images
from .recipes import sample_classes
from .utils import check_positive_int

__all__ = ["InteractiveFigure", "cfg_samples", "figure_png", "guidance_slider", "interactive_figure",
           "png_title"]

SLIDER_WIDTH = "680px"  # a 101-value slider: its ~500 px track moves one value per ~5 px of drag


def _figure_title(fig: Figure) -> str:
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    if suptitle:
        return suptitle
    return next((ax.get_title() for ax in fig.axes if ax.get_title()), "")


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes (tight bounding box, as the inline backend draws it) whose ``Title``
    text chunk holds the figure's title (its suptitle, else the first axes title), so a program
    that reads the picture, a browser test say, can tell which value it shows."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", metadata={"Title": _figure_title(fig)})
    return buffer.getvalue()


def png_title(png: bytes) -> str:
    """The ``Title`` text chunk of a PNG written by :func:`figure_png` ('' if it has none)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("expected PNG bytes (they start with the 8-byte PNG signature)")
    at = 8
    while at + 8 <= len(png):
        length = int.from_bytes(png[at:at + 4], "big")
        kind, body = png[at + 4:at + 8], png[at + 8:at + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            if key == b"Title":
                return value.decode("latin-1")
        if kind == b"IEND":
            break
        at += 12 + length
    return ""


class InteractiveFigure:
    """A live ipywidgets control (``.widget``) and the PNG of its first drawing (``.static_png``).

    Displaying it gives one output whose bundle holds both: the widget view, which JupyterLab
    prefers when the widget can be shown, and ``image/png``, shown where it cannot."""

    def __init__(self, widget, static_png: bytes, title: str):
        self.widget = widget
        self.static_png = static_png
        self.title = title

    @property
    def result(self):
        """What the drawing function returned for the current values."""
        return self.widget.result

    @property
    def children(self):
        return self.widget.children

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = self.widget._repr_mimebundle_()
        bundle["image/png"] = base64.b64encode(self.static_png).decode("ascii")
        bundle["text/plain"] = f"[interactive figure; shown at its default values: {self.title}]"
        return bundle

    def __repr__(self) -> str:
        return f"InteractiveFigure({self.title!r})"


def interactive_figure(draw: Callable[..., Figure | tuple], **controls) -> InteractiveFigure:
    """``draw(**values)`` makes a new matplotlib figure for the widgets' values and returns it, or
    a pair ``(figure, result)``; ``controls`` are ipywidgets controls or values that
    ``ipywidgets.interactive`` turns into controls (a list becomes a dropdown).

    Every redraw is displayed as a PNG carrying the figure's title (:func:`figure_png`); the first
    one, at the default values, is also kept as the static picture."""
    import ipywidgets as widgets
    from IPython.display import Image, display

    drawn: list[tuple[bytes, str]] = []
    failed: list[Exception] = []

    @functools.wraps(draw)  # ipywidgets reads draw's defaults (a dropdown's initial choice) from its signature
    def show(**values):
        try:
            out = draw(**values)
            fig, result = out if isinstance(out, tuple) else (out, None)
            if not isinstance(fig, Figure):
                raise TypeError(f"draw() must return a matplotlib Figure (or (Figure, result)); "
                                f"got {type(fig).__name__}")
        except Exception as exc:
            failed.append(exc)  # ipywidgets only logs a callback's error: the first one is raised below
            raise
        png = figure_png(fig)
        plt.close(fig)
        drawn.append((png, _figure_title(fig)))
        display(Image(data=png, format="png"))
        return result

    widget = widgets.interactive(show, **controls)  # draws once, at the default values
    if not drawn:
        widget.close()
        raise failed[0] if failed else RuntimeError("the widget did not draw its default values")
    return InteractiveFigure(widget, *drawn[0])


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
                    w_max: float = 8.0, w_step: float = 0.5) -> InteractiveFigure:
    """A slider for the classifier-free guidance weight w: each value draws :func:`cfg_samples`
    as a grid (one column per class), with a static picture at w = 0 (:func:`interactive_figure`).
    The drawn images are in ``.result``."""
    import ipywidgets as widgets

    classes = list(classes)

    def draw(w: float):
        images = cfg_samples(model, w, classes=classes, per_class=per_class, nfe=nfe, seed=seed)
        grid = images.reshape(len(classes), per_class, *images.shape[1:]).transpose(0, 1).flatten(0, 1)
        fig, ax = plt.subplots(figsize=(0.6 * len(classes) + 0.5, 0.6 * per_class + 0.6))
        plot_images(ax, grid, nrow=len(classes), title=f"classifier-free guidance, w = {w:g} ({nfe} Euler steps)")
        return fig, images

    slider = widgets.FloatSlider(value=0.0, min=0.0, max=w_max, step=w_step, description="w",
                                 continuous_update=False, layout=widgets.Layout(width=SLIDER_WIDTH))
    return interactive_figure(draw, w=slider)
