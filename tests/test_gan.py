"""Chapter 11's building blocks against closed forms: GAN losses, R1, the diffusion augmentation,
the adaptive T, the perceptual distance and its calibration, the 2AFC judge, ADD's distillation
loss and the Diffusion2GAN pair dataset."""

import math

import pytest
import torch
import torch.nn.functional as F

from course.adversarial import (
    STUDENT_TIMES,
    FeatureDiscriminator,
    Pairs,
    add_distillation_loss,
    diffusion2gan_loss,
    distillation_target,
    make_pairs,
    sample_student,
    student_inputs,
    student_x0,
)
from course.classifiers import ConvClassifier
from course.gan import (
    AdaptiveT,
    Discriminator,
    Generator,
    d_loss_hinge,
    d_loss_nonsaturating,
    diffuse_pair,
    g_loss_hinge,
    g_loss_nonsaturating,
    priority_times,
    r1_penalty,
    sample_generator,
)
from course.paths import LinearPath
from course.perceptual import (
    DISTORTIONS,
    PerceptualDistance,
    Triplets,
    calibrate,
    chamfer_distance,
    distort,
    layer_distances,
    make_triplets,
    multiscale,
    pixel_l2,
    ssim_distance,
    two_afc_agreement,
)

PATH = LinearPath()


# ---- GAN losses -------------------------------------------------------------------------------------
def test_gan_losses_match_hand_computed_values():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    expect_d = -(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean())
    assert d_loss_nonsaturating(real, fake).item() == pytest.approx(expect_d.item(), rel=1e-6)
    assert g_loss_nonsaturating(fake).item() == pytest.approx(-torch.log(sig(fake)).mean().item(), rel=1e-6)
    # hinge: relu(1 - 2) = 0, relu(1 + 1) = 2 -> mean 1; relu(1 + 0.5) = 1.5, relu(1 - 3) = 0 -> mean 0.75
    assert d_loss_hinge(real, fake).item() == pytest.approx(1.0 + 0.75)
    assert g_loss_hinge(fake).item() == pytest.approx(1.25)


def test_nonsaturating_generator_gradient_does_not_vanish_when_the_discriminator_wins():
    fake = torch.tensor([-8.0], requires_grad=True)  # D is sure the fake is fake
    g_loss_nonsaturating(fake).backward()
    saturating = torch.tensor([-8.0], requires_grad=True)
    torch.log(1 - torch.sigmoid(saturating)).mean().backward()  # minimax generator objective
    assert abs(fake.grad.item()) > 0.99 and abs(saturating.grad.item()) < 1e-3


