"""Consistency models against closed forms: the exact boundary condition on every path, EDM's
coefficients, the Gaussian consistency function against an accurate ODE solve, self-consistency of
the mixture's oracle, a CD loss that vanishes for the exact function, stop-gradient targets, the
curriculum, the lognormal step distribution and multistep sampling."""

import math

import pytest
import torch
from torch import nn

from course.consistency import (
    ConsistencyFunction,
    EMATarget,
    consistency_distillation_loss,
    consistency_grid,
    consistency_training_loss,
    ct_num_steps,
    exact_consistency_function,
    gaussian_consistency_function,
    lognormal_step_probs,
    ode_step,
    pseudo_huber,
    relative_coefficients,
    sample_consistency,
)
from course.fast_samplers import log_snr
from course.flow_matching import oracle_velocity
from course.nets import TimeMLP
from course.paths import LinearPath
from course.sde import VESDE, VPSDE, SubVPSDE
from course.toy_data import eight_gaussians, gaussian
from tests.conftest import SHAPES

PATHS = [LinearPath(), VPSDE(), VESDE(), SubVPSDE()]
T_MIN = 1e-3


def ids(p):
    return p.name


class Wiggle(nn.Module):
    """A rank-agnostic stand-in network with parameters: F(x, t) = tanh(w x) + b t."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.tensor(0.7)), nn.Parameter(torch.tensor(-0.3))

    def forward(self, x, t, **cond):
        return torch.tanh(self.w * x) + self.b * t.reshape(-1, *([1] * (x.ndim - 1)))


@pytest.mark.parametrize("path", PATHS, ids=ids)
@pytest.mark.parametrize("param,prediction", [("edm", "x0"), ("ddim", "velocity"), ("ddim", "x0"),
                                              ("ddim", "eps"), ("ddim", "v")])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_condition_holds_exactly(path, param, prediction, shape, dtype):
    f = ConsistencyFunction(Wiggle().to(dtype), path, t_min=T_MIN, parameterisation=param, prediction=prediction)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    t = torch.full((shape[0],), T_MIN, dtype=dtype)
    c_skip, c_out, _ = f.coefficients(t)
    assert (c_skip == 1).all() and (c_out == 0).all()
    assert torch.equal(f(x, t), x)
    # away from the boundary the network matters
    assert (f(x, torch.full_like(t, 0.5)) - x).abs().max() > 1e-3


@pytest.mark.parametrize("path", PATHS, ids=ids)
def test_edm_coefficients_make_the_network_target_unit_variance_with_the_smallest_c_out(path):
    """c_out^2 = Var(x_tmin - c_skip x_t) for data of std sigma_d, and c_skip minimises it; c_in x_t has
    unit variance. Seen from x_tmin: x_t = abar x_tmin + sbar z."""
    sd = 0.8
    f = ConsistencyFunction(Wiggle().double(), path, t_min=T_MIN, sigma_data=sd)
    t = torch.tensor([0.01, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    c_skip, c_out, c_in = f.coefficients(t)
    abar, sbar = relative_coefficients(path, t, T_MIN)

    def residual_var(c):
        return (1 - c * abar) ** 2 * sd**2 + c**2 * sbar**2

    torch.testing.assert_close(c_out**2, residual_var(c_skip), rtol=1e-12, atol=1e-14)
    for dc in (1e-3, -1e-3):
        assert (residual_var(c_skip + dc) > residual_var(c_skip)).all()
    torch.testing.assert_close(c_in**2 * (abar**2 * sd**2 + sbar**2), torch.ones_like(t))


def test_edm_coefficients_reduce_to_karras_for_ve_without_a_boundary_shift():
    """With t_min = 0 and alpha = 1 the coefficients are EDM's: sigma_d^2/(sigma^2 + sigma_d^2), ..."""
    path, sd = VESDE(), 0.5
    f = ConsistencyFunction(Wiggle().double(), path, t_min=0.0, sigma_data=sd)
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    s = path.sigma(t)
    c_skip, c_out, c_in = f.coefficients(t)
    torch.testing.assert_close(c_skip, sd**2 / (s**2 + sd**2))
    torch.testing.assert_close(c_out, s * sd / (s**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (s**2 + sd**2).sqrt())


def test_ddim_parameterisation_of_a_velocity_model_is_the_euler_jump_to_t_min():
    f = ConsistencyFunction(Wiggle().double(), LinearPath(), t_min=T_MIN, parameterisation="ddim")
    t = torch.tensor([0.002, 0.3, 1.0], dtype=torch.float64)
    c_skip, c_out, c_in = f.coefficients(t)
    torch.testing.assert_close(c_skip, torch.ones_like(t))
    torch.testing.assert_close(c_out, -(t - T_MIN))
    assert (c_in == 1).all()


@pytest.mark.parametrize("path", [LinearPath(), VPSDE()], ids=ids)
def test_gaussian_consistency_function_matches_an_accurate_ode_solve_with_the_exact_velocity(path):
    data = gaussian((1.0, -0.5), 0.7)
    v = oracle_velocity(data, path)
    x = 1.5 * torch.randn(300, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in (0.1, 0.5, 1.0):
        ode = exact_consistency_function(v, x, t, t_min=T_MIN, rtol=1e-9, atol=1e-9)
        closed = gaussian_consistency_function(data.means[0], 0.7, path, x, t, t_min=T_MIN)
        torch.testing.assert_close(ode, closed, rtol=0, atol=1e-6)


def test_mixture_oracle_is_self_consistent_and_lands_on_a_mode_unlike_the_denoiser():
    """f*(x_t, t) = f*(x_s, s) along one trajectory; at t = 1 f* ends on a mode (within a few component
    stds) while the denoiser E[x_0 | x_1] is the blur near the origin."""
    data, path = eight_gaussians(), LinearPath()
    v = oracle_velocity(data, path)
    x1 = torch.randn(200, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    from course.ode import solve_ode

    x_half = solve_ode(v, x1, 1.0, 0.5, rtol=1e-9, atol=1e-9).x
    f1 = exact_consistency_function(v, x1, 1.0, t_min=T_MIN, rtol=1e-9, atol=1e-9)
    f_half = exact_consistency_function(v, x_half, 0.5, t_min=T_MIN, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(f1, f_half, rtol=0, atol=1e-5)
    to_mode = torch.cdist(f1, data.means).min(1).values
    assert to_mode.mean() < 0.15, to_mode.mean()  # component std 0.1
    denoised = data.posterior_mean(x1, torch.ones(200, dtype=torch.float64), path)
    assert torch.cdist(denoised, data.means).min(1).values.mean() > 1.0
    with pytest.raises(ValueError, match="t_min"):
        exact_consistency_function(v, x1, 0.0, t_min=T_MIN)


class GaussianOracle(nn.Module):
    """The exact consistency function of Gaussian data as a model-like callable."""

    def __init__(self, mean, std, path, bias=0.0):
        super().__init__()
        self.mean, self.std, self.path, self.bias = mean, std, path, bias

    def forward(self, x, t, **cond):
        out = gaussian_consistency_function(self.mean, self.std, self.path, x, t, t_min=T_MIN)
        return out + self.bias * (t - T_MIN).reshape(-1, 1) * x


@pytest.mark.parametrize("path", [LinearPath(), VPSDE()], ids=ids)
def test_cd_loss_vanishes_for_the_exact_consistency_function_and_not_for_a_wrong_one(path):
    data, gen = gaussian((0.5, -1.0), 0.6), torch.Generator().manual_seed(3)
    v = oracle_velocity(data, path)
    x0 = data.sample(512, generator=gen).double()
    grid = consistency_grid(400)
    exact = GaussianOracle(data.means[0], 0.6, path)
    loss = consistency_distillation_loss(exact, exact, v, x0, grid, path=path, solver="heun", generator=gen)
    assert loss < 1e-9, loss
    wrong = GaussianOracle(data.means[0], 0.6, path, bias=0.3)
    assert consistency_distillation_loss(wrong, wrong, v, x0, grid, path=path, generator=gen) > 1e-6


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("shape", SHAPES)
def test_cd_and_ct_targets_carry_no_gradient(shape):
    """The gradient is that of d(f(x_{n+1}), const): identical whether the target is f itself or a frozen
    copy with the same weights, and a separate target network gets no gradient."""
    path, grid = LinearPath(), consistency_grid(10)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(4))

    def teacher(x, t):
        return -x

    for loss_of in (
        lambda f, tgt, g: consistency_distillation_loss(f, tgt, teacher, x0, grid, path=path, generator=g),
        lambda f, tgt, g: consistency_training_loss(f, x0, grid, path=path, f_target=tgt, generator=g),
    ):
        f = ConsistencyFunction(Wiggle(), path, t_min=T_MIN)
        loss_of(f, f, torch.Generator().manual_seed(5)).backward()
        self_target = _grads(f)
        f.zero_grad()
        frozen = EMATarget(f, mu=0.5)
        loss_of(f, frozen, torch.Generator().manual_seed(5)).backward()
        for a, b in zip(self_target, _grads(f), strict=True):
            torch.testing.assert_close(a, b)
            assert a.abs().sum() > 0
        assert all(p.grad is None for p in frozen.module.parameters())


def test_ema_target_update():
    f = ConsistencyFunction(Wiggle(), LinearPath(), t_min=T_MIN)
    tgt = EMATarget(f, mu=0.9)
    old = tgt.module.net.w.item()
    with torch.no_grad():
        f.net.w.add_(1.0)
    tgt.update(f)
    assert tgt.module.net.w.item() == pytest.approx(0.9 * old + 0.1 * f.net.w.item())
    with pytest.raises(ValueError, match="mu"):
        EMATarget(f, mu=1.0)


def test_consistency_grid():
    g = consistency_grid(18, t_min=T_MIN)
    assert g[0] == T_MIN and g[-1] == 1.0 and (g[1:] > g[:-1]).all() and len(g) == 18
    assert (g[1:-1] - (T_MIN ** (1 / 7) + torch.arange(1, 17, dtype=torch.float64) / 17 * (1 - T_MIN ** (1 / 7))) ** 7).abs().max() < 1e-12
    for bad in (dict(n=1), dict(n=5, t_min=0.0), dict(n=5, t_min=0.5, t_max=0.4)):
        with pytest.raises(ValueError):
            consistency_grid(**{"t_min": T_MIN, **bad})


def test_ct_curriculum_really_grows_to_s1():
    """The discretisation doubles every stage and reaches s1 + 1 in the last stage (a misplaced
    parenthesis that keeps N small fails this)."""
    total = 1000
    ns = [ct_num_steps(k, total) for k in range(total)]
    assert ns[0] == 11 and ns[-1] == 1281
    assert all(b >= a for a, b in zip(ns, ns[1:], strict=False))
    assert sorted(set(ns)) == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ct_num_steps(0, 10, s0=4, s1=4) == 5
    with pytest.raises(ValueError):
        ct_num_steps(-1, 10)
    with pytest.raises(ValueError):
        ct_num_steps(0, 10, s0=8, s1=4)


@pytest.mark.parametrize("path", [LinearPath(), VPSDE()], ids=ids)
def test_lognormal_step_probabilities_match_monte_carlo(path):
    grid = consistency_grid(12)
    probs = lognormal_step_probs(grid, path)
    assert probs.sum().item() == pytest.approx(1.0) and (probs >= 0).all()
    gen = torch.Generator().manual_seed(6)
    log_nsr = -1.1 + 2.0 * torch.randn(400_000, generator=gen, dtype=torch.float64)
    edges = -log_snr(path, grid)
    inside = (log_nsr >= edges[0]) & (log_nsr <= edges[-1])
    idx = torch.bucketize(log_nsr[inside], edges[1:-1])
    counts = torch.bincount(idx, minlength=len(probs)).double() / inside.sum()
    se = (probs * (1 - probs) / inside.sum()).sqrt()
    assert ((counts - probs).abs() <= 4 * se + 1e-12).all()


def test_pseudo_huber_limits():
    a = torch.zeros(3, 4)
    b = torch.tensor([[0.0] * 4, [1e-4, 0, 0, 0], [30.0, 40, 0, 0]])
    d = pseudo_huber(a, b, c=0.01)
    assert d[0] == 0
    assert d[1].item() == pytest.approx(1e-8 / (2 * 0.01), rel=1e-3)  # quadratic near zero
    assert d[2].item() == pytest.approx(50.0 - 0.01, rel=1e-6)  # linear far away
    assert pseudo_huber(a, b)[2].item() == pytest.approx(50.0 - 0.00054 * 2, rel=1e-6)  # c = 0.00054 sqrt(D)


def test_ode_step_orders():
    """Heun's local error on dx/dt = -x is O(h^3), Euler's O(h^2)."""
    x = torch.ones(1, 1, dtype=torch.float64)

    def v(x, t):
        return -x

    errs = {}
    for solver in ("euler", "heun"):
        errs[solver] = [abs(ode_step(v, x, torch.tensor([0.5]), torch.tensor([0.5 - h]), solver=solver).item()
                            - math.exp(h)) for h in (0.1, 0.05)]
    assert errs["euler"][0] / errs["euler"][1] == pytest.approx(4, rel=0.1)
    assert errs["heun"][0] / errs["heun"][1] == pytest.approx(8, rel=0.1)
    with pytest.raises(ValueError, match="solver"):
        ode_step(v, x, torch.tensor([0.5]), torch.tensor([0.4]), solver="rk4")


@pytest.mark.parametrize("path", [LinearPath(), VPSDE()], ids=ids)
def test_multistep_sampling_with_the_exact_function_keeps_the_data_distribution(path):
    mean, std = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.6
    f = GaussianOracle(mean, std, path)
    gen = torch.Generator().manual_seed(7)
    x1 = path.prior_sample((100_000, 2), generator=gen, dtype=torch.float64)
    a, s = (fn(torch.tensor(T_MIN, dtype=torch.float64)) for fn in (path.alpha, path.sigma))
    for ts in ([1.0], [1.0, 0.5], [1.0, 0.7, 0.3, 0.05]):
        x = sample_consistency(f, x1, torch.tensor(ts), path=path, t_min=T_MIN, generator=gen)
        se = 4 * math.sqrt(1 / 100_000)
        torch.testing.assert_close(x.mean(0), a * mean, rtol=0, atol=4 * se)
        torch.testing.assert_close(x.std(0), (a**2 * std**2 + s**2).sqrt().expand(2), rtol=0, atol=4 * se)


@pytest.mark.parametrize("shape", SHAPES)
def test_sample_consistency_shapes_determinism_and_bad_grids(shape):
    path = LinearPath()
    f = ConsistencyFunction(Wiggle(), path, t_min=T_MIN)
    x1 = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        one = sample_consistency(f, x1, torch.tensor([1.0]), path=path, t_min=T_MIN)
        assert torch.equal(one, f(x1, torch.ones(shape[0])))
        a, b = (sample_consistency(f, x1, torch.tensor([1.0, 0.4]), path=path, t_min=T_MIN,
                                   generator=torch.Generator().manual_seed(9)) for _ in range(2))
    assert a.shape == shape and torch.equal(a, b)
    for bad in ([], [0.5, 0.7], [1.0, T_MIN], [1.2], [[1.0]]):
        with pytest.raises(ValueError):
            sample_consistency(f, x1, torch.tensor(bad), path=path, t_min=T_MIN)


def test_bad_inputs_raise_value_errors():
    path = LinearPath()
    f = ConsistencyFunction(Wiggle(), path, t_min=0.01)
    x = torch.randn(4, 2)
    for t in (0.005, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"t_min, 1"):
            f(x, torch.full((4,), t))
    with pytest.raises(ValueError, match="parameterisation"):
        ConsistencyFunction(Wiggle(), path, parameterisation="karras")
    with pytest.raises(ValueError, match="prediction"):
        ConsistencyFunction(Wiggle(), path, parameterisation="ddim", prediction="noise")
    with pytest.raises(ValueError, match="increasing"):
        consistency_training_loss(f, x, torch.tensor([0.5, 0.2, 0.01]), path=path)
    with pytest.raises(ValueError, match="distance"):
        consistency_training_loss(f, x, consistency_grid(5, t_min=0.01), path=path, distance="l1")


def test_learned_ct_and_cd_losses_train_a_small_model_in_fast_mode():
    """A smoke test of the whole loop on 2-D points: both losses decrease under Adam."""
    data, path = eight_gaussians(), LinearPath()
    v = oracle_velocity(data, path)
    gen = torch.Generator().manual_seed(10)
    torch.manual_seed(0)
    f = ConsistencyFunction(TimeMLP(2, hidden=64, depth=2), path, t_min=T_MIN, sigma_data=2.0)
    target = EMATarget(f, mu=0.95)
    opt = torch.optim.Adam(f.parameters(), lr=2e-3)
    grid, losses = consistency_grid(18), []
    for _ in range(150):
        loss = consistency_distillation_loss(f, target, v, data.sample(256, generator=gen), grid, path=path,
                                             generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        target.update(f)
        losses.append(loss.item())
    assert sum(losses[-20:]) < sum(losses[:20])
