"""MeanFlow against closed forms: the JVP total derivative against finite differences (MLP and the
GroupNorm U-Net), the MeanFlow identity for the exact average velocity of Gaussian data, exact
one-step sampling with it, the time-pair distribution, and the zero-initialised interval embedding."""

import math

import pytest
import torch
from torch import nn

from course.flow_matching import oracle_velocity
from course.meanflow import meanflow_loss, meanflow_target, sample_meanflow, sample_time_pairs
from course.nets import TimeMLP
from course.paths import LinearPath
from course.sde import VPSDE
from course.toy_data import gaussian
from course.unet import UNet


def _randomise_interval(model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.interval.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_jvp_total_derivative_matches_finite_differences(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model, shape = TimeMLP(2, hidden=32, depth=2, interval=True).double(), (6, 2)
        cond = {}
    else:
        model = UNet(1, channels=(8, 8, 8), emb_dim=16, num_classes=3, patch=2, interval=True).double()
        shape, cond = (3, 1, 8, 8), {"y": torch.tensor([0, 2, 3])}
    _randomise_interval(model)
    gen = torch.Generator().manual_seed(1)
    z, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    t = 0.4 + 0.5 * torch.rand(shape[0], generator=gen, dtype=torch.float64)
    r = t * 0.3
    pred, target = meanflow_target(model, z, t, r, v, **cond)
    h = 1e-7  # the time embedding has frequencies up to 2 pi 100: larger h has visible truncation error
    with torch.no_grad():
        dudt = (model(z + h * v, t + h, r=r, **cond) - model(z - h * v, t - h, r=r, **cond)) / (2 * h)
        torch.testing.assert_close(pred, model(z, t, r=r, **cond))
    expected = v - (t - r).reshape(-1, *([1] * (z.ndim - 1))) * dudt
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-7)
    assert not target.requires_grad


class ExactAverageVelocity(nn.Module):
    """u*(z, t, r) = (z - Phi_{t->r}(z)) / (t - r) for Gaussian data, where the probability-flow map
    Phi is affine: Phi(z) = alpha_r m + sqrt(v_r / v_t) (z - alpha_t m), v = alpha^2 s^2 + sigma^2."""

    def __init__(self, mean, std, path):
        super().__init__()
        self.mean, self.std, self.path = mean, std, path

    def forward(self, z, t, r=None):
        p, m = self.path, self.mean

        def var(s):
            return p.alpha(s) ** 2 * self.std**2 + p.sigma(s) ** 2

        a_t, a_r = p.alpha(t)[:, None], p.alpha(r)[:, None]
        phi = a_r * m + (var(r) / var(t)).sqrt()[:, None] * (z - a_t * m)
        return (z - phi) / (t - r)[:, None]


@pytest.mark.parametrize("path", [LinearPath(), VPSDE()], ids=lambda p: p.name)
def test_meanflow_identity_holds_for_the_exact_average_velocity(path):
    """With the marginal velocity v and u = u*, the target v - (t - r) du/dt equals u* itself."""
    data = gaussian((0.5, -1.0), 0.6)
    u = ExactAverageVelocity(data.means[0], 0.6, path)
    gen = torch.Generator().manual_seed(2)
    z = 1.3 * torch.randn(50, 2, generator=gen, dtype=torch.float64)
    t = 0.3 + 0.7 * torch.rand(50, generator=gen, dtype=torch.float64)
    r = t * torch.rand(50, generator=gen, dtype=torch.float64)
    v = oracle_velocity(data, path)(z, t)
    pred, target = meanflow_target(u, z, t, r, v)
    torch.testing.assert_close(target, pred, rtol=1e-9, atol=1e-9)


def test_one_step_sampling_with_the_exact_average_velocity_is_exact():
    path, mean, std = LinearPath(), torch.tensor([0.5, -1.0], dtype=torch.float64), 0.6
    u = ExactAverageVelocity(mean, std, path)
    gen = torch.Generator().manual_seed(3)
    z1 = torch.randn(100_000, 2, generator=gen, dtype=torch.float64)
    x = sample_meanflow(u, z1, torch.tensor([1.0, 0.0]))
    se = 1 / math.sqrt(100_000)
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=4 * se)
    torch.testing.assert_close(x.std(0), torch.full((2,), std, dtype=torch.float64), rtol=0, atol=4 * se)
    two = sample_meanflow(u, z1, torch.tensor([1.0, 0.4, 0.0]))
    torch.testing.assert_close(two, x)  # the exact average velocity composes


def test_time_pairs():
    t, r = sample_time_pairs(200_000, share_distinct=0.25, generator=torch.Generator().manual_seed(4))
    assert (r <= t).all() and (t > 0).all() and (t < 1).all()
    assert (r < t).double().mean().item() == pytest.approx(0.25, abs=0.005)
    t, r = sample_time_pairs(100, share_distinct=0.0)
    assert torch.equal(t, r)
    with pytest.raises(ValueError):
        sample_time_pairs(10, share_distinct=1.5)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_interval_model_starts_as_the_one_time_model_it_is_loaded_from(kind):
    torch.manual_seed(5)
    if kind == "mlp":
        one, two, x = TimeMLP(2), TimeMLP(2, interval=True), torch.randn(8, 2)
        cond = {}
    else:
        one = UNet(1, channels=(8, 8, 8), num_classes=10, patch=2)
        two = UNet(1, channels=(8, 8, 8), num_classes=10, patch=2, interval=True)
        x, cond = torch.randn(4, 1, 8, 8), {"y": torch.tensor([1, 2, 3, 10])}
    missing = two.load_state_dict(one.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("interval.") for k in missing)
    t = torch.rand(x.shape[0])
    with torch.no_grad():
        torch.testing.assert_close(two(x, t, r=t * 0.2, **cond), one(x, t, **cond), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one time"):
        one(x, t, r=t, **cond)


def test_meanflow_loss_has_a_gradient_path():
    model = TimeMLP(2, hidden=32, depth=2, interval=True)
    loss = meanflow_loss(model, torch.randn(64, 2), LinearPath(), generator=torch.Generator().manual_seed(6))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.net.parameters())
