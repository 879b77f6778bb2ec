"""Chapter 10's modules: DiT with adaLN-Zero, micro-conditioning, FLOP counting, ControlNet's zero
convolutions, diffusion inpainting by replacement and PatchMatch (course/dit.py, controlnet.py,
inpainting.py, the U-Net's encoder and residuals)."""

import pytest
import torch
from torch import nn

from course.controlnet import ControlNet, edge_map, zero_conv
from course.dit import DiT, MicroConditioning, forward_gflops, positions_2d
from course.guidance import classifier_free_guidance
from course.inpainting import inpaint_replace, patchmatch, patchmatch_inpaint
from course.transformer import patchify, unpatchify
from course.unet import UNet


def _perturb(module, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# ---- DiT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels, size, patch", [(1, 28, 2), (1, 28, 4), (4, 7, 1), (3, 32, 4)])
def test_dit_is_exactly_zero_at_init_and_keeps_the_shape(channels, size, patch):
    torch.manual_seed(0)
    model = DiT(channels, size, patch, dim=32, depth=2, heads=4)
    x, t, y = torch.randn(3, channels, size, size), torch.rand(3), torch.tensor([0, 5, 10])
    out = model(x, t, y)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    for block in model.blocks:  # every block's modulation and the final layer start at zero
        assert torch.equal(block.ada[1].weight, torch.zeros_like(block.ada[1].weight))
        h = torch.randn(3, model.grid**2, 32)
        assert torch.equal(block(h, torch.randn(3, 32)), h)
    for layer in (model.final_ada[1], model.final):
        assert not layer.weight.any() and not layer.bias.any()
    # only the final layer moved: the output is no longer zero
    nn.init.normal_(model.final.weight, std=0.1)
    assert model(x, t, y).abs().sum() > 0


def test_patchify_round_trip_for_every_patch_size():
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    for p in (1, 2, 4, 7, 14, 28):
        tokens = patchify(x, p)
        assert tokens.shape == (2, (28 // p) ** 2, 3 * p * p)
        assert torch.equal(unpatchify(tokens, p, (3, 28, 28)), x)
    with pytest.raises(ValueError, match="divisible by the patch size 3"):
        patchify(x, 3)


def test_positions_2d_encode_rows_and_columns_separately():
    pos = positions_2d(4, 16).reshape(4, 4, 16)
    assert torch.allclose(pos[1, 0, :8], pos[1, 3, :8]) and torch.allclose(pos[0, 2, 8:], pos[3, 2, 8:])
    assert not torch.allclose(pos[1, 0, :8], pos[2, 0, :8])
    with pytest.raises(ValueError, match="divisible by 4"):
        positions_2d(4, 10)


def test_guidance_acts_on_every_channel_of_a_dit():
    """The reference forward_with_cfg guides channels 0-2 only; here each of 4 latent channels is
    (1 + w) cond - w uncond."""
    torch.manual_seed(0)
    model = _perturb(DiT(4, 8, 2, dim=32, depth=1), 0.1).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 7])
    w = 1.5
    with torch.no_grad():
        want = (1 + w) * model(x, t, y) - w * model(x, t, torch.full_like(y, 10))
        got = classifier_free_guidance(model, w, null_label=10)(x, t, y)
    assert torch.allclose(got, want, atol=1e-5)
    assert all(not torch.allclose(got[:, c], model(x, t, y)[:, c]) for c in range(4))


def test_dit_checks_its_input():
    model = DiT(1, 28, 4, dim=32, depth=1)
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 1, 28, 28\)"):
        model(torch.zeros(2, 1, 32, 32), torch.zeros(2))
    with pytest.raises(ValueError, match="divisible by the patch size"):
        DiT(1, 28, 3)
    with pytest.raises(ValueError, match="takes no size or crop"):
        model(torch.zeros(2, 1, 28, 28), torch.zeros(2), size=torch.ones(2), crop=torch.zeros(2, 2))


# ---- micro-conditioning ----------------------------------------------------------------------------
def test_micro_conditioning_rejects_out_of_range_sizes_and_crops():
    micro = MicroConditioning(16, max_size=28)
    assert micro(torch.tensor([28.0, 10.0]), torch.zeros(2, 2), 2).shape == (2, 16)
    with pytest.raises(ValueError, match=r"original sizes in \[1, 28\]"):
        micro(torch.tensor([29.0, 10.0]), torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match=r"original sizes in \[1, 28\]"):
        micro(torch.tensor([0.0, 10.0]), torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match=r"crop offsets in \[0, 28\)"):
        micro(torch.tensor([28.0, 10.0]), torch.tensor([[0.0, 0.0], [-1.0, 2.0]]), 2)
    with pytest.raises(ValueError, match=r"crop of shape \(2, 2\)"):
        micro(torch.tensor([28.0, 10.0]), torch.zeros(2), 2)
    model = DiT(1, 28, 4, dim=32, depth=1, micro=True)
    with pytest.raises(ValueError, match="micro-conditioned"):
        model(torch.zeros(2, 1, 28, 28), torch.zeros(2))
    model(torch.zeros(2, 1, 28, 28), torch.zeros(2), size=torch.full((2,), 28.0), crop=torch.zeros(2, 2))