def test_losses_reject_logits_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        d_loss_hinge(torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(ValueError, match="fake_logits"):
        g_loss_nonsaturating(torch.zeros(0))


def test_r1_penalty_of_a_quadratic_discriminator_is_its_closed_form():
    torch.manual_seed(0)
    a = torch.randn(5, 5, dtype=torch.float64)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    logits = torch.einsum("bi,ij,bj->b", x, a, x)  # D(x) = x^T A x, grad = (A + A^T) x
    gamma = 3.0
    expect = 0.5 * gamma * ((x.detach() @ (a + a.T).T) ** 2).sum(1).mean()
    got = r1_penalty(logits, x, gamma)
    assert got.item() == pytest.approx(expect.item(), rel=1e-12)
    # differentiable in the discriminator's parameters (create_graph)
    a_param = a.clone().requires_grad_(True)
    r1_penalty(torch.einsum("bi,ij,bj->b", x, a_param, x), x, gamma).backward()
    assert a_param.grad is not None and a_param.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(logits, x.detach())


# ---- Diffusion-GAN --------------------------------------------------------------------------------------
def test_priority_times_have_density_proportional_to_t():
    t = priority_times(200_000, 0.4, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(t.min()) >= 0 and float(t.max()) <= 0.4
    # density 2t / T^2 on [0, T]: mean 2T/3, P(t < T/2) = 1/4
    assert float(t.mean()) == pytest.approx(2 * 0.4 / 3, abs=2e-3)
    assert float((t < 0.2).double().mean()) == pytest.approx(0.25, abs=4e-3)
    with pytest.raises(ValueError, match="t_max"):
        priority_times(3, 1.5)


def test_diffuse_pair_uses_one_time_per_row_and_the_paths_marginals():
    n = 4000
    real = torch.full((n, 1, 4, 4), 0.8, dtype=torch.float64)
    fake = torch.full((n, 1, 4, 4), -0.5, dtype=torch.float64)
    y_real, y_fake, t = diffuse_pair(real, fake, 0.6, generator=torch.Generator().manual_seed(1))
    assert t.shape == (n,) and float(t.max()) <= 0.6
    # both are (1 - t) x + t eps with the same t per row: standardised residuals are N(0, 1)
    for x, y in ((real, y_real), (fake, y_fake)):
        z = (y - (1 - t)[:, None, None, None] * x) / t[:, None, None, None]
        assert float(z.mean()) == pytest.approx(0.0, abs=0.01)
        assert float(z.std()) == pytest.approx(1.0, abs=0.01)
    # independent noise for real and fake
    z_r = (y_real - (1 - t)[:, None, None, None] * real) / t[:, None, None, None]
    z_f = (y_fake - (1 - t)[:, None, None, None] * fake) / t[:, None, None, None]
    assert abs(float((z_r * z_f).mean())) < 0.02


def test_diffuse_pair_passes_gradients_to_the_fake_and_t_max_zero_is_the_plain_gan():
    real, fake = torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28, requires_grad=True)
    _, y_fake, t = diffuse_pair(real, fake, 0.3, generator=torch.Generator().manual_seed(0))
    y_fake.sum().backward()
    assert torch.allclose(fake.grad, (1 - t)[:, None, None, None].expand_as(fake))
    a, b, t0 = diffuse_pair(real, fake, 0.0)
    assert a is real and b is fake and torch.equal(t0, torch.zeros(8))
    with pytest.raises(ValueError, match="one shape"):
        diffuse_pair(real, torch.randn(8, 1, 14, 14), 0.3)


def test_adaptive_t_rises_while_the_discriminator_overfits_and_falls_back():
    ctl = AdaptiveT(lo=0.0, hi=0.5, target=0.6, step=0.1, interval=2)
    sure = torch.full((16,), 3.0)  # every real logit positive: r = 1 > 0.6
    for _ in range(6):
        ctl.observe(sure)
    assert ctl.history == pytest.approx([0.05, 0.10, 0.15])
    unsure = torch.tensor([1.0, -1.0] * 8)  # r = 0 < 0.6
    for _ in range(8):
        ctl.observe(unsure)
    assert ctl.t_max == 0.0 and ctl.p == 0.0  # clipped at lo
    for _ in range(40):
        ctl.observe(sure)
    assert ctl.t_max == pytest.approx(0.5)  # clipped at hi
    with pytest.raises(ValueError, match="lo <= hi"):
        AdaptiveT(lo=0.6, hi=0.5)


def test_generator_and_discriminator_shapes_and_errors():
    g = Generator(z_dim=16, width=16)
    with torch.no_grad():
        x = g(torch.randn(3, 16))
    assert x.shape == (3, 1, 28, 28) and float(x.abs().max()) <= 1
    d = Discriminator(width=8, num_classes=10)
    assert d(x, torch.rand(3), torch.tensor([1, 2, 3])).shape == (3,)
    with pytest.raises(ValueError, match="class-conditional"):
        d(x, torch.rand(3))
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        Discriminator(width=8)(torch.randn(2, 1, 14, 14))
    with pytest.raises(ValueError, match="unconditional"):
        g(torch.randn(3, 16), torch.tensor([0, 1, 2]))
    a = sample_generator(g, 5, rng=torch.Generator().manual_seed(0))
    b = sample_generator(g, 5, rng=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (5, 1, 28, 28)


# ---- the perceptual distance ------------------------------------------------------------------------
def _net():
    torch.manual_seed(0)
    return ConvClassifier(1, 10, width=8).eval()


def test_perceptual_distance_is_zero_on_identical_inputs_symmetric_and_non_negative():
    net = _net()
    dist = PerceptualDistance(net.feature_maps, [8, 16])
    a, b = torch.randn(6, 1, 28, 28).tanh(), torch.randn(6, 1, 28, 28).tanh()
    with torch.no_grad():
        assert torch.allclose(dist(a, a), torch.zeros(6), atol=1e-6)
        assert torch.allclose(dist(a, b), dist(b, a))
        assert bool((dist(a, b) > 0).all())


def test_perceptual_distance_is_invariant_to_scaling_a_layers_features():
    net = _net()

    def scaled(x):
        f1, f2 = net.feature_maps(x)
        return [7.5 * f1, 0.01 * f2]

    a, b = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        base = PerceptualDistance(net.feature_maps, [8, 16])(a, b)
        assert torch.allclose(PerceptualDistance(scaled, [8, 16])(a, b), base, rtol=1e-5)


def test_perceptual_distance_matches_its_formula_and_rejects_bad_weights():
    torch.manual_seed(1)
    fa, fb = [torch.randn(2, 3, 4, 4, dtype=torch.float64)], [torch.randn(2, 3, 4, 4, dtype=torch.float64)]
    w = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    na, nb = fa[0] / fa[0].norm(dim=1, keepdim=True), fb[0] / fb[0].norm(dim=1, keepdim=True)
    expect = (w[None, :, None, None] * (na - nb) ** 2).sum(1).mean((-2, -1))
    got = (layer_distances(fa, fb)[0] * w).sum(1)
    assert torch.allclose(got, expect, rtol=1e-10)
    with pytest.raises(ValueError, match="non-negative"):
        PerceptualDistance(_net().feature_maps, [8, 16], [torch.ones(8), -torch.ones(16)])
    with pytest.raises(ValueError, match="shapes"):
        PerceptualDistance(_net().feature_maps, [8, 16], [torch.ones(8)])


def test_calibration_finds_the_channel_that_carries_the_judgements():
    # features with 4 channels; the judge looks at channel 2 only: calibrated LPIPS must agree fully
    torch.manual_seed(0)
    n = 400

    def features(x):  # x (B, 4, 2, 2) is already a "feature map"
        return [x]

    ref, x0, x1 = torch.randn(n, 4, 2, 2), torch.randn(n, 4, 2, 2), torch.randn(n, 4, 2, 2)
    dist = PerceptualDistance(features, [4])
    per = [layer_distances([ref], [x])[0] for x in (x0, x1)]
    judge = (per[1][:, 2] < per[0][:, 2]).float()
    triplets = Triplets(ref, x0, x1, judge, (("a", "b"),) * n)
    before = two_afc_agreement(dist, triplets)
    losses = calibrate(dist, triplets, steps=400, lr=0.1)
    after = two_afc_agreement(dist, triplets)
    assert losses[-1] < losses[0] and after > 0.97 and after > before + 0.2
    w = dist.weights[0].detach()
    assert bool((w >= 0).all()) and int(w.argmax()) == 2


def test_multiscale_reads_the_block_averages_and_sees_past_the_receptive_field():
    # a 3 x 3 box filter (receptive field 3 px): after unit normalisation a one-channel map is 1
    # where the filter sees ink and 0 elsewhere, so d counts the positions seen by one image only
    box = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
    torch.nn.init.ones_(box.weight)

    def features(x):
        return [box(x)]

    point = torch.zeros(3, 1, 28, 28, dtype=torch.float64)
    point[:, 0, 10, 10] = 1.0
    moved = torch.zeros_like(point)
    moved[0, 0, 14, 10] = moved[1, 0, 16, 10] = moved[2, 0, 10, 10] = 1.0  # 4 px, 6 px, not at all
    two = multiscale(features, (1, 2))
    with torch.no_grad():
        maps = two(point)
        assert [m.shape for m in maps] == [(3, 1, 28, 28), (3, 1, 14, 14)]
        assert torch.equal(maps[1], box(torch.nn.functional.avg_pool2d(point, 2)))
        single = PerceptualDistance(features, [1])(point, moved)
        double = PerceptualDistance(two, [1, 1])(point, moved)
    # one scale: 4 and 6 px both leave the 3 x 3 field, 18 of 784 positions each
    assert torch.allclose(single, torch.tensor([18 / 784, 18 / 784, 0.0], dtype=torch.float64), atol=1e-12)
    # on 14 x 14 the point moves 2 and 3 blocks: the fields overlap on 3 positions, then not at all
    expect = torch.tensor([18 / 784 + 12 / 196, 18 / 784 + 18 / 196, 0.0], dtype=torch.float64)
    assert torch.allclose(double, expect, atol=1e-12)
    with pytest.raises(ValueError, match="divisible by the factor 3"):
        multiscale(features, (1, 3))(point)
    with pytest.raises(ValueError, match="distinct positive factors"):
        multiscale(features, (2, 2))
    with pytest.raises(ValueError, match="factors"):
        multiscale(features, (0,))


def test_pixel_l2_and_ssim_closed_forms():
    a, b = torch.full((1, 1, 9, 9), 0.2, dtype=torch.float64), torch.full((1, 1, 9, 9), -0.6, dtype=torch.float64)
    assert pixel_l2(a, b).item() == pytest.approx(0.64)
    # constant images: SSIM = (2 mu_a mu_b + c1) / (mu_a^2 + mu_b^2 + c1) on [0, 1]
    ma, mb, c1 = 0.6, 0.2, 0.01**2
    assert ssim_distance(a, b).item() == pytest.approx(1 - (2 * ma * mb + c1) / (ma**2 + mb**2 + c1), rel=1e-10)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert torch.allclose(ssim_distance(x, x), torch.zeros(3), atol=1e-5)


def test_chamfer_distance_counts_pixels_of_displacement():
    blank = torch.full((1, 1, 28, 28), -1.0)
    a, b = blank.clone(), blank.clone()
    a[0, 0, 10, 5:20] = 1.0  # a horizontal stroke
    b[0, 0, 13, 5:20] = 1.0  # the same stroke 3 pixels lower
    assert chamfer_distance(a, b).item() == pytest.approx(3.0)
    assert chamfer_distance(a, a).item() == 0.0
    assert chamfer_distance(a, blank).item() == pytest.approx(0.5 * math.hypot(28, 28))
    assert chamfer_distance(blank, blank).item() == 0.0
    # L2 says the shifted stroke is as far as a stroke moved anywhere; the chamfer distance grows with the shift
    c = blank.clone()
    c[0, 0, 11, 5:20] = 1.0
    assert chamfer_distance(a, c).item() == pytest.approx(1.0)
    assert pixel_l2(a, c).item() == pytest.approx(pixel_l2(a, b).item())
    # the ink is relative to the image's own range: a fainter stroke is the same drawing
    assert chamfer_distance(a, distort(a, "contrast", 0.7)).item() == 0.0
    assert pixel_l2(a, distort(a, "contrast", 0.7)).item() > 0


def test_distortions_keep_shape_and_range_and_reject_unknown_kinds():
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    for kind, (_, (_, hi)) in DISTORTIONS.items():
        out = distort(x, kind, hi, generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape and float(out.min()) >= -1 - 1e-5 and float(out.max()) <= 1 + 1e-5, kind
        assert not torch.equal(out, x), kind
    with pytest.raises(ValueError, match="unknown distortion"):
        distort(x, "swirl", 1.0)


def test_triplets_are_reproducible_and_respect_the_margin():
    imgs = torch.full((20, 1, 28, 28), -1.0)
    for i in range(20):
        imgs[i, 0, 6 + i % 8: 20, 12:15] = 1.0  # vertical bars of varying length
    a = make_triplets(imgs, 30, margin=0.3, generator=torch.Generator().manual_seed(5))
    b = make_triplets(imgs, 30, margin=0.3, generator=torch.Generator().manual_seed(5))
    assert len(a) == 30 and torch.equal(a.x0, b.x0) and torch.equal(a.judge, b.judge) and a.kinds == b.kinds
    d0, d1 = chamfer_distance(a.ref, a.x0), chamfer_distance(a.ref, a.x1)
    assert bool(((d0 - d1).abs() >= 0.3 * torch.maximum(d0, d1) - 1e-6).all())
    assert torch.equal(a.judge, (d1 < d0).float())
    assert two_afc_agreement(chamfer_distance, a) == 1.0  # the judge agrees with itself


# ---- ADD, LADD, Diffusion2GAN -------------------------------------------------------------------------
def _oracle(x0):
    """A velocity field that knows x0 exactly on the linear path: v = (x_t - x0) / t."""
    def v(x, t, **cond):
        return (x - x0) / t[:, None, None, None]
    return v


def test_student_x0_and_the_few_step_sampler_recover_an_exact_velocitys_target():
    x0 = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    x_s, s = student_inputs(x0, generator=torch.Generator().manual_seed(0))
    assert set(s.tolist()) <= set(STUDENT_TIMES)
    assert torch.allclose(student_x0(_oracle(x0), x_s, s), x0, atol=1e-12)
    noise = torch.randn_like(x0)
    for steps in (1, 2, 4):
        assert torch.allclose(sample_student(_oracle(x0), noise, steps=steps), x0, atol=1e-12)
    with pytest.raises(ValueError, match="steps"):
        sample_student(_oracle(x0), noise, steps=5)


def test_add_distillation_target_is_a_stop_gradient_and_its_loss_gradient_is_closed_form():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.1, 0.4, 0.7, 0.9], dtype=torch.float64)

    def teacher_x0(x_t, t, **cond):  # any differentiable function of its input
        return 0.5 * x_t.tanh()

    target = distillation_target(teacher_x0, x, t, generator=torch.Generator().manual_seed(1))
    assert not target.requires_grad
    loss = add_distillation_loss(x, target, t)
    loss.backward()
    c = (1 - t)[:, None, None, None]
    expect = 2 * c * (x.detach() - target) / (36 * 4)  # d/dx of mean_i c_i mean_j (x - target)^2
    assert torch.allclose(x.grad, expect, atol=1e-14)
    with pytest.raises(ValueError, match="without gradient"):
        add_distillation_loss(x, x * 1.0, t)
    with pytest.raises(ValueError, match="one shape"):
        add_distillation_loss(x, target[:, :, :3], t)


def test_feature_discriminator_projects_classes_and_conditions_on_time():
    net = _net()

    def feats(x, t, y):
        return net.feature_maps(x)

    disc = FeatureDiscriminator(feats, (8, 16), hidden=16, num_classes=10, time_conditional=True)
    x = torch.randn(3, 1, 28, 28)
    out = disc(x, torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 2]))
    assert out.shape == (3,)
    other = disc(x, torch.tensor([0.1, 0.5, 0.9]), torch.tensor([3, 4, 5]))
    assert not torch.allclose(out, other)
    with pytest.raises(ValueError, match="time-conditional"):
        disc(x, None, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="class-conditional"):
        disc(x, torch.rand(3))


