"""Chapter 07 checks, proven both ways: the solutions pass (in float64 and computed in float32),
the stubs, the course's own functions and planted mistakes fail with one clear line."""

import pytest
import torch

from course import expand_like
from course.consistency import sample_consistency
from course.distillation import progressive_distillation_target
from course.exercises import check, run_checks
from tests.notebook_code import notebook_functions
from tests.test_exercises_ch01 import _assert_clean_failure

CHAPTER = "07_distillation_consistency"
SOLUTION = notebook_functions(f"solutions/{CHAPTER}.ipynb")
STUB = notebook_functions(f"exercises/{CHAPTER}.ipynb")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solutions_pass(seed):
    results = run_checks(CHAPTER, SOLUTION, seed=seed)
    assert [r.exercise for r in results] == ["7.1", "7.2", "7.3", "7.4"]
    assert all(r.passed for r in results), [str(r) for r in results]


def test_stubs_fail_cleanly():
    for r in run_checks(CHAPTER, STUB):
        assert r.status == "not attempted"
        _assert_clean_failure(r, "NotImplementedError")


def test_stub_messages_state_the_task_not_the_code():
    for name in ("two_step_target", "skip_coefficients", "cd_loss", "multistep_consistency"):
        with pytest.raises(NotImplementedError) as info:
            STUB[name](*([None] * STUB[name].__code__.co_argcount))
        text = str(info.value)
        assert text.startswith("Exercise 7.")
        for code_word in ("torch.", "expand_like", "clamp", "no_grad", "path.", "(x", "sqrt("):
            assert code_word not in text, (name, code_word, text)


def test_the_course_functions_are_not_answers():
    r = check("7.1", progressive_distillation_target, seed=0)
    _assert_clean_failure(r, "course's own reference")
    _assert_clean_failure(check("7.4", sample_consistency, seed=0), "course's own reference")


def _float32(fn):
    """The solution run in float32: its inputs cast down, its output returned in float32."""
    def cast(v):
        return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    def wrapped(*args):
        args = [[cast(a) for a in arg] if isinstance(arg, list) else cast(arg) for arg in args]
        out = fn(*args)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
    return wrapped


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("exercise, name", [("7.1", "two_step_target"), ("7.2", "skip_coefficients"),
                                            ("7.4", "multistep_consistency")])
def test_a_float32_answer_passes_every_seed(exercise, name, seed):
    def model_in_float32(fn):  # the models of the checks are float64; the student's tensors are float32
        def call(x, t):
            return fn(x.double(), t.double()).float()
        return call

    solution = SOLUTION[name]
    if name == "two_step_target":
        def answer(teacher_eps, z, *rest):
            return _float32(solution)(model_in_float32(teacher_eps), z, *rest)
    elif name == "multistep_consistency":
        def answer(f, x, times, noises, t_min, path):
            return _float32(solution)(model_in_float32(f), x, times, noises, t_min, path)
    else:
        answer = _float32(solution)
    r = check(exercise, answer, seed=seed)
    assert r.passed, str(r)


# ---- 7.1 -----------------------------------------------------------------------------------------
def _target(kind):
    def two_step_target(teacher_eps, z, t, t_mid, t_end, path):
        def eps_at(x, s):
            return teacher_eps(x, s if kind == "float-t" else torch.full((x.shape[0],), s, dtype=x.dtype))

        def ddim(x, a, b, eps):
            (al_a, si_a), (al_b, si_b) = path.coefficients(a, x), path.coefficients(b, x)
            return al_b * (x - si_a * eps) / al_a + si_b * eps

        def x0(x, s, eps):
            a, sig = path.coefficients(s, x)
            return (x - sig * eps) / a

        eps_t = eps_at(z, t)
        if kind == "x-hat":
            return x0(z, t, eps_t)
        first, second = (t_end, t_mid) if kind == "order" else (t_mid, t_end)
        z_mid = ddim(z, t, first, eps_t)
        eps_mid = eps_t if kind == "stale-eps" else eps_at(z_mid, first)
        if kind == "x-hat-mid":
            return x0(z_mid, t_mid, eps_mid)
        z_end = ddim(z_mid, first, second, eps_mid)
        if kind == "z-end":
            return z_end
        lands = t_mid if kind == "to-mid" else t_end
        (al_t, si_t), (al_e, si_e) = path.coefficients(t, z), path.coefficients(lands, z)
        ratio = si_e / si_t
        if kind == "alpha-only":
            return (z_end - ratio * z) / al_e
        out = (z_end - ratio * z) / (al_e - ratio * al_t)
        return out + 1e-3 if kind == "off" else out
    return two_step_target


