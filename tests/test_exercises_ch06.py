"""Chapter 06 checks, proven both ways: the solutions pass, the stubs and planted mistakes fail
with one clear line."""

import pytest
import torch

from course import expand_like
from course.exercises import check, run_checks
from tests.exercise_harness import CODE_WORDS, assert_stubs_state_the_task
from tests.notebook_code import notebook_functions
from tests.test_exercises_ch01 import _assert_clean_failure

CHAPTER = "06_guidance"
SOLUTION = notebook_functions(f"solutions/{CHAPTER}.ipynb")
STUB = notebook_functions(f"exercises/{CHAPTER}.ipynb")


@pytest.mark.parametrize("seed", [0, 1])
def test_solutions_pass(seed):
    results = run_checks(CHAPTER, SOLUTION, seed=seed)
    assert [r.exercise for r in results] == ["6.1", "6.2", "6.3", "6.4"]
    assert all(r.passed for r in results), [str(r) for r in results]


def test_stubs_fail_cleanly_and_state_the_task_not_the_code():
    assert_stubs_state_the_task(CHAPTER, STUB, ("cfg_combine", "guided_ddim_step", "sdedit", "guided_ddpm_step"),
                                "Exercise 6.", CODE_WORDS)


def _cfg(kind):
    def cfg_combine(model, x, t, y, w, null_label):
        null = torch.full_like(y, null_label)
        if kind == "int-null":
            return (1 + w) * model(x, t, y=y) - w * model(x, t, y=null_label)
        if kind == "positional":
            return (1 + w) * model(x, t, y) - w * model(x, t, null)
        c, u = model(x, t, y=y), model(x, t, y=null)
        return {
            "no-null": (1 + w) * c - w * model(x, t, y=y),
            "gamma": w * c + (1 - w) * u,
            "swapped": (1 + w) * u - w * c,
            "minus": (1 - w) * c + w * u,
            "uncond": u,
            "direction": w * (c - u),
            "float-w-only": c + w * (c - u) + 0.01,
        }[kind]
    return cfg_combine


@pytest.mark.parametrize("kind, words", [
    ("no-null", "needs y = null_label"),
    ("gamma", "the other convention"),
    ("swapped", "swaps the conditional and unconditional"),
    ("minus", "subtracts the guidance direction"),
    ("uncond", "unconditional prediction only"),
    ("direction", "only the guidance direction"),
    ("int-null", "int64 tensor of shape"),
    ("positional", "positional argument"),
    ("float-w-only", "max |error|"),
])
def test_cfg_combine_mistakes(kind, words):
    _assert_clean_failure(check("6.1", _cfg(kind), seed=0), words)


def _ddim(kind):
    def guided_ddim_step(x, eps_hat, grad, scale, alpha_t, sigma_t, alpha_s, sigma_s):
        a_t, s_t, a_s, s_s = (expand_like(v, x) for v in (alpha_t, sigma_t, alpha_s, sigma_s))
        shift = {"plus": -scale * s_t, "variance": scale * s_t**2, "no-sigma": scale, "sigma-s": scale * s_s,
                 "no-scale": s_t, "unguided": 0.0}.get(kind, scale * s_t)
        guided = eps_hat - shift * grad
        if kind == "direction-only":
            return a_s * (x - s_t * eps_hat) / a_t + s_s * guided
        if kind == "no-broadcast":
            return alpha_s * (x - sigma_t * guided) / alpha_t + sigma_s * guided
        return a_s * (x - s_t * guided) / a_t + s_s * guided
    return guided_ddim_step


@pytest.mark.parametrize("kind, words", [
    ("plus", "adds the gradient"),
    ("variance", "sigma_t^2"),
    ("no-sigma", "leaves out sigma_t"),
    ("sigma-s", "uses sigma_s"),
    ("no-scale", "leaves out the scale"),
    ("direction-only", "guides only the direction term"),
    ("unguided", "unguided DDIM step"),
    ("no-broadcast", "expand_like"),
])
def test_guided_ddim_step_mistakes(kind, words):
    _assert_clean_failure(check("6.2", _ddim(kind), seed=0), words)


