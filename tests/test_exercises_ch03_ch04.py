"""Chapter 03 and 04 checks, proven both ways: the solutions pass, the stubs and planted mistakes
fail with one clear line."""

import math

import pytest
import torch

from course.exercises import check
from course.fast_samplers import dpm_solver_1_step, log_snr
from course.utils import expand_like
from tests.exercise_harness import CODE_WORDS, assert_solutions_pass, assert_stubs_state_the_task
from tests.notebook_code import notebook_functions
from tests.test_exercises_ch01 import _assert_clean_failure

CHAPTERS = ["03_probability_flow", "04_fast_sampling"]
SOLUTIONS = {c: notebook_functions(f"solutions/{c}.ipynb") for c in CHAPTERS}
STUBS = {c: notebook_functions(f"exercises/{c}.ipynb") for c in CHAPTERS}


IDS = {"03_probability_flow": ["3.1", "3.2", "3.3"], "04_fast_sampling": ["4.1", "4.2"]}
NAMES = {"03_probability_flow": ("probability_flow_drift", "hutchinson_divergence", "ode_log_likelihood"),
         "04_fast_sampling": ("ddim_step", "dpm_solver_2_step")}


@pytest.mark.parametrize("chapter", CHAPTERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_solutions_pass(chapter, seed):
    assert_solutions_pass(chapter, SOLUTIONS[chapter], IDS[chapter], seed)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_stubs_fail_cleanly_and_state_the_task_not_the_code(chapter):
    assert_stubs_state_the_task(chapter, STUBS[chapter], NAMES[chapter], f"Exercise {IDS[chapter][0][0]}.",
                                CODE_WORDS)


def _g2(sde, t, x):
    return expand_like(sde.diffusion(t) ** 2, x)


PF_MISTAKES = {
    "reverse-sde": (lambda x, t, sde, s: sde.drift(x, t) - _g2(sde, t, x) * s(x, t), "reverse SDE"),
    "sign": (lambda x, t, sde, s: sde.drift(x, t) + 0.5 * _g2(sde, t, x) * s(x, t), "adds the score"),
    "no-f": (lambda x, t, sde, s: -0.5 * _g2(sde, t, x) * s(x, t), "forgets the drift"),
    "no-broadcast": (lambda x, t, sde, s: sde.drift(x, t) - 0.5 * sde.diffusion(t) ** 2 * s(x, t),
                     "expand_like"),
}


@pytest.mark.parametrize("name", PF_MISTAKES)
def test_pf_drift_mistakes(name):
    fn, words = PF_MISTAKES[name]
    _assert_clean_failure(check("3.1", fn, seed=0), words)


def _hutchinson(reduce="mean", use_probe_twice=True, normalise=False, exact=False):
    def estimate(velocity, x, t, probes):
        x = x.detach().requires_grad_(True)
        v = velocity(x, t)
        if exact:  # the trace itself, not the estimator
            flat = v.flatten(1)
            return torch.stack([torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0].flatten(1)[:, i]
                                for i in range(flat.shape[1])], 1).sum(1)
        vals = []
        for eps in probes:
            vjp = torch.autograd.grad(v, x, grad_outputs=eps, retain_graph=True)[0]
            val = (vjp * eps if use_probe_twice else vjp).flatten(1).sum(1)
            if normalise:  # eps^T J eps / (|eps|^2 / d): the same for Rademacher probes, wrong for Gaussian ones
                val = val / (eps.flatten(1).pow(2).sum(1) / eps[0].numel())
            vals.append(val)
        out = torch.stack(vals)
        if reduce == "sum":
            return out.sum(0)
        if reduce == "dim-mean":
            return out.mean(0) / x[0].numel()
        return out.mean(0)
    return estimate


@pytest.mark.parametrize("kwargs, words", [
    ({"reduce": "sum"}, "sums over the probes"),
    ({"reduce": "dim-mean"}, "divides by the number of dimensions"),
    ({"use_probe_twice": False}, "hutchinson_divergence"),
    ({"exact": True}, "returns the exact trace"),
    ({"normalise": True}, "Gaussian probe"),
])
def test_hutchinson_mistakes(kwargs, words):
    _assert_clean_failure(check("3.2", _hutchinson(**kwargs), seed=0), words)


def _e(v, x):
    return expand_like(v, x)


DDIM_MISTAKES = {
    "no-divide": (lambda x, e, at, st, as_, ss: _e(as_, x) * (x - _e(st, x) * e) + _e(ss, x) * e,
                  "divide by alpha_t"),
    "sigma-t": (lambda x, e, at, st, as_, ss: _e(as_, x) * (x - _e(st, x) * e) / _e(at, x) + _e(st, x) * e,
                "re-noises with sigma_t"),
    "plus": (lambda x, e, at, st, as_, ss: _e(as_, x) * (x + _e(st, x) * e) / _e(at, x) + _e(ss, x) * e,
             "x0 = (x - sigma_t eps_hat) / alpha_t"),
}


