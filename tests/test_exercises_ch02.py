"""Chapter 02 checks, proven both ways: the solution passes, the stub and planted mistakes fail
with one clear line."""

import math

import pytest
import torch

from course.exercises import check, run_checks
from course.utils import expand_like
from tests.exercise_harness import CODE_WORDS, assert_stubs_state_the_task
from tests.notebook_code import notebook_functions
from tests.test_exercises_ch01 import _assert_clean_failure

CHAPTER = "02_reverse_sde"
SOLUTION = notebook_functions(f"solutions/{CHAPTER}.ipynb")
STUB = notebook_functions(f"exercises/{CHAPTER}.ipynb")


@pytest.mark.parametrize("seed", [0, 1])
def test_solution_passes_every_check(seed):
    results = run_checks(CHAPTER, SOLUTION, seed=seed)
    assert [r.exercise for r in results] == ["2.1", "2.2", "2.3", "2.4"]
    assert all(r.passed for r in results), [str(r) for r in results]


def test_untouched_stubs_fail_cleanly():
    for r in run_checks(CHAPTER, STUB):
        assert r.status == "not attempted"
        _assert_clean_failure(r, "NotImplementedError")


def _xt(x0, t, eps, sde):
    return expand_like(sde.alpha(t), x0) * x0 + expand_like(sde.sigma(t), x0) * eps


def _sig(t, x, sde):
    return expand_like(sde.sigma(t), x)


DSM_MISTAKES = {
    "unweighted": (lambda s, x0, t, eps, sde: (s(_xt(x0, t, eps, sde), t) + eps / _sig(t, x0, sde))
                   .pow(2).mean(), "drops the weight"),
    "sign": (lambda s, x0, t, eps, sde: (_sig(t, x0, sde) * s(_xt(x0, t, eps, sde), t) - eps)
             .pow(2).mean(), "sign of the target"),
    "sum": (lambda s, x0, t, eps, sde: (_sig(t, x0, sde) * s(_xt(x0, t, eps, sde), t) + eps)
            .pow(2).flatten(1).sum(1).mean(), "sums over data dimensions"),
    "no-alpha": (lambda s, x0, t, eps, sde: (_sig(t, x0, sde) * s(x0 + _sig(t, x0, sde) * eps, t) + eps)
                 .pow(2).mean(), "forgets alpha"),
    "per-sample": (lambda s, x0, t, eps, sde: (_sig(t, x0, sde) * s(_xt(x0, t, eps, sde), t) + eps)
                   .pow(2).flatten(1).mean(1), "returned shape"),
    "from-item": (lambda s, x0, t, eps, sde: torch.tensor((_sig(t, x0, sde) * s(_xt(x0, t, eps, sde), t) + eps)
                                                          .pow(2).mean().item(), dtype=torch.float64),
                  "no gradient path"),
    "no-grad": (lambda s, x0, t, eps, sde: _under_no_grad(lambda: (_sig(t, x0, sde) * s(_xt(x0, t, eps, sde), t)
                                                                   + eps).pow(2).mean()), "no gradient path"),
    "detached-score": (lambda s, x0, t, eps, sde: (_sig(t, x0, sde) * s(_xt(x0, t, eps, sde), t).detach() + eps)
                       .pow(2).mean(), "no gradient path"),
}


def _under_no_grad(fn):
    with torch.no_grad():
        return fn()


@pytest.mark.parametrize("name", DSM_MISTAKES)
def test_dsm_mistakes_are_named(name):
    fn, words = DSM_MISTAKES[name]
    _assert_clean_failure(check("2.1", fn, seed=0), words)


def _fg(x, t, sde):
    return sde.drift(x, t), expand_like(sde.diffusion(t), x)


def _pf(x, t, dt, sde, s, z):
    f, g = _fg(x, t, sde)
    return x - (f - 0.5 * g**2 * s(x, t)) * dt + g * math.sqrt(dt) * z


def _forward(x, t, dt, sde, s, z):
    f, g = _fg(x, t, sde)
    return x + (f - g**2 * s(x, t)) * dt + g * math.sqrt(dt) * z


def _no_noise(x, t, dt, sde, s, z):
    f, g = _fg(x, t, sde)
    return x - (f - g**2 * s(x, t)) * dt