def _sdedit(kind):
    def sdedit(velocity_fn, x, t0, n_steps, eps, path):
        b = x.shape[0]
        t_start = torch.full((b,), float(t0), dtype=x.dtype)
        a, s = expand_like(path.alpha(t_start), x), expand_like(path.sigma(t_start), x)
        start, n = {"no-alpha": (x + s * eps, n_steps), "noise": (eps, n_steps)}.get(kind, (a * x + s * eps, n_steps))
        first = 1.0 if kind in ("from-one", "noise") else t0
        n = n_steps - 1 if kind == "too-few" else n_steps + 1 if kind == "too-many" else n
        if kind == "no-denoise":
            return start
        ts = torch.linspace(first, 0.0, n + 1, dtype=x.dtype).tolist()
        for t, t_next in zip(ts[:-1], ts[1:], strict=True):
            t_eval = t_next if kind == "late" else t
            tt = t_eval if kind == "float-t" else torch.full((b,), t_eval, dtype=x.dtype)
            dt = (t - t_next) if kind == "forward" else (t_next - t)
            start = start + velocity_fn(start, tt) * dt
        return start
    return sdedit


@pytest.mark.parametrize("kind, words", [
    ("no-denoise", "without denoising"),
    ("no-alpha", "also scales x by alpha(t0)"),
    ("from-one", "integrates from t = 1"),
    ("noise", "starts from pure noise"),
    ("too-few", "need a grid of n_steps + 1 times"),
    ("too-many", "need a grid of n_steps + 1 times"),
    ("forward", "steps forward in time"),
    ("late", "end of each step"),
    ("float-t", "one time per sample"),
])
def test_sdedit_mistakes(kind, words):
    _assert_clean_failure(check("6.3", _sdedit(kind), seed=0), words)


def test_all_checks_through_the_notebook_runner():
    namespace = dict(SOLUTION)
    del namespace["sdedit"]
    results = run_checks(CHAPTER, namespace, seed=0)
    assert [r.status for r in results] == ["passed", "passed", "error", "passed"]
    assert "no function named sdedit" in results[2].message


# ---- 6.4 Algorithm 1 ------------------------------------------------------------------------------
def _ancestral(kind):
    """A student's guided_ddpm_step, written out, with one planted mistake."""
    def guided_ddpm_step(x, eps_hat, grad, scale, alpha_t, sigma_t, alpha_s, sigma_s, z):
        a_t, s_t, a_s, s_s = (expand_like(v, x) for v in (alpha_t, sigma_t, alpha_s, sigma_s))
        if kind == "eps-guided":
            eps_hat = eps_hat - scale * s_t * grad
        x0_hat = (x - s_t * eps_hat) / a_t
        var = (s_t**2 - (a_t / a_s) ** 2 * s_s**2) * s_s**2 / s_t**2
        mean = (a_t / a_s) * s_s**2 / s_t**2 * x + a_s * (s_t**2 - (a_t / a_s) ** 2 * s_s**2) / s_t**2 * x0_hat
        shift = {"no-sigma": scale * grad, "sigma-t": scale * s_t**2 * grad, "eps-guided": 0 * grad}.get(
            kind, scale * var * grad)
        noise = var * z if kind == "var-noise" else var.sqrt() * z
        if kind == "no-noise":
            noise = 0 * z
        return mean + shift + noise
    return guided_ddpm_step


def test_algorithm1_equals_the_library_step():
    """The check's reference (the DDPM posterior written out) equals course.guidance's Algorithm 1 step, whose
    mean comes from DDIM with eta = 1: the two forms of the same Gaussian."""
    from course.guidance import classifier_guided_ddpm_step
    from course.paths import LinearPath
    from course.sde import VPSDE

    gen = torch.Generator().manual_seed(0)
    for path in (LinearPath(sigma_min=0.02), VPSDE()):
        x, eps, grad, z = (torch.randn(8, 2, generator=gen, dtype=torch.float64) for _ in range(4))
        t, s = torch.full((8,), 0.7, dtype=torch.float64), torch.full((8,), 0.4, dtype=torch.float64)
        ours = SOLUTION["guided_ddpm_step"](x, eps, grad, 3.0, path.alpha(t), path.sigma(t), path.alpha(s),
                                            path.sigma(s), z)
        library = classifier_guided_ddpm_step(x, t, s, eps, grad, path, scale=3.0, z=z)
        torch.testing.assert_close(ours, library, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind, words", [
    ("no-sigma", "shifts the mean by scale * grad"),
    ("sigma-t", "sigma_t^2"),
    ("var-noise", "standard deviation sqrt(Sigma)"),
    ("no-noise", "adds no noise"),
    ("eps-guided", "like Algorithm 2"),
])
def test_algorithm1_mistakes(kind, words):
    _assert_clean_failure(check("6.4", _ancestral(kind), seed=0), words)


def test_a_written_out_algorithm1_passes():
    assert check("6.4", _ancestral("right"), seed=5).passed
