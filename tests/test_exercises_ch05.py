"""Chapter 05 checks, proven both ways: the solutions pass, the stubs and planted mistakes fail
with one clear line."""

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from course.exercises import check, run_checks
from course.flow_matching import oracle_velocity
from course.nets import TimeMLP
from course.paths import LinearPath
from course.toy_data import GaussianMixture, eight_gaussians
from tests.exercise_harness import CODE_WORDS, assert_solutions_pass
from tests.notebook_code import notebook_functions
from tests.test_exercises_ch01 import _assert_clean_failure

CHAPTER = "05_flow_matching"
SOLUTION = notebook_functions(f"solutions/{CHAPTER}.ipynb")
STUB = notebook_functions(f"exercises/{CHAPTER}.ipynb")


def _near_exact_model(kind="good"):
    """A velocity "network" close to the exact field of the 8-mode mixture (the notebook trains a real one):
    it stands in for a well-trained model, and with one change for the ways a trained model goes wrong."""
    data, path = eight_gaussians(), LinearPath()
    exact = oracle_velocity(data, path)
    if kind == "seven-modes":
        keep = torch.arange(7)
        exact = oracle_velocity(GaussianMixture(data.means[keep], data.stds[keep]), path)

    def model(x, t):
        v = exact(x.double(), t.double()).float()
        if kind == "lipman":  # trained in Lipman's time: noise at t = 0
            v = -exact(x.double(), 1 - t.double()).float()
        if kind == "nan":
            v = v * float("nan")
        return v * 1.02 + 0.01 * torch.sin(3 * x)

    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_solutions_pass(seed):
    assert_solutions_pass(CHAPTER, {**SOLUTION, "velocity_model": _near_exact_model()},
                          ["5.1", "5.2", "5.3", "5.4", "5.5", "5.6"], seed)


def test_stubs_fail_cleanly_and_state_the_task_not_the_code():
    names = ("conditional_flow", "cfm_loss", "velocity_to_score", "score_to_velocity", "ot_pair",
             "marginal_velocity", "train_velocity_model")
    stub = {**STUB, "velocity_model": TimeMLP()}  # the stub's training cell raises before it trains anything
    results = run_checks(CHAPTER, {k: v for k, v in stub.items() if k != "velocity_model"})
    assert [r.status for r in results] == ["not attempted"] * 5 + ["error"]
    assert "velocity_model" in results[-1].message and "run its cell" in results[-1].message
    for name in names:
        with pytest.raises(NotImplementedError) as info:
            STUB[name](*([None] * STUB[name].__code__.co_argcount))
        assert str(info.value).startswith("Exercise 5.")
        for word in CODE_WORDS:
            assert word not in str(info.value), (name, word)
    _assert_clean_failure(check("5.6", stub["velocity_model"], seed=0), "x the floor", "train longer")


def _coef(path, t, x):
    return (*path.coefficients(t, x), *path.derivatives(t, x))


def _flow(kind):
    def conditional_flow(x0, eps, t, path):
        a, s, da, ds = _coef(path, t, x0)
        if kind == "rectified-only":
            return a * x0 + s * eps, eps - x0
        if kind == "lipman":
            return s * x0 + a * eps, x0 - eps
        if kind == "no-broadcast":
            return path.alpha(t) * x0 + path.sigma(t) * eps, da * x0 + ds * eps
        if kind == "not-tuple":
            return da * x0 + ds * eps
        return a * x0 + s * eps, x0 - eps  # "sign"
    return conditional_flow


@pytest.mark.parametrize("kind, words", [
    ("rectified-only", "sigma_min = 0 only"),
    ("lipman", "Lipman's convention"),
    ("sign", "Lipman's time"),
    ("no-broadcast", "expand_like"),
    ("not-tuple", "expected a tuple (x_t, u_t)"),
])
def test_conditional_flow_mistakes(kind, words):
    _assert_clean_failure(check("5.1", _flow(kind), seed=0), words)