def _g_not_squared(x, t, dt, sde, s, z):
    f, g = _fg(x, t, sde)
    return x - (f - g * s(x, t)) * dt + g * math.sqrt(dt) * z


REVERSE_MISTAKES = {
    "pf-ode": (_pf, "probability-flow"),
    "forward": (_forward, "steps forward in time"),
    "no-noise": (_no_noise, "forgets the noise"),
    "g-not-squared": (_g_not_squared, "g(t) s instead of g(t)^2 s"),
}


@pytest.mark.parametrize("name", REVERSE_MISTAKES)
def test_reverse_em_mistakes_are_named(name):
    fn, words = REVERSE_MISTAKES[name]
    _assert_clean_failure(check("2.2", fn, seed=0), words)


def _langevin(eps_rule, noise_factor=2.0):
    def step(x, t, score_fn, z, snr):
        s = score_fn(x, t)
        eps = eps_rule(s, z, snr)
        return x + eps * s + torch.sqrt(noise_factor * eps) * z
    return step


def _per_sample(s, z, snr):
    ratio = z.flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1)
    return expand_like(2 * (snr * ratio) ** 2, s)


def _batch(s, z, snr, factor=2.0):
    return factor * (snr * z.flatten(1).norm(dim=1).mean() / s.flatten(1).norm(dim=1).mean()) ** 2


LANGEVIN_MISTAKES = {
    "per-sample": (_langevin(_per_sample), "per-sample norms"),
    "no-factor-2": (_langevin(lambda s, z, r: _batch(s, z, r, factor=1.0), noise_factor=2.0),
                    "langevin_corrector_step"),
    "sqrt-eps-noise": (_langevin(_batch, noise_factor=1.0), "sqrt(2 eps)"),
    "in-place": (lambda x, t, s, z, snr: x.add_(_batch(s(x, t), z, snr) * s(x, t)), "langevin_corrector_step"),
}


@pytest.mark.parametrize("name", LANGEVIN_MISTAKES)
def test_langevin_mistakes_are_named(name):
    fn, words = LANGEVIN_MISTAKES[name]
    _assert_clean_failure(check("2.3", fn, seed=0), words)


def _algorithm3(mistake):
    """The solution's loop with one planted mistake."""
    corrector = SOLUTION["langevin_corrector_step"]

    def sampler(score_fn, x_init, n_steps, sde, corrector_steps, snr, generator):
        t_min, dt, x = 1e-3, (1 - 1e-3) / n_steps, x_init
        steps = range(n_steps) if mistake == "forward loop" else range(n_steps - 1, -1, -1)
        for i in steps:
            t_next = torch.full((x.shape[0],), t_min + (1 - t_min) * (i + 1) / n_steps, dtype=x.dtype)
            t_i = torch.full((x.shape[0],), t_min + (1 - t_min) * i / n_steps, dtype=x.dtype)
            beta = expand_like(sde.beta(t_next) * dt, x)
            t_pred = t_i if mistake == "predictor time" else t_next
            if mistake == "em predictor":
                x = x - (sde.drift(x, t_pred) - beta / dt * score_fn(x, t_pred)) * dt
            else:
                x = (2 - torch.sqrt(1 - beta)) * x + beta * score_fn(x, t_pred)
            x = x + torch.sqrt(beta) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
            for _ in range(0 if mistake == "no corrector" else corrector_steps):
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
                x = corrector(x, t_next if mistake == "corrector time" else t_i, score_fn, z, snr)
        return x
    return sampler


@pytest.mark.parametrize("mistake, words", [
    ("predictor time", "s(x_{i+1}, t_{i+1})"),
    ("corrector time", "runs the corrector at t_{i+1}"),
    ("no corrector", "vp_pc_sampler"),
    ("forward loop", "vp_pc_sampler"),
    ("em predictor", "vp_pc_sampler"),
])
def test_algorithm3_mistakes_fail(mistake, words):
    _assert_clean_failure(check("2.4", _algorithm3(mistake), seed=0), words)


def test_algorithm3_with_reference_mistake_free_loop_passes():
    assert check("2.4", _algorithm3("none"), seed=0).passed


def test_stubs_state_the_task_not_the_code():
    assert_stubs_state_the_task(CHAPTER, STUB, ('dsm_loss', 'reverse_em_step', 'langevin_corrector_step', 'vp_pc_sampler'), "Exercise 2.", CODE_WORDS)
