"""course.autoregressive (MAR): the diffusion head's sampler against the exact conditional of
Gaussian data, temperature as a scale of the per-step noise only, the posterior step against
DDIM's, masking and the reveal schedule, and what the transformer can and cannot see."""

import math

import pytest
import torch

from course.autoregressive import (
    MAR,
    DiffusionHead,
    diffusion_loss,
    mar_loss,
    posterior_step,
    random_orders,
    reveal_schedule,
    sample_head,
    sample_mar,
    training_mask,
)
from course.fast_samplers import ddim_step
from course.paths import LinearPath
from course.sde import VPSDE

PATH = LinearPath()


class GaussianOracle:
    """The exact velocity of x ~ N(z, s^2 I) given z, on a Gaussian path."""

    def __init__(self, dim, s, path=PATH):
        self.token_dim, self.s, self.path = dim, s, path

    def __call__(self, x, t, z):
        a, sig = self.path.coefficients(t, x)
        da, dsig = self.path.derivatives(t, x)
        denom = a**2 * self.s**2 + sig**2
        x0 = z + a * self.s**2 * (x - a * z) / denom
        eps = sig * (x - a * z) / denom
        return da * x0 + dsig * eps


def test_the_head_sampler_with_the_exact_velocity_converges_to_the_exact_conditional():
    """Ancestral steps with the exact E[x0 | x_t] leave out the posterior variance of x0 within a
    step, so the spread is short by O(1 / steps): 5.5 % at 50 steps, under 1.5 % at 400."""
    z = torch.tensor([[2.0, -1.0]], dtype=torch.float64).repeat(40000, 1)
    errors = []
    for n in (50, 400):
        ts = torch.linspace(1, 0, n + 1, dtype=torch.float64)
        x = sample_head(GaussianOracle(2, 0.5), z, ts, path=PATH, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(x.mean(0), z[0], atol=0.01)  # 4 standard errors of 40 000 draws
        errors.append((x.std(0) / 0.5 - 1).abs().max().item())
    assert errors[1] < 0.015 and errors[0] > 2 * errors[1], errors


def test_temperature_scales_only_the_per_step_noise_and_diversity_rises_with_it():
    ts = torch.linspace(1, 0, 41, dtype=torch.float64)
    z = torch.zeros(4000, 2, dtype=torch.float64)
    x_init = PATH.prior_sample((4000, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stds = []
    for tau in (0.25, 0.5, 1.0, 1.5):
        x = sample_head(GaussianOracle(2, 1.0), z, ts, path=PATH, temperature=tau, x_init=x_init.clone(),
                        generator=torch.Generator().manual_seed(2))
        stds.append(x.std().item())
    assert stds == sorted(stds) and stds[0] < 0.8 * stds[2], stds
    # one step: the output is affine in tau with slope c z (there is no softmax to divide)
    x, x0, eps, noise = (torch.randn(5, 3, dtype=torch.float64) for _ in range(4))
    steps = [posterior_step(x, x0, eps, 0.6, 0.3, PATH, z=noise, temperature=tau) for tau in (0.5, 1.0, 2.0)]
    assert torch.allclose(steps[2] - steps[1], 2 * (steps[1] - steps[0]), atol=1e-12)
    with pytest.raises(ValueError, match="temperature > 0"):
        posterior_step(x, x0, eps, 0.6, 0.3, PATH, z=noise, temperature=0.0)


def test_the_posterior_step_equals_ddim_with_eta_one_and_starts_at_t_one_of_the_linear_path():
    sde = VPSDE()
    x, eps_hat, z = (torch.randn(6, 2, dtype=torch.float64) for _ in range(3))
    a, sig = sde.coefficients(0.7, x)
    x0_hat = (x - sig * eps_hat) / a
    for eta in (0.0, 0.5, 1.0):
        ours = posterior_step(x, x0_hat, eps_hat, 0.7, 0.4, sde, z=z, eta=eta)
        assert torch.allclose(ours, ddim_step(x, 0.7, 0.4, eps_hat, sde, eta=eta, z=z), atol=1e-12)
    out = posterior_step(x, x0_hat, eps_hat, 1.0, 0.9, PATH, z=z)  # alpha(1) = 0: x0 from the velocity
    assert torch.allclose(out, 0.1 * x0_hat + 0.9 * z, atol=1e-12)  # c = sigma_s there: all fresh noise
    same = posterior_step(x, x0_hat, eps_hat, torch.tensor([0.5] * 6), torch.tensor([0.5, 0.2] * 3), PATH, z=z)
    assert torch.equal(same[0::2], x[0::2])  # rows whose level does not move are left as they are


def test_reveal_schedule_counts_sum_to_the_tokens_and_grow_like_a_cosine():
    for n in (4, 16, 49, 256):
        for steps in range(1, min(n, 64) + 1):
            counts = reveal_schedule(n, steps)
            assert len(counts) == steps and sum(counts) == n and min(counts) >= 1, (n, steps, counts)
    assert reveal_schedule(49, 49) == [1] * 49
    counts = reveal_schedule(256, 8)
    assert counts == sorted(counts)  # the cosine reveals few tokens first and most at the end
    assert counts[0] == 256 - math.floor(256 * math.cos(math.pi / 16))
    with pytest.raises(ValueError, match="at most one step per token"):
        reveal_schedule(4, 5)


def test_training_masks_follow_the_truncated_normal_mask_ratio():
    mask = training_mask(4000, 1000, generator=torch.Generator().manual_seed(0))
    frac = mask.float().mean(1)
    assert frac.min() >= 0.7 and frac.max() <= 1.0
    # mean of N(1, 0.25^2) truncated to [0.7, 1]: 1 + 0.25 (phi(-1.2) - phi(0)) / (Phi(0) - Phi(-1.2))
    phi = lambda u: math.exp(-u * u / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    expected = 1 + 0.25 * (phi(-1.2) - phi(0)) / (0.5 - 0.5 * math.erfc(1.2 / math.sqrt(2)))
    assert abs(frac.mean().item() - expected) < 0.003, (frac.mean().item(), expected)
    orders = random_orders(50, 9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(orders.sort(1).values, torch.arange(9).expand(50, -1))


def _mar(order, **kw):
    torch.manual_seed(0)
    model = MAR(9, 3, dim=32, depth=2, heads=4, order=order, **kw)
    for p in model.transformer.parameters():
        p.data.normal_(0, 0.2)
    return model


def test_masked_tokens_are_invisible_and_raster_order_cannot_see_the_future():
    model = _mar("random")
    tokens = torch.randn(4, 9, 3)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[:, 5:] = True
    garbage = tokens.clone()
    garbage[:, 5:] = 100 * torch.randn(4, 4, 3)
    assert torch.equal(model.condition(tokens, mask), model.condition(garbage, mask))
    visible = tokens.clone()
    visible[:, 4] += 1.0  # an unmasked token: every position's z changes (bidirectional)
    assert (model.condition(visible, mask)[:, :4] - model.condition(tokens, mask)[:, :4]).abs().max() > 1e-4

    raster = _mar("raster")
    later = tokens.clone()
    later[:, 5:] = torch.randn(4, 4, 3)  # tokens 5.. may change z_6.. only: z_i sees tokens < i
    a, b = raster.condition(tokens), raster.condition(later)
    assert torch.equal(a[:, :6], b[:, :6]) and not torch.allclose(a[:, 6:], b[:, 6:])


def test_losses_have_a_gradient_path_to_the_transformer_and_the_head():
    for order in ("random", "raster"):
        model = _mar(order, num_classes=10)
        for block in model.head.blocks:  # the head's adaLN starts at zero: z gets gradients once it moves
            block.ada[1].weight.data.normal_(0, 0.1)
        loss = mar_loss(model, torch.randn(8, 9, 3), PATH, y=torch.randint(0, 10, (8,)),
                        generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert loss.item() > 0
        assert model.head.out.weight.grad.abs().max() > 0
        assert model.transformer.blocks[0].attn.qkv.weight.grad.abs().max() > 0
    head = DiffusionHead(2, 4)
    with pytest.raises(ValueError, match="one per token"):
        diffusion_loss(head, torch.randn(5, 2), torch.randn(4, 4), PATH)


def test_sample_mar_reveals_the_scheduled_number_of_tokens_per_step():
    model = _mar("random", num_classes=10)
    seen = []
    out = sample_mar(model, 3, steps=4, path=PATH, y=torch.tensor([1, 2, 3]), guidance=1.0, head_steps=3,
                     generator=torch.Generator().manual_seed(0), callback=lambda k, tok, mask: seen.append(mask))
    assert out.shape == (3, 9, 3) and torch.isfinite(out).all()
    left = [m.sum(1).tolist() for m in seen]
    counts = reveal_schedule(9, 4)
    assert left == [[9 - sum(counts[:k + 1])] * 3 for k in range(4)]
    assert not torch.equal(seen[0][0], seen[0][1])  # each row has its own random order
    raster = []
    sample_mar(_mar("raster"), 2, steps=9, path=PATH, head_steps=2, callback=lambda k, tok, m: raster.append(m))
    assert [m[0].tolist() for m in raster[:2]] == [[False] + [True] * 8, [False] * 2 + [True] * 7]


@pytest.mark.parametrize("call, message", [
    (lambda: sample_mar(_mar("raster"), 2, steps=4, path=PATH), "one token per step"),
    (lambda: sample_mar(_mar("random"), 2, steps=3, path=PATH, guidance=1.0), "class-conditional"),
    (lambda: sample_mar(_mar("random"), 2, steps=3, path=PATH, temperature=-1.0), "temperature > 0"),
    (lambda: _mar("random").condition(torch.zeros(2, 8, 3), torch.zeros(2, 8, dtype=torch.bool)),
     r"tokens of shape \(B, 9, 3\)"),
    (lambda: _mar("random").condition(torch.zeros(2, 9, 3)), "boolean mask"),
    (lambda: MAR(9, 3, order="spiral"), "unknown order"),
    (lambda: DiffusionHead(2, 4)(torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, 5)), r"z of shape \(3, 4\)"),
    (lambda: sample_head(DiffusionHead(2, 4), torch.zeros(3, 4), torch.linspace(1, 0, 3), path=PATH,
                         guidance=1.0), "z_null"),
])
def test_bad_input_names_what_was_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