@pytest.mark.parametrize("name", DDIM_MISTAKES)
def test_ddim_mistakes(name):
    fn, words = DDIM_MISTAKES[name]
    _assert_clean_failure(check("4.1", fn, seed=0), words)


def _first_order(x, t, s, eps_fn, sde):
    return dpm_solver_1_step(x, t, s, eps_fn(x, torch.full((x.shape[0],), t, dtype=x.dtype)), sde)


def _linear_midpoint(x, t, s, eps_fn, sde):
    m = (t + s) / 2
    u = dpm_solver_1_step(x, t, m, eps_fn(x, torch.full((x.shape[0],), t, dtype=x.dtype)), sde)
    tt, ss = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    h = (log_snr(sde, ss) - log_snr(sde, tt)).item()
    return (sde.alpha(ss) / sde.alpha(tt)) * x - sde.sigma(ss) * math.expm1(h) * eps_fn(
        u, torch.full((x.shape[0],), m, dtype=x.dtype))


def _eps_at_x(x, t, s, eps_fn, sde):
    tt, ss = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    h = (log_snr(sde, ss) - log_snr(sde, tt)).item()
    return (sde.alpha(ss) / sde.alpha(tt)) * x - sde.sigma(ss) * math.expm1(h) * eps_fn(
        x, torch.full((x.shape[0],), (t + s) / 2, dtype=x.dtype))


@pytest.mark.parametrize("fn, words", [
    (_first_order, "first-order step"),
    (_linear_midpoint, "halfway in t"),
    (_eps_at_x, "dpm_solver_2_step"),
])
def test_dpm_solver_2_mistakes(fn, words):
    _assert_clean_failure(check("4.2", fn, seed=0), words)


# ---- 3.3 the likelihood integral ------------------------------------------------------------------
def _likelihood(kind):
    """A student's ode_log_likelihood, written out, with one planted mistake."""
    def ode_log_likelihood(x, velocity, divergence, prior_log_prob, ts):
        x0, total = x, torch.zeros(x.shape[0], dtype=x.dtype)
        grid = ts.tolist()
        for a, b in zip(grid[:-1], grid[1:], strict=True):
            t = torch.full((x.shape[0],), a, dtype=x.dtype)
            v = velocity(x, t)
            if kind == "late":
                x = x + v * (b - a)
                total = total + divergence(x, t) * (b - a)
                continue
            total = total + divergence(x, t) * (b - a)
            x = x - v * (b - a) if kind == "backwards" else x + v * (b - a)
        if kind == "minus":
            return prior_log_prob(x) - total
        if kind == "no-prior":
            return total
        if kind == "prior-at-data":
            return prior_log_prob(x0) + total
        if kind == "tuple":
            return prior_log_prob(x) + total, x
        if kind == "mean":
            return (prior_log_prob(x) + total).mean()
        return prior_log_prob(x) + total
    return ode_log_likelihood


@pytest.mark.parametrize("kind, words", [
    ("minus", "subtracts the divergence integral"),
    ("no-prior", "leaves out log p_1(x_1)"),
    ("prior-at-data", "evaluates the prior at the data point"),
    ("late", "evaluates the divergence after the Euler step"),
    ("backwards", "moves x against the velocity"),
    ("tuple", "returned a tuple"),
    ("mean", "returned shape ()"),
])
def test_likelihood_integral_mistakes(kind, words):
    _assert_clean_failure(check("3.3", _likelihood(kind), seed=0), words)


def test_likelihood_integral_converges_to_the_exact_density():
    """The answer the check accepts, on the mixture with the exact score, approaches the closed-form
    log p_{t_min} as the Euler grid is refined (first order: ten times the steps, about a tenth the error)."""
    from course.ode import exact_divergence
    from course.sde import VPSDE
    from course.toy_data import eight_gaussians, oracle_score

    sde, data = VPSDE(), eight_gaussians()
    score = oracle_score(data, sde)

    def velocity(x, t):
        return sde.probability_flow_drift(x, t, score)

    x = data.sample(6, generator=torch.Generator().manual_seed(0)).double()
    t_min = 1e-3
    exact = data.perturbed_log_prob(x, torch.full((6,), t_min, dtype=torch.float64), sde)
    errors = []
    for n in (50, 500):
        got = SOLUTIONS["03_probability_flow"]["ode_log_likelihood"](
            x, velocity, lambda x, t: exact_divergence(velocity, x, t)[1], sde.prior_logp,
            torch.linspace(t_min, 1.0, n + 1, dtype=torch.float64))
        errors.append((got - exact).abs().max().item())
    assert errors[1] < 0.06 and errors[1] < errors[0] / 5, errors