# ---- FLOPs ------------------------------------------------------------------------------------------
def test_forward_gflops_counts_a_linear_map_exactly_and_grows_with_the_model():
    lin = nn.Linear(30, 20)
    assert forward_gflops(lin, torch.zeros(8, 30)) == pytest.approx(2 * 8 * 30 * 20 / 1e9)
    x, t = torch.zeros(1, 1, 28, 28), torch.zeros(1)
    small, deep = DiT(1, 28, 4, dim=32, depth=2), DiT(1, 28, 4, dim=32, depth=4)
    fine = DiT(1, 28, 2, dim=32, depth=2)
    g_small, g_deep, g_fine = (forward_gflops(m, x, t) for m in (small, deep, fine))
    assert g_small < g_deep < 2.2 * g_small and g_fine > 3.5 * g_small  # 4x the tokens: at least 4x the linear maps


# ---- ControlNet -------------------------------------------------------------------------------------
def _base():
    torch.manual_seed(0)
    return _perturb(UNet(1, channels=(16, 32, 32), num_classes=10, patch=2), 0.05).eval()


def test_controlnet_starts_as_the_base_model_bit_for_bit():
    base = _base()
    net = ControlNet(base)
    x, t, y = torch.randn(3, 1, 28, 28), torch.rand(3), torch.tensor([1, 4, 10])
    control = edge_map(torch.rand(3, 1, 28, 28) * 2 - 1)
    with torch.no_grad():
        assert torch.equal(net(x, t, y, control=control), base(x, t, y))
    for z in (*net.zero, net.hint[-1]):
        assert not z.weight.any() and not z.bias.any()
    assert torch.equal(zero_conv(4, 3)(torch.randn(1, 4, 5, 5)), torch.zeros(1, 3, 5, 5))


def test_controlnet_gradients_reach_the_copy_and_not_the_base():
    base = _base()
    net = ControlNet(base).train()
    x, t, y = torch.randn(4, 1, 28, 28), torch.rand(4), torch.tensor([1, 4, 7, 9])
    control = torch.randn(4, 1, 28, 28)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    loss = net(x, t, y, control=control).pow(2).mean()
    loss.backward()
    assert net.zero[0].weight.grad.abs().sum() > 0  # the zero convolutions learn first
    assert all(p.grad is None for p in net.base.parameters())
    opt.step()
    opt.zero_grad()
    net(x, t, y, control=control).pow(2).mean().backward()
    assert net.copy.down0.conv1.weight.grad.abs().sum() > 0  # one step later, through the moved zero convolutions
    assert not net.hint[0].weight.grad.any()  # the hint is two zero convolutions deep: not yet
    opt.step()
    opt.zero_grad()
    net(x, t, y, control=control).pow(2).mean().backward()
    assert net.hint[0].weight.grad.abs().sum() > 0
    assert not net.base.training
    with pytest.raises(ValueError, match=r"control image of shape \(4, 1, 28, 28\)"):
        net(x, t, y, control=torch.zeros(4, 1, 14, 14))


def test_edge_map_marks_the_outline_of_a_square():
    img = -torch.ones(1, 1, 10, 10)
    img[0, 0, 3:7, 3:7] = 1.0
    edges = edge_map(img)[0, 0] > 0
    assert edges[3, 3:7].all() and edges[2, 3:7].all() and not edges[5, 5] and not edges[0, 0]


# ---- inpainting ---------------------------------------------------------------------------------------
def _gaussian_velocity(m, s):
    """The exact velocity of the linear path for data N(m, s^2) independently per pixel."""
    def v(x, t):
        tt = t.reshape(-1, *([1] * (x.ndim - 1)))
        var = (1 - tt) ** 2 * s**2 + tt**2
        centred = x - (1 - tt) * m
        return tt / var * centred - (m + (1 - tt) * s**2 / var * centred)
    return v


