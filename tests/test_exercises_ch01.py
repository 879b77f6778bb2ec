"""Chapter 01 checks, proven both ways: the solution passes, the stub and planted mistakes fail
with one clear line."""

import math

import pytest
import torch

from course.exercises import check, get_exercise, run_checks
from course.sde import VPSDE
from course.utils import expand_like
from tests.exercise_harness import CODE_WORDS, _assert_clean_failure, assert_stubs_state_the_task
from tests.notebook_code import notebook_functions

CHAPTER = "01_forward_sdes"
SOLUTION = notebook_functions(f"solutions/{CHAPTER}.ipynb")
STUB = notebook_functions(f"exercises/{CHAPTER}.ipynb")




@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solution_passes_every_check(seed):
    results = run_checks(CHAPTER, SOLUTION, seed=seed)
    assert [r.exercise for r in results] == ["1.1", "1.2", "1.3"]
    assert all(r.passed for r in results), [str(r) for r in results]


def test_checks_use_fresh_random_inputs_when_unseeded():
    """Unseeded checks draw new parameters: a function hard-coding beta_min=0.1, beta_max=20 fails."""
    sde = VPSDE()

    def hard_coded(x, t, beta_min=0.1, beta_max=20.0):
        return sde.drift(x, t)

    result = check("1.1", hard_coded, SOLUTION["vp_diffusion"])
    _assert_clean_failure(result, "vp_drift")


def test_untouched_stubs_fail_cleanly():
    results = run_checks(CHAPTER, STUB)
    for r in results:
        assert r.status == "not attempted"
        _assert_clean_failure(r, "NotImplementedError")


def test_missing_function_is_reported():
    namespace = dict(SOLUTION)
    del namespace["vp_marginal"]
    result = run_checks(CHAPTER, namespace, seed=0)[2]
    _assert_clean_failure(result, "no function named vp_marginal")


def _beta(t, b0, b1):
    return b0 + t * (b1 - b0)


# ---- planted mistakes, each with the words the verdict must contain ------------------------
DRIFT_MISTAKES = {
    "sign": (lambda x, t, b0=0.1, b1=20.0: 0.5 * expand_like(_beta(t, b0, b1), x) * x, "wrong sign"),
    "half": (lambda x, t, b0=0.1, b1=20.0: -expand_like(_beta(t, b0, b1), x) * x, "factor -1/2"),
    "const": (lambda x, t, b0=0.1, b1=20.0: -0.5 * b0 * x, "constant beta_min"),
    "no-broadcast": (lambda x, t, b0=0.1, b1=20.0: -0.5 * _beta(t, b0, b1) * x, "expand_like"),
}
DIFFUSION_MISTAKES = {
    "beta": (lambda t, b0=0.1, b1=20.0: _beta(t, b0, b1), "square root"),
    "shape": (lambda t, b0=0.1, b1=20.0: torch.sqrt(_beta(t, b0, b1))[:, None], "returned shape"),
    "nan": (lambda t, b0=0.1, b1=20.0: torch.sqrt(_beta(t, b0, b1) - 100), "NaN"),
}


@pytest.mark.parametrize("name", DRIFT_MISTAKES)
def test_drift_mistakes_are_named(name):
    fn, words = DRIFT_MISTAKES[name]
    _assert_clean_failure(check("1.1", fn, SOLUTION["vp_diffusion"], seed=0), words)


@pytest.mark.parametrize("name", DIFFUSION_MISTAKES)
def test_diffusion_mistakes_are_named(name):
    fn, words = DIFFUSION_MISTAKES[name]
    _assert_clean_failure(check("1.1", SOLUTION["vp_drift"], fn, seed=0), "vp_diffusion", words)


def _g(diffusion, t, x):
    return expand_like(diffusion(t), x)


