"""Figures for the notebooks. Every function takes what it draws as arguments (no notebook
globals) and draws on the axes it is given, so it can be tested headless."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from .paths import GaussianPath
from .simulate import Trajectory
from .toy_data import GaussianMixture

__all__ = [
    "density_grid",
    "plot_samples",
    "plot_density",
    "perturbed_view_limit",
    "plot_perturbed_density",
    "plot_perturbed_grid",
    "plot_trajectories_1d",
    "plot_trajectories_2d",
    "plot_schedules",
    "score_grid",
    "plot_score_field",
    "plot_images",
]


def density_grid(log_prob: Callable[[Tensor], Tensor], lim: float, n_grid: int = 150
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate exp(log_prob) on an ``n_grid x n_grid`` grid over [-lim, lim]^2 (float64).

    Returns ``(xs, ys, density)`` with ``density[i, j]`` at ``(xs[j], ys[i])``.
    """
    if lim <= 0 or n_grid < 2:
        raise ValueError(f"expected lim > 0 and n_grid >= 2; got lim={lim}, n_grid={n_grid}")
    axis = torch.linspace(-lim, lim, n_grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], dim=1)  # (n_grid^2, 2)
    with torch.no_grad():
        dens = log_prob(pts).exp().reshape(n_grid, n_grid)
    return axis.numpy(), axis.numpy(), dens.numpy()


def plot_samples(ax, x: Tensor, *, lim: float | None = 3.5, title: str | None = None,
                 s: float = 1.0, alpha: float = 0.4, color: str = "C0", ticks: bool = False) -> None:
    """Scatter 2-D samples ``x`` of shape ``(n, 2)``; ``ticks=True`` keeps the axes' scale."""
    x = x.detach().cpu().numpy()
    ax.scatter(x[:, 0], x[:, 1], s=s, alpha=alpha, color=color, linewidths=0)
    _square(ax, lim, title, ticks=ticks)


def plot_density(ax, log_prob: Callable[[Tensor], Tensor], *, lim: float = 3.5,
                 n_grid: int = 150, title: str | None = None, cmap: str = "Blues", ticks: bool = False) -> None:
    """Draw exp(log_prob) as an image over [-lim, lim]^2; ``ticks=True`` keeps the axes' scale."""
    xs, ys, dens = density_grid(log_prob, lim, n_grid)
    ax.imshow(dens, extent=(xs[0], xs[-1], ys[0], ys[-1]), origin="lower", cmap=cmap,
              aspect="equal")
    _square(ax, lim, title, ticks=ticks)


def perturbed_view_limit(path: GaussianPath, t: float, data_radius: float = 2.0) -> float:
    """A plot half-width that holds all but ~1e-4 of p_t: the data scaled by alpha plus 4 sigma."""
    tt = torch.tensor(t, dtype=torch.float64)
    return float(max(3.2, path.alpha(tt) * data_radius + 4.0 * path.sigma(tt)))


def plot_perturbed_density(ax, data: GaussianMixture, path: GaussianPath, t: float, *,
                           samples: Tensor | None = None, lim: float | None = None,
                           n_grid: int = 150, ticks: bool = False) -> None:
    """The closed-form density of p_t (image), optionally with samples x_t overlaid; ``ticks=True``
    keeps the axes' scale (each panel is scaled to its own p_t)."""
    lim = perturbed_view_limit(path, t) if lim is None else lim
    plot_density(ax, lambda x: data.perturbed_log_prob(x, t, path), lim=lim, n_grid=n_grid,
                 title=f"t = {t:g}", ticks=ticks)
    if samples is not None:
        plot_samples(ax, samples, lim=lim, s=0.5, alpha=0.3, color="C3", ticks=ticks)
    if ticks:
        ax.tick_params(labelsize=7)


def plot_perturbed_grid(data: GaussianMixture, paths: dict[str, GaussianPath],
                        ts: Sequence[float], *, samples: dict[str, Trajectory] | None = None,
                        n_grid: int = 120, panel: float = 2.2, ticks: bool = True):
    """Rows: one per path; columns: one per t. Closed-form p_t with simulated x_t on top.

    The slides' "perturbed distributions" figure, for several SDEs side by side. Each panel is
    scaled to its own p_t, so the ticks carry the message (VE spreads the data over tens of units).
    """
    fig, axes = plt.subplots(len(paths), len(ts), figsize=(panel * len(ts), panel * len(paths)),
                             squeeze=False)
    for row, (name, path) in enumerate(paths.items()):
        for col, t in enumerate(ts):
            ax = axes[row, col]
            x_t = samples[name].at(t) if samples is not None else None
            plot_perturbed_density(ax, data, path, t, samples=x_t, n_grid=n_grid, ticks=ticks)
            if col == 0:
                ax.set_ylabel(name)
    fig.tight_layout()
    return fig