@pytest.mark.parametrize("resample, jump", [(1, 1), (3, 1), (3, 10)])
def test_replacement_inpainting_keeps_the_known_pixels_and_samples_the_rest(resample, jump):
    g = torch.Generator().manual_seed(0)
    m, s = 0.5, 0.7
    x = m + s * torch.randn(4000, 1, 4, 4, generator=g, dtype=torch.float64)
    known = torch.zeros_like(x, dtype=torch.bool)
    known[..., :2, :] = True
    out = inpaint_replace(_gaussian_velocity(m, s), x, known, nfe=200, resample=resample, jump=jump, generator=g)
    assert torch.equal(out[known], x[known])
    filled = out[~known]  # pixels independent of the known ones: the marginal N(m, s^2), within 2 % (Euler, 200 steps)
    assert abs(filled.mean().item() - m) < 0.02 and abs(filled.std().item() / s - 1) < 0.02
    with pytest.raises(ValueError, match="boolean mask of the images' shape"):
        inpaint_replace(_gaussian_velocity(m, s), x, known.float())


def test_replacement_with_jumps_calls_the_model_nfe_times_resample_in_repeating_stretches():
    times = []

    def v(x, t):
        times.append(round(float(t[0]), 6))
        return torch.zeros_like(x)

    x, known = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    inpaint_replace(v, x, known, nfe=4, resample=2, jump=2)
    assert times == [1.0, 0.75, 1.0, 0.75, 0.5, 0.25, 0.5, 0.25]  # each stretch of 2 steps twice
    times.clear()
    inpaint_replace(v, x, known, nfe=3, resample=2, jump=1)
    assert times == [1.0, 1.0, 0.666667, 0.666667, 0.333333, 0.333333]
    with pytest.raises(ValueError, match="jump"):
        inpaint_replace(v, x, known, jump=0)


def test_patchmatch_finds_an_exactly_copied_region():
    """A 12 x 12 region of the target is a copy from the source: random search has to hit one of its
    64 patches once, propagation carries the match to the rest; every one ends at distance 0 at its
    copy's position, and the field is never worse than it started."""
    g = torch.Generator().manual_seed(0)
    source = torch.rand(1, 24, 24, generator=g, dtype=torch.float64)
    target = torch.rand(1, 24, 24, generator=g, dtype=torch.float64)
    target[:, 6:18, 8:20] = source[:, 10:22, 1:13]
    _, start = patchmatch(target, source, 5, iters=0, generator=torch.Generator().manual_seed(1))
    idx, dist = patchmatch(target, source, 5, iters=8, generator=torch.Generator().manual_seed(1))
    n = 24 - 5 + 1
    for r in range(6, 14):  # the 8 x 8 target patches inside the copied region
        for c in range(8, 16):
            p = r * n + c
            assert dist[p].item() == 0.0 and (idx[p] // n, idx[p] % n) == (r + 4, c - 7), (r, c)
    assert (dist <= start).all()


def test_patchmatch_inpainting_restores_a_periodic_texture_and_keeps_the_known_pixels():
    cols = torch.arange(24)
    stripes = torch.where((cols % 4) < 2, 1.0, -1.0).expand(24, 24)[None].double()
    known = torch.ones_like(stripes, dtype=torch.bool)
    known[:, 9:15, 9:15] = False
    out = patchmatch_inpaint(stripes, known, patch=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[known], stripes[known])
    assert (out - stripes).abs().max().item() < 1e-9
    hole_everywhere = torch.zeros_like(known)
    with pytest.raises(ValueError, match="no fully known"):
        patchmatch_inpaint(stripes, hole_everywhere)


# ---- the refiner ---------------------------------------------------------------------------------
def test_refined_velocity_hands_over_at_the_switch_time():
    from course.refiner import refined_velocity

    base, refiner = (lambda x, t: torch.ones_like(x)), (lambda x, t: -torch.ones_like(x))
    v = refined_velocity(base, refiner, 0.3)
    x, t = torch.zeros(4, 2), torch.tensor([0.9, 0.3, 0.29, 0.0])
    assert v(x, t)[:, 0].tolist() == [1.0, 1.0, -1.0, -1.0]
    assert v(x, torch.full((4,), 0.5)).eq(1).all() and v(x, torch.full((4,), 0.1)).eq(-1).all()


def test_low_noise_loss_only_sees_low_noise_levels():
    from course.paths import LinearPath
    from course.refiner import low_noise_cfm_loss

    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    low_noise_cfm_loss(model, torch.randn(5000, 2), LinearPath(), 0.25, generator=torch.Generator().manual_seed(0))
    t = seen[0]
    assert t.min() >= 0 and t.max() < 0.25 and abs(t.mean().item() - 0.125) < 0.005
    with pytest.raises(ValueError, match="0 < t_max"):
        low_noise_cfm_loss(model, torch.randn(5, 2), LinearPath(), 0.0)