@pytest.mark.parametrize("kind, words", [
    ("x-hat", "teacher's data prediction at (z_t, t)"),
    ("x-hat-mid", "teacher's data prediction at (z_t_mid, t_mid)"),
    ("z-end", "where the teacher's two steps land"),
    ("to-mid", "one step from t to t_mid"),
    ("stale-eps", "the second prediction is made at (z_t_mid, t_mid)"),
    ("order", "the order is t -> t_mid -> t_end"),
    ("alpha-only", "divides by alpha(t_end) only"),
    ("float-t", "one time per sample"),
    ("off", "max |error|"),
])
def test_two_step_target_mistakes(kind, words):
    _assert_clean_failure(check("7.1", _target(kind), seed=0), words)


# ---- 7.2 -----------------------------------------------------------------------------------------
def _skip(kind):
    def skip_coefficients(t, t_min, sigma_data, path):
        t_lo = torch.full_like(t, t_min)
        if kind == "absolute":
            abar, sbar = path.alpha(t), path.sigma(t)
        else:
            abar = path.alpha(t) / path.alpha(t_lo)
            sbar2 = path.sigma(t) ** 2 - (abar * path.sigma(t_lo)) ** 2
            sbar = path.sigma(t) - abar * path.sigma(t_lo) if kind == "plain" else sbar2.clamp_min(0).sqrt()
        var = abar**2 * sigma_data**2 + sbar**2
        c_skip = sigma_data**2 / var if kind == "no-abar" else abar * sigma_data**2 / var
        c_out = {"c-out-var": sbar * sigma_data / var, "no-sd": sbar / var.sqrt()}.get(kind, sbar * sigma_data / var.sqrt())
        c_in = {"no-c-in": torch.ones_like(t), "c-in-var": 1 / var, "c-in-const": torch.full_like(t, 1 / sigma_data)}.get(
            kind, var.rsqrt())
        if kind == "nearly":  # right almost everywhere, but not exactly at the boundary
            c_skip = c_skip * (1 - 1e-6)
        if kind == "two":
            return c_skip, c_out
        return c_skip, c_out, c_in
    return skip_coefficients


@pytest.mark.parametrize("kind, words", [
    ("absolute", "boundary condition fails"),
    ("nearly", "boundary condition fails"),
    ("no-abar", "leaves out abar_t"),
    ("plain", "sigma_t - abar_t sigma_t_min"),
    ("c-out-var", "divides by the variance"),
    ("no-sd", "leaves out sigma_d"),
    ("no-c-in", "input must be rescaled"),
    ("c-in-var", "not the variance"),
    ("c-in-const", "c_in at t_min only"),
    ("two", "expected a tuple (c_skip, c_out, c_in)"),
])
def test_skip_coefficients_mistakes(kind, words):
    _assert_clean_failure(check("7.2", _skip(kind), seed=0), words)


def test_absolute_coefficients_are_named_at_the_boundary():
    r = check("7.2", _skip("absolute"), seed=1)
    _assert_clean_failure(r, "boundary condition fails", "relative to t_min", "linear path")


def test_the_boundary_is_checked_on_the_vp_path_too():
    """A c_skip that is exact on the linear path but not on VP fails with 'VP path' in the verdict."""
    right = SOLUTION["skip_coefficients"]

    def skip_coefficients(t, t_min, sigma_data, path):
        if type(path).__name__ == "LinearPath":
            return right(t, t_min, sigma_data, path)
        return _skip("absolute")(t, t_min, sigma_data, path)

    _assert_clean_failure(check("7.2", skip_coefficients, seed=0), "boundary condition fails", "VP path")


