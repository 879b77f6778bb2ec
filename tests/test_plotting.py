import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from course.plotting import (  # noqa: E402
    density_grid,
    perturbed_view_limit,
    plot_perturbed_density,
    plot_perturbed_grid,
    plot_schedules,
    plot_trajectories_1d,
    plot_trajectories_2d,
)
from course.sde import VESDE, VPSDE  # noqa: E402
from course.simulate import simulate_forward  # noqa: E402
from course.toy_data import eight_gaussians  # noqa: E402


@pytest.mark.parametrize("t", [0.05, 0.5, 1.0])
def test_density_grid_of_perturbed_marginal_has_unit_mass(t):
    """The function behind the notebook's t-slider: the plotted density integrates to one."""
    data, sde = eight_gaussians(), VPSDE()
    lim = perturbed_view_limit(sde, t)
    xs, ys, dens = density_grid(lambda x: data.perturbed_log_prob(x, t, sde), lim, 300)
    mass = dens.sum() * (xs[1] - xs[0]) * (ys[1] - ys[0])
    assert abs(mass - 1) < 2e-3
    assert dens.shape == (300, 300) and np.all(dens >= 0)


def test_view_limit_grows_with_ve_noise():
    assert perturbed_view_limit(VESDE(), 1.0) > 35 > perturbed_view_limit(VPSDE(), 1.0)


def test_density_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lim > 0"):
        density_grid(lambda x: x.sum(1), -1.0)


def test_figures_draw_headless():
    gen = torch.Generator().manual_seed(0)
    data, sdes = eight_gaussians(), {"VE": VESDE(), "VP": VPSDE()}
    x0 = data.sample(200, generator=gen)
    trajs = {k: simulate_forward(s, x0, 20, save_every=5, generator=gen) for k, s in sdes.items()}
    fig = plot_perturbed_grid(data, sdes, [0.0, 0.5, 1.0], samples=trajs, n_grid=30)
    assert len(fig.axes) == 6
    # each panel keeps its scale: at t = 1 VE's view is several times VP's, and the ticks say so
    ve_1, vp_1 = fig.axes[2], fig.axes[5]
    assert len(ve_1.get_xticks()) > 1 and len(vp_1.get_xticks()) > 1
    assert ve_1.get_xlim()[1] > 5 * vp_1.get_xlim()[1]
    fig, axes = plt.subplots(1, 4)
    plot_schedules(axes[0], axes[1], sdes)
    plot_trajectories_1d(axes[2], trajs["VP"], n=5)
    plot_trajectories_2d(axes[3], trajs["VP"], n=5)
    assert len(axes[0].lines) == 2 and len(axes[2].lines) == 5
    fig, ax = plt.subplots()
    plot_perturbed_density(ax, data, sdes["VP"], 0.3, samples=x0, n_grid=20)
    assert len(ax.images) == 1 and len(ax.collections) == 1
    plt.close("all")


def test_score_grid_and_field():
    from course.plotting import plot_score_field, score_grid
    from course.toy_data import oracle_score

    data, sde = eight_gaussians(), VPSDE()
    pts, scores = score_grid(oracle_score(data, sde), 0.3, 3.0, n=11)
    assert pts.shape == (121, 2) and scores.shape == (121, 2)
    expected = data.perturbed_score(torch.as_tensor(pts), 0.3, sde).numpy()
    np.testing.assert_allclose(scores, expected)
    fig, ax = plt.subplots()
    plot_score_field(ax, oracle_score(data, sde), 0.3, n=11)
    assert len(ax.collections) == 1
    plt.close(fig)


def test_plot_samples_keeps_its_scale_when_asked():
    from course.plotting import plot_samples

    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    fig, (bare, scaled) = plt.subplots(1, 2)
    plot_samples(bare, x, lim=2.0)
    plot_samples(scaled, x, lim=2.0, ticks=True)
    assert len(bare.get_xticks()) == 0
    ticks = scaled.get_xticks()
    assert len(ticks) >= 3 and ticks.min() >= -2.0 and ticks.max() <= 2.0
    assert scaled.get_xlim() == (-2.0, 2.0)
    plt.close(fig)
