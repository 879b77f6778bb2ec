"""course.diffusion_forcing: scheduling matrices, the pendulum against its closed forms, a causal
model that cannot see the future, the per-token noise levels of each training mode, and the
sampler's bookkeeping (context kept, levels walked to 0, stabilisation, sliding windows)."""

import math

import pytest
import torch
from scipy.special import ellipk

from course.diffusion_forcing import (
    CausalDenoiser,
    _noise_levels,
    diffusion_forcing_loss,
    pendulum_energy,
    pendulum_state,
    radius_error,
    sample_diffusion_forcing,
    scheduling_matrix,
    simulate_pendulum,
)
from course.paths import LinearPath

PATH = LinearPath()


@pytest.mark.parametrize("kind", ["full_sequence", "pyramid", "autoregressive"])
@pytest.mark.parametrize("horizon, steps", [(1, 1), (1, 7), (6, 4), (10, 20)])
def test_scheduling_matrices_run_from_noise_to_data_monotone_along_both_axes(kind, horizon, steps):
    k = scheduling_matrix(horizon, steps, kind)
    slope = {"full_sequence": 0, "pyramid": 1, "autoregressive": steps}[kind]
    assert k.shape == (steps + slope * (horizon - 1) + 1, horizon) and k.dtype == torch.int64
    assert (k[0] == steps).all() and (k[-1] == 0).all()
    assert (k[1:] <= k[:-1]).all()  # down a column the level never rises ...
    assert (k[:, 1:] >= k[:, :-1]).all()  # ... and along a row a later token is never cleaner
    assert ((k[:-1] - k[1:]) <= 1).all()  # one level per row: every token takes all `steps` steps
    if kind == "full_sequence":
        assert (k == k[:, :1]).all()
    if kind == "autoregressive":  # at most one token in flight at a time
        assert (((k > 0) & (k < steps)).sum(1) <= 1).all()


def test_pyramid_matrix_by_hand():
    assert scheduling_matrix(3, 2, "pyramid").tolist() == [[2, 2, 2], [1, 2, 2], [0, 1, 2], [0, 0, 1], [0, 0, 0]]


def test_the_pendulum_conserves_energy_and_matches_its_closed_forms():
    pos, states = simulate_pendulum(64, 40, generator=torch.Generator().manual_seed(0))
    energy = 0.5 * states[..., 1] ** 2 + (1 - torch.cos(states[..., 0]))
    assert (energy - energy[:, :1]).abs().max() < 1e-8
    assert radius_error(pos).max() < 1e-12
    assert energy.max() < 1.6 and (states[..., 0].abs() < math.pi).all()  # it swings, never loops
    # small swings: theta(t) = theta0 cos t + theta'0 sin t (omega0 = 1)
    start = torch.tensor([[1e-4, 2e-4]], dtype=torch.float64)
    t = 3.7
    got = pendulum_state(start, t)[0, 0]
    assert abs(got - (1e-4 * math.cos(t) + 2e-4 * math.sin(t))) < 1e-11
    # large swings: released at theta0 it is back at theta0 after the period 4 K(sin^2(theta0 / 2))
    theta0 = 2.0
    period = 4 * ellipk(math.sin(theta0 / 2) ** 2)
    back = pendulum_state(torch.tensor([[theta0, 0.0]], dtype=torch.float64), period, substeps=4000)
    assert abs(back[0, 0] - theta0) < 1e-8 and abs(back[0, 1]) < 1e-8
    # the energy read off positions by central differences converges to the true one
    fine_pos, fine_states = simulate_pendulum(8, 50, dt=0.01, generator=torch.Generator().manual_seed(1))
    true_e = 0.5 * fine_states[:, 0, 1] ** 2 + (1 - torch.cos(fine_states[:, 0, 0]))
    assert (pendulum_energy(fine_pos, 0.01) - true_e[:, None]).abs().max() < 1e-4


def _model(**kw):
    torch.manual_seed(0)
    model = CausalDenoiser(2, dim=32, depth=2, heads=4, max_len=12, **kw)
    for p in model.transformer.parameters():
        p.data.normal_(0, 0.2)
    return model


def test_the_causal_model_cannot_see_the_future_bit_for_bit():
    model = _model()
    x, t = torch.randn(3, 10, 2), torch.rand(3, 10)
    x2, t2 = x.clone(), t.clone()
    x2[:, 7:] = torch.randn(3, 3, 2)
    t2[:, 7:] = torch.rand(3, 3)
    a, b = model(x, t), model(x2, t2)
    assert torch.equal(a[:, :7], b[:, :7]) and not torch.allclose(a[:, 7:], b[:, 7:])
    t3 = t.clone()
    t3[:, 2] = 1 - t3[:, 2]  # a token's own noise level changes its output and later ones
    c = model(x, t3)
    assert torch.equal(a[:, :2], c[:, :2]) and not torch.allclose(a[:, 2], c[:, 2])


def test_each_training_mode_draws_its_own_noise_levels():
    gen = torch.Generator().manual_seed(0)
    t, counted = _noise_levels(2000, 8, "independent", gen, torch.float64, "cpu")
    assert counted.all() and abs(t.mean().item() - 0.5) < 0.01
    assert abs(torch.corrcoef(t[:, :2].T)[0, 1].item()) < 0.05  # independent across tokens
    t, counted = _noise_levels(50, 8, "full_sequence", gen, torch.float64, "cpu")
    assert counted.all() and (t == t[:, :1]).all()
    t, counted = _noise_levels(500, 8, "teacher_forcing", gen, torch.float64, "cpu")
    assert (counted.sum(1) == 1).all()
    k = counted.int().argmax(1)
    for row in range(500):
        assert (t[row, :k[row]] == 0).all() and (t[row, k[row] + 1:] == 1).all()
    assert set(k.tolist()) == set(range(8))
    model = _model()
    for mode in ("independent", "full_sequence", "teacher_forcing"):
        model.zero_grad()
        loss = diffusion_forcing_loss(model, torch.randn(6, 10, 2), PATH, mode=mode, generator=gen)
        loss.backward()
        assert loss.item() > 0 and model.inp.weight.grad.abs().max() > 0


