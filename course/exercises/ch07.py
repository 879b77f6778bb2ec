"""Checks for chapter 07 (distillation and consistency models).

Exercise 7.1  ``two_step_target(teacher_eps, z, t, t_mid, t_end, path) -> x_tilde``
Exercise 7.2  ``skip_coefficients(t, t_min, sigma_data, path) -> (c_skip, c_out, c_in)``
Exercise 7.3  ``cd_loss(student, ema, teacher_velocity, x0, eps, t_lo, t_hi, path) -> scalar``
Exercise 7.4  ``multistep_consistency(f, x_init, times, noises, t_min, path) -> x``

Every check draws fresh inputs from ``seed``: the linear path with a random sigma_min and a VP
path with random betas, random models, times and boundary times t_min, on 2-D points and images.
A function of the course itself (``course.distillation.progressive_distillation_target``, ...)
is not an answer: each check says so instead of running it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..utils import expand_like
from .ch01 import _generator
from .ch05 import _path_name, _paths
from .verdict import CheckResult, Mismatch, call_student, compare, gradients, matches, run_check

SHAPES = [(16, 2), (4, 1, 6, 6)]


def _not_the_library(fn: Callable, name: str) -> None:
    """A student's answer is their own function, not one of the course's reference objects."""
    module = getattr(fn, "__module__", None) or ""
    if module == "course" or module.startswith("course."):
        raise Mismatch(f"{name} is {module}.{getattr(fn, '__name__', '?')}, the course's own reference; "
                       "write the function yourself from the maths above")


def _per_sample_time(t, x: Tensor, who: str) -> None:
    if not isinstance(t, Tensor) or t.shape != (x.shape[0],):
        raise ValueError(f"{who} expects t as a tensor of shape ({x.shape[0]},), one time per sample "
                         f"(torch.full((B,), t)); got {type(t).__name__} {tuple(getattr(t, 'shape', ()))}")


def _rand(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()


# ---- 7.1 the progressive-distillation target -------------------------------------------------------
def _eps_model(gen: torch.Generator, shape):
    """A smooth eps-prediction ``teacher_eps(z, t)`` that depends on z and t."""
    w = 0.5 + torch.rand((), generator=gen, dtype=torch.float64)
    shift = 0.3 * torch.randn(shape[1:], generator=gen, dtype=torch.float64)

    def teacher_eps(z: Tensor, t: Tensor) -> Tensor:
        _per_sample_time(t, z, "teacher_eps")
        return torch.tanh(w * z) * (1 + expand_like(t, z)) + shift

    return teacher_eps


def _ddim_eps(z: Tensor, t: float, s: float, eps: Tensor, path) -> Tensor:
    """The deterministic DDIM step from t to s with a noise prediction."""
    (a_t, s_t), (a_s, s_s) = path.coefficients(t, z), path.coefficients(s, z)
    return a_s * (z - s_t * eps) / a_t + s_s * eps


def _invert(z_t: Tensor, z_end: Tensor, t: float, s: float, path) -> Tensor:
    """The data prediction x with which one DDIM step from (z_t, t) lands on z_end at s."""
    (a_t, s_t), (a_s, s_s) = path.coefficients(t, z_t), path.coefficients(s, z_t)
    return (z_end - s_s / s_t * z_t) / (a_s - s_s / s_t * a_t)


def check_two_step_target(two_step_target: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 7.1: x_tilde = (z'' - (sigma''/sigma_t) z_t) / (alpha'' - (sigma''/sigma_t) alpha_t),
    with z'' two teacher DDIM steps t -> t_mid -> t_end."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(two_step_target, "two_step_target")
        for path in _paths(gen):
            for shape in SHAPES:
                t = _rand(gen, 0.55, 0.95)
                triples = [(0.9, 0.6, 0.3), (t, _rand(gen, 0.35, 0.5), _rand(gen, 0.0, 0.3)), (0.5, 0.25, 0.0)]
                for t, t_mid, t_end in triples:
                    teacher_eps = _eps_model(gen, shape)
                    z = torch.randn(shape, generator=gen, dtype=torch.float64)
                    where = f"for t={t:.2f} -> t_mid={t_mid:.2f} -> t_end={t_end:.2f}, input shape {shape}, " \
                            f"on the {_path_name(path)}"
                    got = call_student(two_step_target, "two_step_target", teacher_eps, z.clone(), t, t_mid, t_end,
                                       path, where=where)
                    b = shape[0]

                    def eps_at(x, s, teacher_eps=teacher_eps, b=b):
                        return teacher_eps(x, torch.full((b,), s, dtype=torch.float64))

                    def x0_at(x, s, path=path, eps_at=eps_at):
                        a, sig = path.coefficients(s, x)
                        return (x - sig * eps_at(x, s)) / a

                    eps_t = eps_at(z, t)
                    z_mid = _ddim_eps(z, t, t_mid, eps_t, path)
                    z_end = _ddim_eps(z_mid, t_mid, t_end, eps_at(z_mid, t_mid), path)
                    expected = _invert(z, z_end, t, t_end, path)
                    mistakes = {
                        "returns the teacher's data prediction at (z_t, t) (two steps with the same eps are one "
                        "step: the second prediction is made at (z_t_mid, t_mid)); the target is the x_tilde with "
                        "which ONE DDIM step from t lands where the teacher's two steps land": x0_at(z, t),
                        "returns the teacher's data prediction at (z_t_mid, t_mid); the target is the x_tilde "
                        "with which one DDIM step from t lands where the teacher's two steps land":
                            x0_at(z_mid, t_mid),
                        "returns z at t_end, where the teacher's two steps land; the target is the data "
                        "prediction that takes one DDIM step from z_t there": z_end,
                        "solves for one step from t to t_mid; the student's single step spans both teacher "
                        "steps, from t to t_end": _invert(z, z_end, t, t_mid, path),
                        "takes the teacher's first step to t_end and the second back to t_mid; the order "
                        "is t -> t_mid -> t_end": _invert(z, _ddim_eps(
                            _ddim_eps(z, t, t_end, eps_t, path), t_end, t_mid,
                            eps_at(_ddim_eps(z, t, t_end, eps_t, path), t_end), path), t, t_end, path),
                    }
                    if path.sigma(torch.tensor(t_end, dtype=torch.float64)) > 0:  # else x_tilde = z_end exactly
                        mistakes["divides by alpha(t_end) only; the step from z_t also carries "
                                 "(sigma_end / sigma_t) alpha_t of the data"] = (
                            (z_end - path.coefficients(t_end, z)[1] / path.coefficients(t, z)[1] * z)
                            / path.coefficients(t_end, z)[0])
                    compare("two_step_target", got, expected, where=where, mistakes=mistakes)
        return ("two_step_target makes one DDIM step land where two teacher steps land, on the linear and VP "
                "paths, 2-D and image shapes, the last rung (t_end = 0) included.")

    return run_check("7.1", "the progressive-distillation target", body)


# ---- 7.2 the skip parameterisation ------------------------------------------------------------------
def _edm(path, t: Tensor, t_min: float, sigma_data: float, *, relative=True, squares=True):
    """(c_skip, c_out, c_in); the keyword switches are planted mistakes."""
    t_lo = torch.full_like(t, t_min)
    if relative:
        abar = path.alpha(t) / path.alpha(t_lo)
        sbar = (path.sigma(t) ** 2 - (abar * path.sigma(t_lo)) ** 2).clamp_min(0).sqrt() if squares else \
            path.sigma(t) - abar * path.sigma(t_lo)
    else:
        abar, sbar = path.alpha(t), path.sigma(t)
    var = abar**2 * sigma_data**2 + sbar**2
    return abar * sigma_data**2 / var, sbar * sigma_data / var.sqrt(), var.rsqrt(), (abar, sbar, var)


def _coefficient_triple(got, where: str):
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        raise Mismatch(f"skip_coefficients returned {type(got).__name__} {where}; expected a tuple "
                       "(c_skip, c_out, c_in) of three tensors of shape (B,)")
    return got


def check_skip_coefficients(skip_coefficients: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 7.2: EDM's c_skip, c_out, c_in written relative to x_{t_min}."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(skip_coefficients, "skip_coefficients")
        for path in _paths(gen):
            name = _path_name(path)
            for t_min in (_rand(gen, 0.002, 0.05), _rand(gen, 0.05, 0.2)):
                sigma_data = _rand(gen, 0.3, 1.5)
                # the boundary first: exactly 1 and 0 at t = t_min
                t = torch.full((8,), t_min, dtype=torch.float64)
                where = f"at t = t_min = {t_min:.4f} (sigma_data = {sigma_data:.2f}) on the {name}"
                c_skip, c_out, _ = _coefficient_triple(call_student(
                    skip_coefficients, "skip_coefficients", t.clone(), t_min, sigma_data, path, where=where), where)
                for label, value in (("c_skip", c_skip), ("c_out", c_out)):
                    if not isinstance(value, Tensor) or value.shape != t.shape:
                        raise Mismatch(f"skip_coefficients returned {label} of "
                                       f"{tuple(getattr(value, 'shape', ()))} {where}; expected shape {tuple(t.shape)}")
                tol = 4 * torch.finfo(c_skip.dtype).eps if c_skip.is_floating_point() else 0.0
                if not torch.isfinite(c_skip).all() or not torch.isfinite(c_out).all():
                    raise Mismatch(f"skip_coefficients returned NaN or inf {where} (sbar^2 can come out as a tiny "
                                   "negative number: clamp it at 0 before the square root)")
                if (c_skip - 1).abs().max() > tol or c_out.abs().max() > tol:
                    hint = ""
                    abs_skip = _edm(path, t, t_min, sigma_data, relative=False)[0]
                    if matches(c_skip, abs_skip, rtol=1e-6, atol=1e-9):
                        hint = (": it looks like alpha_t and sigma_t of the path itself; f's 'data' is x at "
                                "t_min, so the coefficients use abar_t, sbar_t relative to t_min")
                    raise Mismatch(f"the boundary condition fails {where}: c_skip = {c_skip[0].item():.6g} and "
                                   f"c_out = {c_out[0].item():.6g}, but f(x, t_min) = x needs exactly 1 and 0{hint}")
                # then the values at t in (t_min, 1]
                t = torch.cat([t_min + (1 - t_min) * torch.rand(15, generator=gen, dtype=torch.float64),
                               torch.ones(1, dtype=torch.float64)])
                where = f"at t in (t_min, 1] (t_min = {t_min:.4f}, sigma_data = {sigma_data:.2f}) on the {name}"
                got = _coefficient_triple(call_student(skip_coefficients, "skip_coefficients", t.clone(), t_min,
                                                       sigma_data, path, where=where), where)
                c_skip, c_out, c_in, (abar, sbar, var) = _edm(path, t, t_min, sigma_data)
                plain = _edm(path, t, t_min, sigma_data, squares=False)
                compare("c_skip", got[0], c_skip, where=where, mistakes={
                    "leaves out abar_t in the numerator (c_skip = sigma_d^2 / (abar^2 sigma_d^2 + sbar^2))":
                        sigma_data**2 / var,
                    "computes sbar_t as sigma_t - abar_t sigma_t_min; it is the standard deviation of x_t given "
                    "x_t_min, sqrt(sigma_t^2 - abar_t^2 sigma_t_min^2)": plain[0],
                })
                compare("c_out", got[1], c_out, where=where, mistakes={
                    "divides by the variance abar^2 sigma_d^2 + sbar^2; c_out divides by its square root":
                        sbar * sigma_data / var,
                    "leaves out sigma_d (c_out = sbar / sqrt(abar^2 sigma_d^2 + sbar^2))": sbar / var.sqrt(),
                    "computes sbar_t as sigma_t - abar_t sigma_t_min; it is the standard deviation of x_t given "
                    "x_t_min, sqrt(sigma_t^2 - abar_t^2 sigma_t_min^2)": plain[1],
                })
                compare("c_in", got[2], c_in, where=where, mistakes={
                    "is 1: the network's input must be rescaled to unit variance, c_in = 1 / sqrt(abar^2 sigma_d^2 "
                    "+ sbar^2) (one public implementation forgets it)": torch.ones_like(t),
                    "is 1 / (abar^2 sigma_d^2 + sbar^2); c_in divides by the standard deviation, not the variance":
                        1 / var,
                    "is 1 / sigma_d: that is c_in at t_min only": torch.full_like(t, 1 / sigma_data),
                })
        return ("skip_coefficients gives c_skip(t_min) = 1 and c_out(t_min) = 0 exactly and EDM's coefficients "
                "relative to t_min elsewhere, on the linear and VP paths.")

    return run_check("7.2", "the skip parameterisation and its boundary condition", body)


# ---- 7.3 the consistency-distillation loss -------------------------------------------------------------
class _Net(nn.Module):
    """A small model ``net(x, t)`` with parameters, for 2-D points and images."""

    def __init__(self, gen: torch.Generator, shape, who: str):
        super().__init__()
        self.who = who
        self.gain = nn.Parameter(0.5 + torch.rand((), generator=gen, dtype=torch.float64))
        self.width = nn.Parameter(0.5 + torch.rand((), generator=gen, dtype=torch.float64))
        self.shift = nn.Parameter(0.3 * torch.randn(shape[1:], generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        _per_sample_time(t, x, self.who)
        return self.gain * torch.tanh(self.width * x) * (1 + expand_like(t, x)) + self.shift * expand_like(t, x)


def _cd_value(student, ema, teacher, x0, eps, t_lo, t_hi, path, *, target_net=None, step=True, sign=1.0,
              target_time=None, student_at_lo=False, reduce="mean"):
    """The reference loss; the keywords plant mistakes."""
    a, s = expand_like(path.alpha(t_hi), x0), expand_like(path.sigma(t_hi), x0)
    x_hi = a * x0 + s * eps
    with torch.no_grad():
        x_lo = x_hi + sign * expand_like(t_lo - t_hi, x0) * teacher(x_hi, t_hi) if step else x_hi
        target = (target_net or ema)(x_lo, t_lo if target_time is None else target_time)
    online = student(x_lo, t_lo) if student_at_lo else student(x_hi, t_hi)
    sq = (online - target).pow(2).flatten(1)
    return sq.sum(1).mean() if reduce == "sum" else sq.mean()


def check_cd_loss(cd_loss: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 7.3: mean ||student(x_hi, t_hi) - sg ema(x_hi + (t_lo - t_hi) v(x_hi, t_hi), t_lo)||^2."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(cd_loss, "cd_loss")
        for path in _paths(gen):
            for shape in SHAPES:
                b = shape[0]
                student, ema, teacher = (_Net(gen, shape, who) for who in ("student", "ema", "teacher_velocity"))
                x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
                eps = torch.randn(shape, generator=gen, dtype=torch.float64)
                t_hi = 0.05 + 0.95 * torch.rand(b, generator=gen, dtype=torch.float64)
                t_lo = t_hi * (0.5 + 0.4 * torch.rand(b, generator=gen, dtype=torch.float64))
                where = f"for input shape {shape} on the {_path_name(path)}"
                got = call_student(cd_loss, "cd_loss", student, ema, teacher, x0.clone(), eps.clone(), t_lo.clone(),
                                   t_hi.clone(), path, where=where)
                if not isinstance(got, Tensor) or got.numel() != 1:
                    raise Mismatch(f"cd_loss returned {type(got).__name__} {tuple(getattr(got, 'shape', ()))} "
                                   f"{where}; expected a scalar tensor (the mean over the batch)")
                args = (student, ema, teacher, x0, eps, t_lo, t_hi, path)
                expected = _cd_value(*args)
                compare("cd_loss", got.reshape(()), expected, where=where, mistakes={
                    "builds the target with the online student; it is the EMA network `ema`":
                        _cd_value(*args, target_net=student),
                    "skips the teacher's ODE step: the target is the EMA network at the teacher's estimate of "
                    "x at t_lo": _cd_value(*args, step=False),
                    "steps the teacher the wrong way: the step from t_hi to t_lo is dt = t_lo - t_hi < 0":
                        _cd_value(*args, sign=-1.0),
                    "evaluates the target at t_hi; the target network sees the teacher's point at t_lo":
                        _cd_value(*args, target_time=t_hi),
                    "evaluates the student at the teacher's point (x_lo, t_lo); the student sees the noisier "
                    "(x_hi, t_hi)": _cd_value(*args, student_at_lo=True),
                    "sums the squares over each sample's elements; take the mean over all elements":
                        _cd_value(*args, reduce="sum"),
                })
                if not got.requires_grad:
                    raise Mismatch(f"cd_loss {where} has no gradient path to the student's parameters: only the "
                                   "target is a stop-gradient, the student's output must stay in the graph")
                params = {"student": list(student.parameters()), "ema": list(ema.parameters()),
                          "teacher_velocity": list(teacher.parameters())}
                tracked = [p for ps in params.values() for p in ps if p.requires_grad]
                found = dict(zip(map(id, tracked), gradients(got, tracked), strict=True))
                grads = {who: [found.get(id(p)) for p in ps] for who, ps in params.items()}
                for who, what in (("ema", "the target network `ema`"), ("teacher_velocity", "the teacher")):
                    if any(g is not None and g.abs().max() > 0 for g in grads[who]):
                        raise Mismatch(f"cd_loss {where}: gradients flow into {what}; the target is a "
                                       "stop-gradient (sg), computed without tracking gradients")
                ref = torch.autograd.grad(expected, params["student"])
                for p_name, g, r in zip(("gain", "width", "shift"), grads["student"], ref, strict=True):
                    if not matches(g, r, rtol=1e-4, atol=1e-7, dtype=got.dtype):
                        raise Mismatch(f"cd_loss {where}: the loss value is right but its gradient with respect to "
                                       f"the student's parameter {p_name!r} is not (is part of the student's "
                                       "output detached?)")
        return ("cd_loss matches consistency distillation with an Euler teacher step, its gradient reaches the "
                "student only, on the linear and VP paths, 2-D and image shapes.")

    return run_check("7.3", "the consistency-distillation loss with a stop-gradient target", body)


# ---- 7.4 multistep consistency sampling -------------------------------------------------------------------
class _CountingF:
    """A smooth stand-in consistency function that counts its evaluations. When grading, it stays in
    the grader's process and the student's code calls back into it (``_course_callback``)."""

    _course_callback = True

    def __init__(self, gen: torch.Generator, shape):
        self.w = 0.5 + torch.rand((), generator=gen, dtype=torch.float64)
        self.shift = 0.5 * torch.randn(shape[1:], generator=gen, dtype=torch.float64)
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        _per_sample_time(t, x, "f")
        self.calls += 1
        return torch.tanh(self.w * x) * (1 - 0.5 * expand_like(t, x)) + self.shift * expand_like(t, x)


def _multistep(f, x, times, noises, t_min, path, *, relative=True, renoise=True, scale_x=True,
               same_noise=False, f_time=None, last_noisy=False):
    """The reference sampler; the keywords plant mistakes."""
    b = x.shape[0]

    def full(s):
        return torch.full((b,), s, dtype=x.dtype)

    x = f(x, full(times[0]))
    for i, (tau, z) in enumerate(zip(times[1:], noises, strict=True)):
        z = noises[0] if same_noise else z
        a_tau, s_tau = path.alpha(full(tau)), path.sigma(full(tau))
        if relative:
            a_lo, s_lo = path.alpha(full(t_min)), path.sigma(full(t_min))
            a_tau = a_tau / a_lo
            s_tau = (path.sigma(full(tau)) ** 2 - (a_tau * s_lo) ** 2).clamp_min(0).sqrt()
        x_tau = (expand_like(a_tau, x) if scale_x else 1.0) * x + expand_like(s_tau, x) * z if renoise else x
        if last_noisy and i == len(noises) - 1:
            return x_tau
        x = f(x_tau, full(tau if f_time is None else f_time))
    return x


def check_multistep_consistency(multistep_consistency: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 7.4: x = f(x_init, times[0]); for each later tau: x = f(abar x + sbar z, tau)."""
    gen = _generator(seed)

    def body() -> str:
        _not_the_library(multistep_consistency, "multistep_consistency")
        for path in _paths(gen):
            for shape in SHAPES:
                t_min = _rand(gen, 0.01, 0.05)
                tau = _rand(gen, 0.2, 0.8)
                for times in ([1.0], [1.0, tau], [1.0, 0.7, _rand(gen, 0.3, 0.6), _rand(gen, 0.1, 0.25)]):
                    f = _CountingF(gen, shape)
                    x = torch.randn(shape, generator=gen, dtype=torch.float64)
                    noises = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in times[1:]]
                    where = f"for times {[round(s, 3) for s in times]} (t_min = {t_min:.3f}), input shape {shape}, " \
                            f"on the {_path_name(path)}"
                    got = call_student(multistep_consistency, "multistep_consistency", f, x.clone(), list(times),
                                       [z.clone() for z in noises], t_min, path, where=where)
                    calls = f.calls
                    args = (f, x, times, noises, t_min, path)
                    mistakes = {}
                    if len(times) > 1:
                        mistakes = {
                            "re-noises with alpha_tau, sigma_tau of the path; x estimates x at t_min, so the "
                            "coefficients are abar_tau, sbar_tau relative to t_min": _multistep(*args, relative=False),
                            "does not re-noise: f is applied to its own output at the next time":
                                _multistep(*args, renoise=False),
                            "adds sbar z to x without scaling x by abar_tau": _multistep(*args, scale_x=False),
                            "returns the last re-noised x_tau; each re-noising is followed by a denoising":
                                _multistep(*args, last_noisy=True),
                            "evaluates f at t_min after re-noising; f is called at the time tau it was "
                            "re-noised to": _multistep(*args, f_time=t_min),
                        }
                        if len(times) > 2:
                            mistakes["uses the first noise at every step; each re-noising draws its own z"] = \
                                _multistep(*args, same_noise=True)
                    compare("multistep_consistency", got, _multistep(*args), where=where, mistakes=mistakes)
                    if calls != len(times):
                        raise Mismatch(f"multistep_consistency called f {calls} times {where}; multistep sampling "
                                       f"costs one evaluation per time ({len(times)})")
        return ("multistep_consistency denoises, re-noises relative to t_min and denoises again, one evaluation of f "
                "per time, on the linear and VP paths, 2-D and image shapes.")

    return run_check("7.4", "multistep consistency sampling", body)
