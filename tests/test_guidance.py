"""Guidance against exact posteriors of a labelled mixture: Bayes' rule for scores, classifier
guidance (score, DDIM and DDPM steps), classifier-free guidance for score, eps and velocity
models, and SDEdit's two limits."""

import pytest
import torch

from course.classifiers import ConvClassifier
from course.conversions import convert
from course.fast_samplers import ddim_step, sample_ddim
from course.guidance import (
    classifier_free_guidance,
    classifier_guided_ddim_step,
    classifier_guided_ddpm_step,
    classifier_guided_score,
    classifier_guided_velocity,
    classifier_log_prob_grad,
    sdedit,
)
from course.paths import LinearPath
from course.sde import VPSDE
from course.toy_data import two_class_mixture
from course.unet import UNet

PATH = VPSDE()
DATA = two_class_mixture()


def exact_classifier(x, t):
    return DATA.class_log_posterior(x, t, PATH)  # log-probabilities are valid logits


def exact_score(x, t, y=None):
    """Unconditional score, or the class-conditional one (y = 2 is the null class)."""
    if y is None:
        return DATA.perturbed_score(x, t, PATH)
    out = DATA.perturbed_score(x, t, PATH)
    for c in (0, 1):
        m = y == c
        if m.any():
            out[m] = DATA.condition(c).perturbed_score(x[m], t[m], PATH)
    return out


def _points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n,), generator=g)
    return x, t, y


def test_class_posterior_is_normalised_and_matches_bayes_rule():
    x, t, _ = _points()
    logp = DATA.class_log_posterior(x, t, PATH)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(64, dtype=torch.float64))
    # p(y | x) = p(x | y) p(y) / p(x), classes equally likely
    for c in (0, 1):
        direct = DATA.condition(c).perturbed_log_prob(x, t, PATH) + torch.log(torch.tensor(0.5)) \
            - DATA.perturbed_log_prob(x, t, PATH)
        torch.testing.assert_close(logp[:, c], direct.double())


def test_classifier_guidance_at_scale_one_is_the_conditional_score():
    x, t, y = _points()
    guided = classifier_guided_score(exact_score, exact_classifier, 1.0)(x, t, y)
    err = (guided - exact_score(x, t, y)).abs().max().item()
    assert err <= 1e-5, err
    # a larger scale moves further along the same direction
    g2 = classifier_guided_score(exact_score, exact_classifier, 3.0)(x, t, y)
    torch.testing.assert_close(g2 - exact_score(x, t), 3 * (guided - exact_score(x, t)))


def test_cfg_with_exact_scores_is_classifier_guidance_with_scale_one_plus_w():
    x, t, y = _points()
    for w in (0.0, 0.5, 2.0):
        cfg = classifier_free_guidance(exact_score, w, null_label=2)(x, t, y)
        cg = classifier_guided_score(exact_score, exact_classifier, 1.0 + w)(x, t, y)
        assert (cfg - cg).abs().max().item() <= 1e-5
    torch.testing.assert_close(classifier_free_guidance(exact_score, 0.0, null_label=2)(x, t, y),
                               exact_score(x, t, y))


@pytest.mark.parametrize("prediction", ["eps", "x0", "velocity"])
def test_cfg_is_the_same_for_every_prediction(prediction):
    x, t, y = _points()

    def model(xx, tt, y):  # the exact model, predicting `prediction`
        return convert(exact_score(xx, tt, y), "score", prediction, xx, tt, PATH)

    guided = classifier_free_guidance(model, 1.5, null_label=2)(x, t, y)
    expected = classifier_free_guidance(exact_score, 1.5, null_label=2)(x, t, y)
    torch.testing.assert_close(convert(guided, prediction, "score", x, t, PATH), expected)


def test_guided_ddim_step_is_ddim_with_the_conditional_noise():
    x, t, y = _points(16)
    tt, ss = 0.6, 0.4
    tv = torch.full((16,), tt, dtype=torch.float64)
    eps_u = convert(exact_score(x, tv), "score", "eps", x, tv, PATH)
    eps_c = convert(exact_score(x, tv, y), "score", "eps", x, tv, PATH)
    grad = classifier_log_prob_grad(exact_classifier, x, tv, y)
    out = classifier_guided_ddim_step(x, tt, ss, eps_u, grad, PATH, scale=1.0)
    torch.testing.assert_close(out, ddim_step(x, tt, ss, eps_c, PATH))