def test_pair_dataset_is_reproducible_from_its_seed_and_checks_shapes():
    def velocity(x, t, y=None):  # an exact flow towards the constant image y / 10
        target = (y.to(x.dtype) / 10)[:, None, None, None].expand_as(x)
        return (x - target) / t[:, None, None, None]

    labels = torch.arange(6)
    a = make_pairs(velocity, labels, (1, 4, 4), nfe=5, seed=3, batch=4)
    b = make_pairs(velocity, labels, (1, 4, 4), nfe=5, seed=3, batch=4)
    c = make_pairs(velocity, labels, (1, 4, 4), nfe=5, seed=4, batch=4)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.images, b.images) and not torch.equal(a.noise, c.noise)
    # Euler on an exact straight-line field lands on the target
    assert torch.allclose(a.images, (labels.float() / 10)[:, None, None, None].expand(6, 1, 4, 4), atol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        Pairs(torch.zeros(3, 1, 4, 4), torch.zeros(3, 1, 5, 5), torch.zeros(3, dtype=torch.long))


def test_diffusion2gan_loss_adds_the_gan_term_and_rejects_bad_input():
    fake, target = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0])
    base = diffusion2gan_loss(fake, target, pixel_l2)
    assert base.item() == pytest.approx(pixel_l2(fake, target).mean().item())
    both = diffusion2gan_loss(fake, target, pixel_l2, logits, gan_weight=0.5)
    assert both.item() == pytest.approx(base.item() + 0.5 * F.softplus(-logits).mean().item())
    with pytest.raises(ValueError, match="logits"):
        diffusion2gan_loss(fake, target, pixel_l2, gan_weight=0.5)
    with pytest.raises(ValueError, match="gan_weight"):
        diffusion2gan_loss(fake, target, pixel_l2, logits, gan_weight=-1)
    with pytest.raises(ValueError, match="one shape"):
        diffusion2gan_loss(fake, target[:2], pixel_l2)