def plot_trajectories_1d(ax, traj: Trajectory, *, dim: int = 0, n: int = 20,
                         title: str | None = None) -> None:
    """Coordinate ``dim`` of ``n`` particles against t."""
    xs = traj.xs[:, :n, dim].cpu().numpy()  # (K, n)
    ax.plot(traj.ts.numpy(), xs, lw=0.7, alpha=0.8)
    ax.set_xlabel("t")
    ax.set_ylabel(f"x[{dim}]")
    if title:
        ax.set_title(title)


def plot_trajectories_2d(ax, traj: Trajectory, *, n: int = 20, lim: float | None = 3.5,
                         title: str | None = None) -> None:
    """Paths of ``n`` particles in the plane: start (circle) to end (cross)."""
    xs = traj.xs[:, :n].cpu().numpy()  # (K, n, 2)
    for i in range(xs.shape[1]):
        ax.plot(xs[:, i, 0], xs[:, i, 1], lw=0.6, alpha=0.7)
    ax.scatter(xs[0, :, 0], xs[0, :, 1], s=12, marker="o", color="k", zorder=3)
    ax.scatter(xs[-1, :, 0], xs[-1, :, 1], s=12, marker="x", color="C3", zorder=3)
    _square(ax, lim, title)


def plot_schedules(ax_alpha, ax_sigma, paths: dict[str, GaussianPath], n: int = 200) -> None:
    """alpha(t) and sigma(t) of each path against t. Each path has its own line style as well as
    colour, so curves that coincide (VP's and sub-VP's alpha) stay visible."""
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    styles = ["-", "--", ":", "-."]
    for i, (name, path) in enumerate(paths.items()):
        ax_alpha.plot(t, path.alpha(t), styles[i % len(styles)], label=name)
        ax_sigma.plot(t, path.sigma(t), styles[i % len(styles)], label=name)
    ax_alpha.set(xlabel="t", ylabel="alpha(t)", title="signal scale alpha(t)")
    ax_sigma.set(xlabel="t", ylabel="sigma(t)", title="std of x_t given x_0", yscale="log")
    ax_alpha.legend()
    ax_sigma.legend()


def score_grid(score_fn: Callable[[Tensor, Tensor], Tensor], t: float, lim: float, n: int = 21
               ) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate ``score_fn`` at time ``t`` on an ``n x n`` grid over [-lim, lim]^2.

    Returns ``(points (n*n, 2), scores (n*n, 2))`` as float64 arrays.
    """
    axis = torch.linspace(-lim, lim, n, dtype=torch.float64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], dim=1)  # (n*n, 2)
    with torch.no_grad():
        scores = score_fn(pts, torch.full((pts.shape[0],), float(t), dtype=torch.float64))
    return pts.numpy(), scores.double().numpy()


def plot_score_field(ax, score_fn: Callable[[Tensor, Tensor], Tensor], t: float, *,
                     lim: float = 3.5, n: int = 21, title: str | None = None,
                     color: str = "k") -> None:
    """Arrows of the score at time ``t``, normalised to equal length (direction only)."""
    pts, scores = score_grid(score_fn, t, lim, n)
    norm = np.linalg.norm(scores, axis=1, keepdims=True) + 1e-12
    ax.quiver(pts[:, 0], pts[:, 1], *(scores / norm).T, color=color, alpha=0.6,
              scale=n * 1.3, width=0.004)
    _square(ax, lim, title)


def plot_images(ax, images: Tensor, *, nrow: int, title: str | None = None) -> None:
    """A grid of images in [-1, 1] of shape ``(B, C, H, W)`` (C = 1 or 3), ``nrow`` images per row
    (values outside [-1, 1] are shown saturated; the tensor is not changed)."""
    from torchvision.utils import make_grid

    from .datasets import to_unit_range

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1 or 3, H, W); got {tuple(images.shape)}")
    grid = make_grid(to_unit_range(images.detach().float().cpu()), nrow=nrow, padding=1, pad_value=1.0)
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap=None if images.shape[1] == 3 else "gray",
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _square(ax, lim: float | None, title: str | None, *, ticks: bool = False) -> None:
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if not ticks:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
