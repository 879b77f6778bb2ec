"""Checks for chapter 03 (probability-flow ODE and likelihood).

Exercise 3.1  ``probability_flow_drift(x, t, sde, score_fn)``
Exercise 3.2  ``hutchinson_divergence(velocity, x, t, probes)``
Exercise 3.3  ``ode_log_likelihood(x, velocity, divergence, prior_log_prob, ts)``: the augmented ODE
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..ode import hutchinson_divergence as reference_hutchinson
from ..utils import expand_like
from .ch01 import _generator
from .ch02 import _sde_score_cases
from .verdict import CheckResult, Mismatch, call_student, compare, describe_where, run_check


def check_probability_flow_drift(probability_flow_drift: Callable, *, seed: int | None = None
                                 ) -> CheckResult:
    """Exercise 3.1: f(x, t) - 1/2 g(t)^2 s(x, t)."""
    gen = _generator(seed)

    def body() -> str:
        for sde, label, score, t, shape, x, tt in _sde_score_cases(gen):
            where = f"{describe_where(t, shape)} for the {sde.name} SDE with {label}"
            got = call_student(probability_flow_drift, "probability_flow_drift", x.clone(),
                               tt.clone(), sde, score, where=where)
            f, g2 = sde.drift(x, tt), expand_like(sde.diffusion(tt) ** 2, x)
            s = score(x, tt)
            compare("probability_flow_drift", got, sde.probability_flow_drift(x, tt, score),
                    where=where, mistakes={
                "uses g^2 s without the factor 1/2: that is the reverse SDE's drift": f - g2 * s,
                "adds the score term; the ODE drift is f - 1/2 g^2 s": f + 0.5 * g2 * s,
                "uses g(t) instead of g(t)^2": f - 0.5 * expand_like(sde.diffusion(tt), x) * s,
                "forgets the drift f(x, t) of the forward SDE": -0.5 * g2 * s,
            })
        return ("probability_flow_drift matches the reference for VP and VE, two score models, "
                "2-D and image shapes and several t.")

    return run_check("3.1", "probability-flow drift", body)


def _exact_trace(velocity, x, t):
    """The exact divergence (the trace of dv/dx), per sample."""
    x = x.detach().requires_grad_(True)
    v = velocity(x, t).flatten(1)
    return torch.stack([torch.autograd.grad(v[:, i].sum(), x, retain_graph=True)[0].flatten(1)[:, i]
                        for i in range(v.shape[1])], 1).sum(1).detach()


def check_hutchinson_divergence(hutchinson_divergence: Callable, *, seed: int | None = None
                                ) -> CheckResult:
    """Exercise 3.2: mean over probes of eps^T (dv/dx) eps, per sample."""
    gen = _generator(seed)

    def body() -> str:
        for shape in [(16, 2), (4, 1, 5, 5)]:
            d = int(torch.tensor(shape[1:]).prod())
            a = torch.randn(d, d, generator=gen, dtype=torch.float64)

            def velocity(x, t, a=a):
                h = x.flatten(1)
                return (torch.tanh(h @ a.T) + expand_like(t, h) * h**2).reshape(x.shape)

            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            t = torch.rand(shape[0], generator=gen, dtype=torch.float64)
            for k, kind in ((1, "Rademacher"), (3, "Rademacher"), (3, "Gaussian")):
                probes = (torch.randint(0, 2, (k, *shape), generator=gen).double() * 2 - 1 if kind == "Rademacher"
                          else torch.randn((k, *shape), generator=gen, dtype=torch.float64))
                where = f"for input shape {shape} with {k} {kind} probe(s)"
                got = call_student(hutchinson_divergence, "hutchinson_divergence", velocity,
                                   x.clone(), t.clone(), probes.clone(), where=where)
                if isinstance(got, tuple):
                    raise Mismatch(f"hutchinson_divergence returned a tuple {where}; return only "
                                   "the (B,) divergence estimate")
                _, ref = reference_hutchinson(velocity, x, t, probes)
                mistakes = {"sums over the probes; average them": ref * k} if k > 1 else {}
                mistakes["divides by the number of dimensions; the trace is a sum"] = ref / d
                mistakes["returns the exact trace of dv/dx; the exercise is the estimator: the mean over the "
                         "given probes of eps^T (dv/dx) eps"] = _exact_trace(velocity, x, t)
                compare("hutchinson_divergence", got, ref, where=where, mistakes=mistakes)
        return ("hutchinson_divergence matches the reference on 2-D and image shapes with 1 and 3 Rademacher and "
                "3 Gaussian probes.")

    return run_check("3.2", "Hutchinson divergence estimator", body)


# ---- 3.3 the likelihood integral -----------------------------------------------------------------
def _euler_log_likelihood(x, velocity, divergence, prior_log_prob, ts, *, mistake: str = ""):
    """log p_{ts[0]}(x) = log p_1(x_1) + int div v dt by Euler on ``ts``; ``mistake`` plants one."""
    start, delta = x, torch.zeros(x.shape[0], dtype=x.dtype)
    for a, b in zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True):
        t = torch.full((x.shape[0],), a, dtype=x.dtype)
        step = velocity(x, t) * (b - a)
        new = x - step if mistake == "backwards" else x + step
        at = new if mistake == "late divergence" else x
        delta = delta + divergence(at, t) * (b - a)
        x = new
    if mistake == "minus":
        return prior_log_prob(x) - delta
    if mistake == "no prior":
        return delta
    if mistake == "prior at start":
        return prior_log_prob(start) + delta
    return prior_log_prob(x) + delta


def _field(gen: torch.Generator, d: int):
    """v(x, t) = tanh(x A^T) + t x^2 per coordinate, and its divergence in closed form."""
    a = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5

    def flat(x):
        return x.flatten(1)

    def velocity(x, t):
        if not isinstance(t, Tensor) or t.shape != (x.shape[0],):
            raise ValueError(f"velocity expects t as a tensor of shape ({x.shape[0]},), one time per sample; got "
                             f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
        h = flat(x)
        return (torch.tanh(h @ a.T) + expand_like(t, h) * h**2).reshape(x.shape)

    def divergence(x, t):
        if not isinstance(t, Tensor) or t.shape != (x.shape[0],):
            raise ValueError(f"divergence expects t as a tensor of shape ({x.shape[0]},); got "
                             f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
        h = flat(x)
        return ((1 - torch.tanh(h @ a.T) ** 2) * torch.diagonal(a)).sum(1) + 2 * t * h.sum(1)

    return velocity, divergence


def check_ode_log_likelihood(ode_log_likelihood: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 3.3: integrate x and the divergence together by Euler on ``ts`` (from t_min up to 1) and
    return log p_1(x_1) + int div v dt, per sample."""
    gen = _generator(seed)

    def body() -> str:
        for shape in [(16, 2), (4, 1, 3, 3)]:
            d = int(torch.tensor(shape[1:]).prod())
            velocity, divergence = _field(gen, d)
            scale = 0.5 + torch.rand((), generator=gen).item()

            def prior_log_prob(x, scale=scale, d=d):
                h = x.flatten(1)
                return -0.5 * (h / scale).pow(2).sum(1) - d * (math.log(scale) + 0.5 * math.log(2 * math.pi))

            for n in (1, 7):
                t_min = 1e-3 + 0.1 * torch.rand((), generator=gen).item()
                ts = torch.linspace(t_min, 1.0, n + 1, dtype=torch.float64)
                x = torch.randn(shape, generator=gen, dtype=torch.float64)
                where = f"with {n} Euler step(s) from t={t_min:.3f} to 1 for input shape {shape}"
                got = call_student(ode_log_likelihood, "ode_log_likelihood", x.clone(), velocity, divergence,
                                   prior_log_prob, ts.clone(), where=where)
                if isinstance(got, tuple):
                    raise Mismatch(f"ode_log_likelihood returned a tuple {where}; return only log p(x), shape "
                                   f"({shape[0]},)")

                def mutant(m, x=x, ts=ts, velocity=velocity, divergence=divergence, prior=prior_log_prob):
                    return _euler_log_likelihood(x, velocity, divergence, prior, ts, mistake=m)

                compare("ode_log_likelihood", got, mutant(""), where=where, mistakes={
                    "subtracts the divergence integral: d log p(x_t)/dt = -div v, so going from x_1 back to the "
                    "data log p_0(x_0) = log p_1(x_1) + int div v dt": mutant("minus"),
                    "leaves out log p_1(x_1), the prior's log-density at the end of the ODE": mutant("no prior"),
                    "evaluates the prior at the data point x; it belongs at the ODE's end point x_1":
                        mutant("prior at start"),
                    "evaluates the divergence after the Euler step; Euler uses both derivatives at the step's "
                    "start": mutant("late divergence"),
                    "moves x against the velocity; from t_min up to 1 each step is x + v dt with dt > 0":
                        mutant("backwards"),
                })
        return ("ode_log_likelihood integrates x and the divergence together and adds the prior at x_1, like the "
                "reference, with 1 and 7 Euler steps on 2-D and image shapes.")

    return run_check("3.3", "the likelihood integral of the augmented ODE", body)