class ConstantOracle(torch.nn.Module):
    """Predicts every clean token to be ``target`` and records the levels it is called with."""

    max_len = 8

    def __init__(self, target):
        super().__init__()
        self.target, self.calls = target, []

    def forward(self, x, t):
        self.calls.append(t.clone())
        a, sig = PATH.coefficients(t.reshape(-1), x.reshape(-1, 2))
        da, dsig = PATH.derivatives(t.reshape(-1), x.reshape(-1, 2))
        flat = x.reshape(-1, 2)
        x0 = self.target.expand_as(flat)
        eps = torch.where(sig > 0, (flat - a * x0) / torch.where(sig > 0, sig, 1.0), 0.0)
        return (da * x0 + dsig * eps).reshape(x.shape)


@pytest.mark.parametrize("schedule", ["full_sequence", "pyramid", "autoregressive"])
def test_the_sampler_keeps_the_context_walks_every_new_token_to_level_zero_and_slides_its_window(schedule):
    target = torch.tensor([0.3, -0.7], dtype=torch.float64)
    oracle = ConstantOracle(target)
    context = torch.randn(2, 3, 2, dtype=torch.float64)
    out = sample_diffusion_forcing(oracle, context, 13, path=PATH, steps=5, schedule=schedule, chunk=4,
                                   stabilization=0.1, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 16, 2)
    assert torch.equal(out[:, :3], context)
    assert torch.allclose(out[:, 3:], target.expand(2, 13, 2), atol=1e-12)
    rows = scheduling_matrix(4, 5, schedule).shape[0] - 1
    assert len(oracle.calls) == 3 * rows + (scheduling_matrix(1, 5, schedule).shape[0] - 1)  # 4 + 4 + 4 + 1 tokens
    first, last = oracle.calls[0], oracle.calls[-1]
    assert first.shape == (2, 7) and (first[:, :3] == 0).all()  # observed context: level 0
    assert last.shape == (2, 8)  # the window: 7 known tokens (all generated) and the last new one
    assert torch.allclose(last[:, :7], torch.full((2, 7), 0.1, dtype=torch.float64))  # stabilised


def test_guidance_pulls_the_new_tokens_toward_the_goal():
    oracle = ConstantOracle(torch.zeros(2, dtype=torch.float64))
    goal = torch.tensor([1.0, 1.0], dtype=torch.float64)
    context = torch.zeros(4, 2, 2, dtype=torch.float64)

    def cost(window):
        return (window[:, -1] - goal).pow(2).sum(-1)

    plain = sample_diffusion_forcing(oracle, context, 4, path=PATH, steps=10)
    guided = sample_diffusion_forcing(oracle, context, 4, path=PATH, steps=10, guidance=cost, guidance_scale=0.2)
    assert (guided[:, -1] - goal).norm(dim=-1).max() < (plain[:, -1] - goal).norm(dim=-1).min() - 0.1


@pytest.mark.parametrize("call, message", [
    (lambda: scheduling_matrix(0, 5), "horizon >= 1"),
    (lambda: scheduling_matrix(4, 5, "zigzag"), "unknown schedule"),
    (lambda: sample_diffusion_forcing(_model(), torch.zeros(1, 2, 2), 0, path=PATH), "horizon >= 1"),
    (lambda: sample_diffusion_forcing(_model(), torch.zeros(1, 12, 2), 3, path=PATH), "fewer context tokens"),
    (lambda: sample_diffusion_forcing(_model(), torch.zeros(1, 2, 2), 3, path=PATH, chunk=12), "chunk < window"),
    (lambda: sample_diffusion_forcing(_model(), torch.zeros(1, 2, 2), 3, path=PATH, stabilization=1.0),
     "stabilization in"),
    (lambda: _model()(torch.zeros(2, 5, 2), torch.zeros(2, 4)), r"t of shape \(2, 5\)"),
    (lambda: _model()(torch.zeros(2, 13, 2), torch.zeros(2, 13)), "T <= 12"),
    (lambda: _model()(torch.zeros(2, 5, 2), torch.full((2, 5), 1.5)), r"in \[0, 1\]"),
    (lambda: diffusion_forcing_loss(_model(), torch.zeros(2, 5, 2), PATH, mode="random"), "unknown noise mode"),
    (lambda: simulate_pendulum(2, 5, max_energy=2.5), "swinging pendulum"),
])
def test_bad_input_names_what_was_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_monotone_share_sorts_that_share_of_the_sequences_and_keeps_the_levels_uniform():
    t, _ = _noise_levels(4000, 6, "independent", torch.Generator().manual_seed(3), torch.float64, "cpu",
                         monotone_share=0.5)
    rising = (t[:, 1:] >= t[:, :-1]).all(1)
    assert abs(rising.double().mean().item() - (0.5 + 0.5 / 720)) < 0.03  # 1/6! of unsorted rows rise by chance
    assert abs(t.mean().item() - 0.5) < 0.01 and abs((t < 0.1).double().mean().item() - 0.1) < 0.01
    with pytest.raises(ValueError, match="monotone_share in"):
        diffusion_forcing_loss(_model(), torch.zeros(2, 5, 2), PATH, monotone_share=1.5)
