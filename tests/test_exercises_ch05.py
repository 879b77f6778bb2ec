"""Chapter 05 checks, proven both ways: the solutions pass, the stubs and planted mistakes fail
with one clear line."""

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from course.exercises import check, run_checks
from tests.notebook_code import notebook_functions
from tests.test_exercises_ch01 import _assert_clean_failure

CHAPTER = "05_flow_matching"
SOLUTION = notebook_functions(f"solutions/{CHAPTER}.ipynb")
STUB = notebook_functions(f"exercises/{CHAPTER}.ipynb")


@pytest.mark.parametrize("seed", [0, 1])
def test_solutions_pass(seed):
    results = run_checks(CHAPTER, SOLUTION, seed=seed)
    assert len(results) == 4 and all(r.passed for r in results), [str(r) for r in results]


def test_stubs_fail_cleanly():
    for r in run_checks(CHAPTER, STUB):
        assert r.status == "not attempted"
        _assert_clean_failure(r, "NotImplementedError")


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