EM_MISTAKES = {
    "dt-noise": (lambda x, t, dt, f, g, z: x + f(x, t) * dt + _g(g, t, x) * dt * z, "sqrt(dt)"),
    "no-noise": (lambda x, t, dt, f, g, z: x + f(x, t) * dt, "forgets the noise"),
    "drift-sign": (lambda x, t, dt, f, g, z: x - f(x, t) * dt + _g(g, t, x) * math.sqrt(dt) * z,
                   "subtracts the drift"),
    "g-squared": (lambda x, t, dt, f, g, z: x + f(x, t) * dt + _g(g, t, x) ** 2 * math.sqrt(dt) * z,
                  "g(t)^2"),
    "in-place": (lambda x, t, dt, f, g, z: x.add_(f(x, t) * dt + _g(g, t, x) * math.sqrt(dt) * z),
                 "in place"),
    "hard-coded-vp": (lambda x, t, dt, f, g, z: x - 0.5 * expand_like(_beta(t, 0.1, 20.0), x) * x * dt
                      + _g(g, t, x) * math.sqrt(dt) * z, "euler_maruyama_step"),
}


@pytest.mark.parametrize("name", EM_MISTAKES)
def test_em_mistakes_are_named(name):
    fn, words = EM_MISTAKES[name]
    _assert_clean_failure(check("1.2", fn, seed=0), words)


def _alpha(t, b0, b1):
    return torch.exp(-0.5 * (b0 * t + 0.5 * (b1 - b0) * t**2))


MARGINAL_MISTAKES = {
    "variance": (lambda x, t, b0=0.1, b1=20.0: (expand_like(_alpha(t, b0, b1), x) * x,
                                                  1 - _alpha(t, b0, b1) ** 2), "variance"),
    "no-half": (lambda x, t, b0=0.1, b1=20.0: (expand_like(_alpha(t, b0, b1) ** 2, x) * x,
                                                 torch.sqrt(1 - _alpha(t, b0, b1) ** 2)), "exp(-B(t)/2)"),
    "beta-t": (lambda x, t, b0=0.1, b1=20.0: (
        expand_like(torch.exp(-0.5 * _beta(t, b0, b1) * t), x) * x,
        torch.sqrt(1 - torch.exp(-_beta(t, b0, b1) * t))), "integral"),
    "one-minus-alpha": (lambda x, t, b0=0.1, b1=20.0: (expand_like(_alpha(t, b0, b1), x) * x,
                                                         1 - _alpha(t, b0, b1)), "1 - alpha"),
    "not-a-pair": (lambda x, t, b0=0.1, b1=20.0: x, "expected a pair"),
}


@pytest.mark.parametrize("name", MARGINAL_MISTAKES)
def test_marginal_mistakes_are_named(name):
    fn, words = MARGINAL_MISTAKES[name]
    _assert_clean_failure(check("1.3", fn, seed=0), words)


def test_marginal_accepts_std_broadcast_like_x():
    def broadcast_std(x0, t, beta_min=0.1, beta_max=20.0):
        mean, std = SOLUTION["vp_marginal"](x0, t, beta_min, beta_max)
        return mean, expand_like(std, x0)

    assert check("1.3", broadcast_std, seed=0).passed


def test_other_exceptions_become_one_line_errors():
    def broken(x, t, beta_min=0.1, beta_max=20.0):
        return x @ torch.zeros(7, 7)

    result = check("1.1", broken, SOLUTION["vp_diffusion"], seed=0)
    assert result.status == "error"
    _assert_clean_failure(result, "vp_drift raised RuntimeError", "t=0.00", "(16, 2)")


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown exercise '9.9'"):
        get_exercise("9.9")
    with pytest.raises(ValueError, match=r"checks 2 function\(s\)"):
        check("1.1", SOLUTION["vp_drift"])
    with pytest.raises(ValueError, match="unknown chapter"):
        run_checks("99_nothing", {})


def test_stubs_state_the_task_not_the_code():
    assert_stubs_state_the_task(CHAPTER, STUB, ('vp_drift', 'vp_diffusion', 'euler_maruyama_step', 'vp_marginal'), "Exercise 1.", CODE_WORDS)
