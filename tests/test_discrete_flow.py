"""The jump process on a finite state space: exact marginals step by step, the generator's
structure, the learned posterior, and bad input."""

import math

import pytest
import torch

from course.discrete_flow import (
    PosteriorMLP,
    corrupt,
    discrete_fm_loss,
    exact_posterior,
    jump_rates,
    marginal,
    sample_jumps,
    total_variation,
)

K = 16


def target():
    q = torch.tensor([4.0 if i % 5 == 0 else 1.0 for i in range(K)], dtype=torch.float64)
    return q / q.sum()


def chi2_ok(x, p):
    """Pearson's X^2 of the histogram of ``x`` against ``p`` is within 5 SD of its mean K - 1."""
    counts = torch.bincount(x, minlength=len(p)).double()
    expected = len(x) * p
    x2 = ((counts - expected) ** 2 / expected).sum().item()
    return x2 < (len(p) - 1) + 5 * math.sqrt(2 * (len(p) - 1)), x2


def test_corrupt_samples_the_conditional_path():
    gen = torch.Generator().manual_seed(0)
    q = target()
    x0 = torch.multinomial(q, 200_000, replacement=True, generator=gen)
    for t in (0.0, 0.3, 1.0):
        ok, x2 = chi2_ok(corrupt(x0, t, K, generator=gen), marginal(q, t))
        assert ok, (t, x2)


def test_exact_euler_jumps_have_the_exact_marginal_after_every_step():
    """From x ~ p_t, jumping with probability h/t to a posterior draw gives exactly p_{t-h}."""
    gen = torch.Generator().manual_seed(1)
    q = target()
    n = 100_000
    x = torch.randint(0, K, (n,), generator=gen)
    grid = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.05, 0.0], dtype=torch.float64)
    states = []
    out = sample_jumps(exact_posterior(q), x, grid, generator=gen, callback=states.append)
    for step in states:
        ok, x2 = chi2_ok(step.x, marginal(q, step.t))
        assert ok, (step.t, x2)
    assert torch.equal(out, states[-1].x)
    # a wrong jump probability (h instead of h / t) visibly misses the data distribution
    wrong = exact_posterior(q)
    x = torch.randint(0, K, (n,), generator=gen)
    for t, s in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
        target_ = torch.multinomial(wrong(x, torch.full((n,), t, dtype=torch.float64)), 1, generator=gen)[:, 0]
        x = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < (t - s), target_, x)
    assert not chi2_ok(x, q)[0]


def test_jump_rates_form_a_generator_and_posterior_is_bayes_rule():
    q = target()
    x = torch.arange(K)
    post = exact_posterior(q)(x, torch.full((K,), 0.4, dtype=torch.float64))
    torch.testing.assert_close(post.sum(1), torch.ones(K, dtype=torch.float64))
    # Bayes: p(x0 = y | x) p_t(x) = q(y) p_t(x | y)
    p_t = marginal(q, 0.4)
    joint = q[None, :] * (0.4 / K + 0.6 * torch.eye(K, dtype=torch.float64))
    torch.testing.assert_close(post * p_t[:, None], joint)
    rates = jump_rates(post, x, 0.4)
    torch.testing.assert_close(rates.sum(1), torch.zeros(K, dtype=torch.float64), atol=1e-12, rtol=0)
    off = rates.masked_fill(torch.eye(K, dtype=torch.bool), 0)
    assert (off >= 0).all()


def test_learned_posterior_approaches_the_exact_one():
    """300 Adam steps of the discrete flow-matching loss (cross-entropy) bring the
    network's samples close to the target: TV to the target a small fraction of the uniform
    start's, and its loss within 0.05 nats of the exact posterior's (the loss's minimum)."""
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    side = 4
    q = target()
    model = PosteriorMLP(side, hidden=64, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    for _ in range(300):
        x0 = torch.multinomial(q, 1024, replacement=True, generator=gen)
        loss = discrete_fm_loss(model, x0, K, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    n = 20_000
    x = sample_jumps(model.posterior, torch.randint(0, K, (n,), generator=gen),
                     torch.linspace(1, 0, 21, dtype=torch.float64), generator=gen)
    tv_model = total_variation(x, q)
    tv_uniform = total_variation(torch.randint(0, K, (n,), generator=gen), q)
    tv_floor = total_variation(torch.multinomial(q, n, replacement=True, generator=gen), q)
    assert tv_model < 0.1 * tv_uniform, (tv_model, tv_uniform, tv_floor)
    # cross-entropy at the optimum is E[-log p(x_0 | x_t)] under the exact posterior
    x0 = torch.multinomial(q, 50_000, replacement=True, generator=gen)
    t = 1e-3 + (1 - 1e-3) * torch.rand(50_000, generator=gen)
    x_t = corrupt(x0, t.double(), K, generator=gen)
    exact = -torch.log(exact_posterior(q)(x_t, t.double())[torch.arange(50_000), x0]).mean()
    with torch.no_grad():
        learned = torch.nn.functional.cross_entropy(model(x_t, t), x0)
    assert 0 <= learned - exact < 0.05, (learned.item(), exact.item())


def test_bad_input():
    with pytest.raises(ValueError, match="integer states"):
        corrupt(torch.zeros(3), 0.5, K)
    with pytest.raises(ValueError, match=r"states in 0..15"):
        corrupt(torch.tensor([0, 16]), 0.5, K)
    with pytest.raises(ValueError, match="probability vector"):
        marginal(torch.tensor([0.5, 0.6]), 0.5)
    with pytest.raises(ValueError, match="decreasing"):
        sample_jumps(exact_posterior(target()), torch.zeros(3, dtype=torch.long), torch.tensor([0.0, 1.0]))