# ---- 7.3 -----------------------------------------------------------------------------------------
def _cd(kind):
    def cd_loss(student, ema, teacher_velocity, x0, eps, t_lo, t_hi, path):
        x_hi = expand_like(path.alpha(t_hi), x0) * x0 + expand_like(path.sigma(t_hi), x0) * eps
        dt = expand_like(t_hi - t_lo if kind == "forward" else t_lo - t_hi, x0)
        if kind == "grad-teacher":  # the target network frozen, but the teacher's graph still reaches the loss
            ema.requires_grad_(False)
            x_lo = x_hi + dt * teacher_velocity(x_hi, t_hi)
            target = ema(x_lo, t_lo)
        elif kind == "grad-target":
            x_lo = x_hi + dt * teacher_velocity(x_hi, t_hi).detach()
            target = ema(x_lo, t_lo)
        else:
            with torch.no_grad():
                x_lo = x_hi if kind == "no-step" else x_hi + dt * teacher_velocity(x_hi, t_hi)
                net = student if kind == "online" else ema
                target = net(x_lo, t_hi if kind == "target-time" else t_lo)
        online = student(x_lo, t_lo) if kind == "student-lo" else student(x_hi, t_hi)
        if kind == "detached":
            online = online.detach()
        if kind == "item":
            return torch.tensor((online - target).pow(2).mean().item())
        if kind == "sum":
            return (online - target).pow(2).flatten(1).sum(1).mean()
        if kind == "per-sample":
            return (online - target).pow(2).flatten(1).mean(1)
        if kind == "half-detached":  # the value is right, but the student's graph only carries zeros
            return (online.detach() - target).pow(2).mean() + 0 * online.mean()
        return (online - target).pow(2).mean()
    return cd_loss


@pytest.mark.parametrize("kind, words", [
    ("online", "online student"),
    ("no-step", "skips the teacher's ODE step"),
    ("forward", "the wrong way"),
    ("target-time", "evaluates the target at t_hi"),
    ("student-lo", "evaluates the student at the teacher's point"),
    ("sum", "sums the squares"),
    ("per-sample", "expected a scalar tensor"),
    ("detached", "no gradient path"),
    ("item", "no gradient path"),
    ("grad-target", "gradients flow into the target network"),
    ("grad-teacher", "gradients flow into the teacher"),
    ("half-detached", "its gradient with respect to the student's parameter"),
])
def test_cd_loss_mistakes(kind, words):
    _assert_clean_failure(check("7.3", _cd(kind), seed=0), words)


# ---- 7.4 -----------------------------------------------------------------------------------------
def _sampler(kind):
    def multistep_consistency(f, x_init, times, noises, t_min, path):
        def full(s):
            return s if kind == "float-t" else torch.full((x_init.shape[0],), s, dtype=x_init.dtype)

        x = f(x_init, full(times[0]))
        if kind == "extra-call":
            f(x_init, full(times[0]))
        for i, (tau, z) in enumerate(zip(times[1:], noises, strict=True)):
            z = noises[0] if kind == "same-noise" else z
            if kind == "absolute":
                abar, sbar = path.alpha(full(tau)), path.sigma(full(tau))
            else:
                abar = path.alpha(full(tau)) / path.alpha(full(t_min))
                sbar = (path.sigma(full(tau)) ** 2 - (abar * path.sigma(full(t_min))) ** 2).clamp_min(0).sqrt()
            x_tau = {"no-renoise": x, "no-scale": x + expand_like(sbar, x) * z}.get(
                kind, expand_like(abar, x) * x + expand_like(sbar, x) * z)
            if kind == "last-noisy" and i == len(noises) - 1:
                return x_tau
            x = f(x_tau, full(t_min if kind == "f-at-tmin" else tau))
        return x
    return multistep_consistency


@pytest.mark.parametrize("kind, words", [
    ("absolute", "relative to t_min"),
    ("no-renoise", "does not re-noise"),
    ("no-scale", "without scaling x by abar_tau"),
    ("last-noisy", "returns the last re-noised"),
    ("f-at-tmin", "evaluates f at t_min"),
    ("same-noise", "uses the first noise at every step"),
    ("extra-call", "called f 2 times"),
    ("float-t", "one time per sample"),
])
def test_multistep_consistency_mistakes(kind, words):
    _assert_clean_failure(check("7.4", _sampler(kind), seed=0), words)


def test_all_checks_through_the_notebook_runner():
    namespace = dict(SOLUTION)
    del namespace["cd_loss"]
    results = run_checks(CHAPTER, namespace, seed=0)
    assert [r.status for r in results] == ["passed", "passed", "error", "passed"]
    assert "no function named cd_loss" in results[2].message