def test_guided_ddpm_step_shifts_the_mean_by_scale_sigma_grad():
    x, t, y = _points(16)
    tt, ss = 0.6, 0.4
    tv = torch.full((16,), tt, dtype=torch.float64)
    eps = convert(exact_score(x, tv), "score", "eps", x, tv, PATH)
    grad = classifier_log_prob_grad(exact_classifier, x, tv, y)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = classifier_guided_ddpm_step(x, tt, ss, eps, grad, PATH, scale=0.0, z=z)
    torch.testing.assert_close(plain, ddim_step(x, tt, ss, eps, PATH, eta=1.0, z=z))
    a_t, s_t = PATH.coefficients(tt, x)
    a_s, s_s = PATH.coefficients(ss, x)
    var = s_s**2 * (1 - (a_t * s_s / (a_s * s_t)) ** 2)
    guided = classifier_guided_ddpm_step(x, tt, ss, eps, grad, PATH, scale=2.0, z=z)
    torch.testing.assert_close(guided - plain, 2.0 * var * grad)


def test_wrappers_keep_shapes_and_dtypes_for_images():
    torch.manual_seed(0)
    x, t, y = torch.randn(3, 1, 28, 28), torch.rand(3), torch.tensor([1, 4, 7])
    noisy = ConvClassifier(time_conditional=True)
    with torch.no_grad():
        g = classifier_log_prob_grad(noisy, x, t, y)
    assert g.shape == x.shape and g.dtype == x.dtype and g.abs().sum() > 0
    unet = UNet(num_classes=10, patch=2)
    with torch.no_grad():
        out = classifier_free_guidance(unet, 2.0, null_label=10)(x, t, y)
    assert out.shape == x.shape and out.dtype == x.dtype
    with pytest.raises(ValueError, match="w >= 0"):
        classifier_free_guidance(unet, -0.5, null_label=10)
    with pytest.raises(ValueError, match="labels y of shape"):
        classifier_log_prob_grad(noisy, x, t, y[:2])


def test_sdedit_limits():
    g = torch.Generator().manual_seed(0)
    x = DATA.sample(256, generator=g).double()
    assert torch.equal(sdedit(sample_ddim, exact_score, x, 0.0, path=PATH, n_steps=10), x)
    # at t0 = 1 the input is forgotten: two very different inputs, the same noise, the same output
    # (exactly on the linear path, where alpha(1) = 0; to alpha(1) ~ 7e-3 on VP)
    lin = LinearPath()

    from course.flow_matching import oracle_velocity
    from course.ode import sample_flow_euler

    lin_velocity = oracle_velocity(DATA, lin)  # finite at t = 1, where alpha = 0

    def flow_sampler(model, x_init, ts, *, path):
        return sample_flow_euler(model, x_init, ts)

    a = sdedit(flow_sampler, lin_velocity, x, 1.0, path=lin, n_steps=20, generator=torch.Generator().manual_seed(1))
    b = sdedit(flow_sampler, lin_velocity, x + 10.0, 1.0, path=lin, n_steps=20,
               generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    c = sdedit(sample_ddim, exact_score, x, 1.0, path=PATH, n_steps=20, generator=torch.Generator().manual_seed(1))
    d = sdedit(sample_ddim, exact_score, x + 1.0, 1.0, path=PATH, n_steps=20, generator=torch.Generator().manual_seed(1))
    # on VP alpha(1) ~ 7e-3 remains: a point near the boundary between two modes may switch
    close = ((c - d).norm(dim=1) < 0.05).double().mean()
    assert close > 0.95, close
    # at a small t0 the output stays close to the input
    e = sdedit(sample_ddim, exact_score, x, 0.05, path=PATH, n_steps=10, generator=torch.Generator().manual_seed(2))
    assert (e - x).norm(dim=1).mean() < 0.2
    with pytest.raises(ValueError, match="t0 in"):
        sdedit(sample_ddim, exact_score, x, 1.5, path=PATH, n_steps=10)


def test_classifier_guided_velocity_is_the_conditional_velocity_at_scale_one():
    from course.flow_matching import oracle_velocity

    lin = LinearPath()
    x, t, y = _points()

    def exact_lin_classifier(xx, tt):
        return DATA.class_log_posterior(xx, tt, lin)

    guided = classifier_guided_velocity(oracle_velocity(DATA, lin), exact_lin_classifier, 1.0, lin)(x, t, y)
    expected = torch.stack([oracle_velocity(DATA.condition(int(c)), lin)(x[i:i + 1], t[i:i + 1])[0]
                            for i, c in enumerate(y)])
    assert (guided - expected).abs().max().item() <= 1e-5
    # at t = 1 (alpha = 0) no guidance is added and nothing becomes NaN
    ones = torch.ones(64, dtype=torch.float64)
    out = classifier_guided_velocity(oracle_velocity(DATA, lin), exact_lin_classifier, 3.0, lin)(x, ones, y)
    torch.testing.assert_close(out, oracle_velocity(DATA, lin)(x, ones))
