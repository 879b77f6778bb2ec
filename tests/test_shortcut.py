"""Shortcut models: the time/step-size sampler, the self-consistency target against the exact average
velocity of Gaussian data (where two half steps make one full step exactly), the loss' two parts and
its gradient path, conditioning, and bad input."""

import pytest
import torch
from torch import nn

from course.flow_matching import conditional_velocity
from course.meanflow import sample_meanflow
from course.nets import TimeMLP
from course.paths import LinearPath
from course.sde import VPSDE
from course.shortcut import shortcut_loss, shortcut_target, shortcut_times
from tests.test_meanflow import ExactAverageVelocity


def test_times_are_on_the_samplers_grid():
    t, d = shortcut_times(20_000, max_steps=16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    levels = torch.log2(1 / d)
    assert torch.equal(levels, levels.round()) and set(levels.round().int().tolist()) == {1, 2, 3, 4}
    k = t / d
    assert torch.allclose(k, k.round(), atol=1e-9)  # t is a multiple of d
    assert (t - 2 * d >= -1e-12).all() and (t <= 1 + 1e-12).all()
    for j in (1, 2, 3, 4):  # every multiple k = 2 .. 2^j is drawn, uniformly
        ks = k[levels.round() == j].round().int()
        counts = torch.bincount(ks, minlength=2**j + 1)[2:].double()
        assert len(counts) == 2**j - 1 and (counts > 0).all()
        chi2, df = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item(), len(counts) - 1
        assert chi2 <= df + 5 * (2 * df) ** 0.5, (j, chi2, df)  # uniform: chi^2 within 5 sd of its mean


@pytest.mark.parametrize("path", [LinearPath(), VPSDE()], ids=lambda p: p.name)
def test_two_half_steps_of_the_exact_average_velocity_are_one_full_step(path):
    mean = torch.tensor([0.5, -1.0], dtype=torch.float64)
    u = ExactAverageVelocity(mean, 0.6, path)
    gen = torch.Generator().manual_seed(1)
    t, d = shortcut_times(200, max_steps=64, generator=gen, dtype=torch.float64)
    t = t.clamp_max(1.0 - 1e-9) if path.name == "vp" else t
    z = 1.2 * torch.randn(200, 2, generator=gen, dtype=torch.float64)
    r = (t - 2 * d).clamp_min(1e-9 if path.name == "vp" else 0.0)
    keep = t - r > 1e-6
    target = shortcut_target(u, z, t, d)
    torch.testing.assert_close(target[keep], u(z, t, r)[keep], rtol=1e-9, atol=1e-9)


def test_a_wrong_half_step_is_not_a_full_step():
    """Catches an implementation that evaluates the second half step at the start point z."""
    path, mean = LinearPath(), torch.tensor([0.5, -1.0], dtype=torch.float64)
    u = ExactAverageVelocity(mean, 0.6, path)
    gen = torch.Generator().manual_seed(2)
    t, d = shortcut_times(100, max_steps=8, generator=gen, dtype=torch.float64)
    z = torch.randn(100, 2, generator=gen, dtype=torch.float64)
    wrong = 0.5 * (u(z, t, t - d) + u(z, t - d, (t - 2 * d).clamp_min(0)))
    assert (wrong - u(z, t, (t - 2 * d).clamp_min(0))).abs().max() > 1e-2


def test_the_exact_model_has_zero_self_consistency_loss():
    path, mean = LinearPath(), torch.tensor([0.5, -1.0], dtype=torch.float64)
    u = ExactAverageVelocity(mean, 0.6, path)
    x0 = mean + 0.6 * torch.randn(256, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss = shortcut_loss(u, x0, path, bootstrap_share=1.0, max_steps=32,
                         generator=torch.Generator().manual_seed(4))
    assert loss.item() < 1e-18


def test_without_bootstrap_it_is_flow_matching():
    path = LinearPath()
    net = TimeMLP(2, hidden=16, depth=1, interval=True).double()
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    loss = shortcut_loss(net, x0, path, bootstrap_share=0.0, generator=torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(6)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.rand(64, generator=gen, dtype=torch.float64)
    z = path.sample(x0, t, eps=eps).x_t
    expected = (net(z, t, r=t) - conditional_velocity(path, x0, eps, t)).pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_gradients_reach_the_prediction_only():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TimeMLP(2, hidden=16, depth=1, interval=True).double()
            self.graph_calls = 0

        def forward(self, x, t, r=None):
            out = self.net(x, t, r=r)
            self.graph_calls += int(out.requires_grad)
            return out

    model = Counting()
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    loss = shortcut_loss(model, x0, LinearPath(), bootstrap_share=0.5, generator=torch.Generator().manual_seed(8))
    assert model.graph_calls == 1  # the two half steps ran without a graph
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_conditioning_is_split_with_the_batch():
    seen = []

    def model(x, t, r=None, y=None):
        assert y.shape == (x.shape[0],), (y.shape, x.shape)
        seen.append(x.shape[0])
        return x * 0 + y[:, None].to(x.dtype)

    x0 = torch.randn(40, 2, generator=torch.Generator().manual_seed(9))
    shortcut_loss(model, x0, LinearPath(), bootstrap_share=0.25, y=torch.arange(40) % 3,
                  generator=torch.Generator().manual_seed(0))
    assert seen == [10, 10, 40]


def test_uniform_sampling_with_the_exact_average_velocity_is_exact_at_every_step_count():
    path, mean = LinearPath(), torch.tensor([0.5, -1.0], dtype=torch.float64)
    u = ExactAverageVelocity(mean, 0.6, path)
    z1 = torch.randn(1000, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    one = sample_meanflow(u, z1, torch.tensor([1.0, 0.0]))
    for n in (2, 4, 8):
        torch.testing.assert_close(sample_meanflow(u, z1, torch.linspace(1, 0, n + 1, dtype=torch.float64)), one)


@pytest.mark.parametrize("kwargs, words", [
    ({"bootstrap_share": 1.5}, "0 <= bootstrap_share <= 1"),
    ({"max_steps": 48}, "power of two"),
    ({"max_steps": 1}, "power of two"),
])
def test_bad_input(kwargs, words):
    with pytest.raises(ValueError, match=words):
        shortcut_loss(lambda x, t, r=None: x, torch.zeros(4, 2), LinearPath(), **kwargs)


def test_target_rejects_steps_past_the_data():
    with pytest.raises(ValueError, match="t - 2d >= 0"):
        shortcut_target(lambda x, t, r=None: x, torch.zeros(3, 2), torch.full((3,), 0.3), torch.full((3,), 0.2))


def test_with_a_teacher_the_flow_matching_rows_regress_onto_its_velocity():
    path = LinearPath()
    net = TimeMLP(2, hidden=16, depth=1, interval=True).double()
    calls = []

    def teacher(z, t, y=None):
        calls.append((z.shape[0], y.shape[0], torch.is_grad_enabled()))
        return torch.sin(z) * (1 + t[:, None]) + y[:, None].double()

    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    y = torch.arange(32) % 4
    net_y = lambda z, t, r=None, y=None: net(z, t, r=r)  # noqa: E731 - the net ignores the label
    loss = shortcut_loss(net_y, x0, path, bootstrap_share=0.0, teacher_velocity=teacher,
                         generator=torch.Generator().manual_seed(13), y=y)
    gen = torch.Generator().manual_seed(13)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.rand(32, generator=gen, dtype=torch.float64)
    z = path.sample(x0, t, eps=eps).x_t
    expected = (net(z, t, r=t) - teacher(z, t, y=y)).pow(2).mean()
    torch.testing.assert_close(loss, expected)
    assert calls[0] == (32, 32, False)  # the teacher ran on every flow-matching row, without a graph
    calls.clear()
    shortcut_loss(net_y, x0, path, bootstrap_share=0.25, teacher_velocity=teacher,
                  generator=torch.Generator().manual_seed(14), y=y)
    assert calls == [(24, 24, False)]  # only the flow-matching rows ask the teacher