def test_unconditional_evaluation_sees_mode_collapse():
    from course.datasets import load_mnist
    from course.image_metrics import evaluate_unconditional
    from course.pretrained import load

    classifier = load("mnist_classifier")
    held = load_mnist("test", offline=True, verbose=False)
    real = held.per_class(60, generator=torch.Generator().manual_seed(7)).images[torch.randperm(600)]
    q = evaluate_unconditional(classifier, real, held, n_fd=200, generator=torch.Generator().manual_seed(1))
    assert q["classes_at_least_5_percent"] == 10 and abs(sum(q["class_shares"]) - 1) < 1e-3
    assert q["mnist_fd"] < 3 * q["mnist_fd_floor"] and 0.8 < q["diversity"] < 1.2
    ones = held.images[held.labels == 1][:100]  # a generator that only draws ones
    c = evaluate_unconditional(classifier, ones, held, n_fd=100, generator=torch.Generator().manual_seed(1))
    assert c["classes_at_least_5_percent"] == 1 and c["min_class_share"] == 0.0
    assert c["mnist_fd"] > 10 * q["mnist_fd"] and c["diversity"] < 0.8
    with pytest.raises(ValueError, match="divisible"):
        evaluate_unconditional(classifier, ones, held, n_fd=105)


def test_every_conv_feature_maps_include_the_stage_outputs():
    net = _net()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        stages, every = net.feature_maps(x), net.feature_maps(x, every_conv=True)
    assert [m.shape[1] for m in every] == [8, 8, 16, 16] and [m.shape[-1] for m in every] == [28, 28, 14, 14]
    assert torch.equal(every[1], stages[0]) and torch.equal(every[3], stages[1])