def _loss(kind):
    flow = SOLUTION["conditional_flow"]

    def cfm_loss(model, x0, eps, t, path):
        x_t, u = flow(x0, eps, t, path)
        if kind == "sum":
            return (model(x_t, t) - u).pow(2).flatten(1).sum(1).mean()
        if kind == "x0-target":
            return (model(x_t, t) - x0).pow(2).mean()
        if kind == "eps-target":
            return (model(x_t, t) - eps).pow(2).mean()
        if kind == "at-x0":
            return (model(x0, t) - u).pow(2).mean()
        if kind == "from-item":
            return torch.tensor((model(x_t, t) - u).pow(2).mean().item(), dtype=x0.dtype)
        if kind == "no-grad":
            with torch.no_grad():
                return (model(x_t, t) - u).pow(2).mean()
        if kind == "half-detached":  # the right value, but only half of the batch carries a gradient
            err = (model(x_t, t) - u).pow(2)
            return torch.cat([err[: len(err) // 2], err[len(err) // 2:].detach()]).mean()
        return (model(x_t, t) - u).pow(2).flatten(1).mean(1)  # "per-sample"
    return cfm_loss


@pytest.mark.parametrize("kind, words", [
    ("sum", "sums over the 2 dimensions"),
    ("x0-target", "regresses onto x0"),
    ("eps-target", "noise-prediction"),
    ("at-x0", "evaluates the model at x0"),
    ("per-sample", "expected a scalar"),
    ("from-item", "no gradient path"),
    ("no-grad", "no gradient path"),
    ("half-detached", "its gradient with respect to the model's parameter"),
])
def test_cfm_loss_mistakes(kind, words):
    _assert_clean_failure(check("5.2", _loss(kind), seed=0), words)


def _conversions(kind):
    good_v2s, good_s2v = SOLUTION["velocity_to_score"], SOLUTION["score_to_velocity"]

    def velocity_to_score(v, x, t, path):
        a, s, da, ds = _coef(path, t, x)
        eps = (a * v - da * x) / (a * ds - da * s)
        if kind == "returns-eps":
            return eps
        if kind == "sigma2":
            return -eps / s**2
        return good_v2s(v, x, t, path)

    def score_to_velocity(score, x, t, path):
        a, s, da, ds = _coef(path, t, x)
        if kind == "no-x0-term":
            return ds * (-s * score)
        if kind == "eps-sign":
            eps = s * score
            return da * (x - s * eps) / a + ds * eps
        return good_s2v(score, x, t, path)

    return velocity_to_score, score_to_velocity


@pytest.mark.parametrize("kind, words", [
    ("returns-eps", "returns eps_hat"),
    ("sigma2", "divides by sigma^2"),
    ("no-x0-term", "forgets the alpha' x0_hat term"),
    ("eps-sign", "eps_hat = +sigma * score"),
])
def test_velocity_score_mistakes(kind, words):
    _assert_clean_failure(check("5.3", *_conversions(kind), seed=0), words)


def _pair(kind):
    def ot_pair(x0, eps):
        if kind == "identity":
            return eps
        if kind == "distance":
            _, cols = linear_sum_assignment(torch.cdist(x0.flatten(1), eps.flatten(1)).numpy())
            return eps[torch.as_tensor(cols)]
        if kind == "x0":
            return x0
        if kind == "sort-by-norm":
            order_x = x0.flatten(1).norm(dim=1).argsort()
            order_e = eps.flatten(1).norm(dim=1).argsort()
            out = torch.empty_like(eps)
            out[order_x] = eps[order_e]
            return out
        return eps[:-1]  # "drops-one"
    return ot_pair


@pytest.mark.parametrize("kind, words", [
    ("identity", "independent coupling"),
    ("distance", "squared distance"),
    ("x0", "returned x0"),
    ("sort-by-norm", "not the optimal one"),
    ("drops-one", "expected eps reordered"),
])
def test_ot_pair_mistakes(kind, words):
    _assert_clean_failure(check("5.4", _pair(kind), seed=0), words)


# ---- 5.5 the marginal velocity of a mixture ----------------------------------------------------
def _marginal(kind):
    """A student's marginal_velocity, written out, with one planted mistake."""
    def marginal_velocity(x, t, means, stds, weights, path):
        a, s = path.alpha(t)[:, None, None], path.sigma(t)[:, None, None]
        da, ds = path.d_alpha(t)[:, None, None], path.d_sigma(t)[:, None, None]
        sd = torch.zeros_like(stds) if kind == "points" else stds
        var = a**2 * sd[None, :, None] ** 2 + s**2
        diff = x[:, None, :] - a * means[None]
        logits = torch.log(weights) - 0.5 * (diff**2).sum(-1) / var[..., 0] - 0.5 * x.shape[1] * torch.log(var[..., 0])
        r = weights.expand(x.shape[0], -1) if kind == "prior" else torch.softmax(logits, dim=1)
        x0_hat = (r[..., None] * (means[None] + a * sd[None, :, None] ** 2 / var * diff)).sum(1)
        if kind == "through-sigma":  # E[eps | x] = (x - alpha E[x0 | x]) / sigma: 0/0 where sigma = 0
            return da[:, 0] * x0_hat + ds[:, 0] * (x - a[:, 0] * x0_hat) / s[:, 0]
        eps_hat = (r[..., None] * (s / var * diff)).sum(1)
        if kind == "conditional":  # the conditional velocity at the most likely component's mean
            return da[:, 0] * means[r.argmax(1)] + ds[:, 0] * eps_hat
        return da[:, 0] * x0_hat + ds[:, 0] * eps_hat
    return marginal_velocity


def test_a_written_out_marginal_velocity_passes():
    assert check("5.5", _marginal("right"), seed=3).passed


@pytest.mark.parametrize("kind, words", [
    ("prior", "weights the components by the mixture weights"),
    ("points", "treats each component as a point"),
    ("through-sigma", "0/0 where sigma = 0"),
    ("conditional", "at t=0.00"),
])
def test_marginal_velocity_mistakes(kind, words):
    _assert_clean_failure(check("5.5", _marginal(kind), seed=0), words)


# ---- 5.6 a measured training run ---------------------------------------------------------------
def test_an_undertrained_network_fails_with_its_numbers():
    data, path = eight_gaussians(), LinearPath()
    model, gen = TimeMLP(), torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        x0 = data.sample(256, generator=gen)
        eps, t = torch.randn(x0.shape, generator=gen), torch.rand(256, generator=gen)
        loss = SOLUTION["cfm_loss"](model, x0, eps, t, path)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    _assert_clean_failure(check("5.6", model, seed=0), "your model reaches MMD", "x its noise floor", "train longer")


@pytest.mark.parametrize("kind, words", [
    ("seven-modes", "mode-weight error"),
    ("lipman", "time convention"),
    ("nan", "NaN or inf"),
])
def test_a_measured_model_that_misses_fails(kind, words):
    _assert_clean_failure(check("5.6", _near_exact_model(kind), seed=0), words)


def test_the_exact_velocity_is_not_a_trained_network():
    exact = oracle_velocity(eight_gaussians(), LinearPath())
    _assert_clean_failure(check("5.6", lambda x, t: exact(x.double(), t.double()).float(), seed=0),
                          "is the exact velocity")


def test_a_model_with_the_wrong_output_shape_is_named():
    _assert_clean_failure(check("5.6", lambda x, t: x[:, :1], seed=0), "expected a velocity per point")
