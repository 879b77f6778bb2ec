"""Checks for chapter 01 (perturbing data with SDEs).

Exercise 1.1  ``vp_drift(x, t, beta_min, beta_max)`` and ``vp_diffusion(t, beta_min, beta_max)``
Exercise 1.2  ``euler_maruyama_step(x, t, dt, drift, diffusion, z)``
Exercise 1.3  ``vp_marginal(x0, t, beta_min, beta_max) -> (mean, std)``

Each check draws fresh random inputs (parameters, 2-D points and images, several t) from
``seed`` and compares with the reference in ``course.sde`` / ``course.simulate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..sde import VPSDE
from ..simulate import euler_maruyama_step as reference_em_step
from ..utils import expand_like
from .verdict import CheckResult, Mismatch, call_student, compare, describe_where, run_check

SHAPES = [(16, 2), (4, 1, 8, 8)]
TIMES = [0.0, 0.25, 0.5, 1.0]
COVERAGE = "on 2-D and image shapes at t = 0, 0.25, 0.5, 1 and at per-sample t"


def _cases(gen: torch.Generator):
    """(t description, shape, x, t) over the fixed times and one per-sample time vector."""
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        for t in TIMES:
            yield t, shape, x, torch.full((shape[0],), t, dtype=torch.float64)
        t_vec = torch.rand(shape[0], generator=gen, dtype=torch.float64)
        yield "per-sample times t of shape (B,)", shape, x, t_vec


def _random_vp(gen: torch.Generator) -> VPSDE:
    """Fresh beta_min, beta_max so that hard-coding the defaults does not pass."""
    u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
    return VPSDE(beta_min=0.05 + 0.45 * u[0], beta_max=5.0 + 20.0 * u[1])


def _generator(seed: int | None) -> torch.Generator:
    """A generator seeded with ``seed``, or freshly from the OS when ``seed`` is None."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def check_vp_drift_diffusion(vp_drift: Callable, vp_diffusion: Callable, *, seed: int | None = None
                             ) -> CheckResult:
    """Exercise 1.1: f(x, t) = -1/2 beta(t) x and g(t) = sqrt(beta(t))."""
    gen = _generator(seed)

    def body() -> str:
        sde = _random_vp(gen)
        b0, b1 = sde.beta_min, sde.beta_max
        for t, shape, x, tt in _cases(gen):
            where = describe_where(t, shape)
            beta = sde.beta(tt)
            got = call_student(vp_drift, "vp_drift", x.clone(), tt.clone(), b0, b1, where=where)
            compare("vp_drift", got, sde.drift(x, tt), where=where, mistakes={
                "uses beta(t) x without the factor -1/2": -expand_like(beta, x) * x,
                "uses a constant beta_min instead of beta(t) = beta_min + t (beta_max - beta_min)":
                    -0.5 * b0 * x,
                "uses beta_max instead of beta(t)": -0.5 * b1 * x,
            })
            got = call_student(vp_diffusion, "vp_diffusion", tt.clone(), b0, b1, where=where)
            compare("vp_diffusion", got, sde.diffusion(tt), where=where, mistakes={
                "returns beta(t); the diffusion is its square root sqrt(beta(t))": beta,
                "returns sqrt(beta_min): beta must grow with t": torch.full_like(beta, math.sqrt(b0)),
            })
        return f"vp_drift and vp_diffusion match the reference {COVERAGE}."

    return run_check("1.1", "VP drift and diffusion", body)


def check_euler_maruyama_step(euler_maruyama_step: Callable, *, seed: int | None = None
                              ) -> CheckResult:
    """Exercise 1.2: x + f(x, t) dt + g(t) sqrt(dt) z, for any drift and diffusion."""
    gen = _generator(seed)

    def body() -> str:
        sde = _random_vp(gen)
        drifts = {
            "the VP drift": (sde.drift, sde.diffusion),
            "a non-linear test drift f = t sin(x)": (
                lambda x, t: expand_like(t, x) * torch.sin(x), lambda t: 0.5 + t**2),
        }
        for label, (f, g) in drifts.items():
            for t, shape, x, tt in _cases(gen):
                dt = float(0.001 + 0.099 * torch.rand((), generator=gen, dtype=torch.float64))
                where = f"{describe_where(t, shape)} with {label} and dt={dt:.3g}"
                z = torch.randn(shape, generator=gen, dtype=torch.float64)
                x_in = x.clone()
                got = call_student(euler_maruyama_step, "euler_maruyama_step",
                                   x_in, tt.clone(), dt, f, g, z.clone(), where=where)
                if not torch.equal(x_in, x):
                    raise Mismatch(f"euler_maruyama_step changed its input x in place {where}; "
                                   "return a new tensor instead")
                gz = expand_like(g(tt), x) * z
                compare("euler_maruyama_step", got, reference_em_step(x, tt, dt, f, g, z),
                        where=where, mistakes={
                    "scales the noise by dt; Brownian increments scale with sqrt(dt)":
                        x + f(x, tt) * dt + gz * dt,
                    "forgets the noise term g(t) sqrt(dt) z": x + f(x, tt) * dt,
                    "subtracts the drift; the forward step adds f(x, t) dt":
                        x - f(x, tt) * dt + gz * math.sqrt(dt),
                    "forgets to multiply the drift by dt": x + f(x, tt) + gz * math.sqrt(dt),
                    "uses g(t)^2 for the noise scale; it should be g(t)":
                        x + f(x, tt) * dt + expand_like(g(tt) ** 2, x) * z * math.sqrt(dt),
                })
        return f"one Euler-Maruyama step matches the reference {COVERAGE}, for two drifts."

    return run_check("1.2", "one Euler-Maruyama step", body)


def check_vp_marginal(vp_marginal: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 1.3: mean alpha(t) x0 and std sqrt(1 - alpha(t)^2) of x_t | x_0 under VP."""
    gen = _generator(seed)

    def body() -> str:
        sde = _random_vp(gen)
        b0, b1 = sde.beta_min, sde.beta_max
        for t, shape, x, tt in _cases(gen):
            where = describe_where(t, shape)
            out = call_student(vp_marginal, "vp_marginal", x.clone(), tt.clone(), b0, b1, where=where)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise Mismatch(f"vp_marginal returned {type(out).__name__} {where}; "
                               "expected a pair (mean, std)")
            mean, std = out
            ref_mean, ref_std = sde.marginal(x, tt)
            big_b = sde.integrated_beta(tt)
            a_wrong = torch.exp(-big_b)  # forgot the 1/2 in alpha = exp(-B/2)
            b_wrong = torch.exp(-0.5 * sde.beta(tt) * tt)  # beta(t) t instead of the integral
            compare("the mean returned by vp_marginal", mean, ref_mean, where=where, mistakes={
                "uses alpha = exp(-B(t)); it is exp(-B(t)/2) with B(t) = int_0^t beta":
                    expand_like(a_wrong, x) * x,
                "uses beta(t) t in the exponent; it needs the integral "
                "B(t) = beta_min t + (beta_max - beta_min) t^2 / 2": expand_like(b_wrong, x) * x,
            })
            std_mistakes = {
                "returns the variance 1 - alpha^2; the std is its square root": ref_std**2,
                "returns 1 - alpha, not sqrt(1 - alpha^2)": 1 - sde.alpha(tt),
            }
            if isinstance(std, torch.Tensor) and std.ndim == x.ndim:
                # A std already shaped to broadcast against x is fine: compare at full shape.
                def full(s, x=x, shape=shape):
                    return expand_like(s, x).expand(shape)

                if any(a not in (1, b) for a, b in zip(std.shape, shape, strict=True)):
                    raise Mismatch(f"the std returned by vp_marginal has shape {tuple(std.shape)} "
                                   f"{where}; expected ({shape[0]},) or a shape that broadcasts "
                                   f"against x")
                std, ref_std = std.expand(shape), full(ref_std)
                std_mistakes = {k: full(v) for k, v in std_mistakes.items()}
            compare("the std returned by vp_marginal", std, ref_std, where=where,
                    mistakes=std_mistakes)
        return f"vp_marginal returns the right mean and std {COVERAGE}."

    return run_check("1.3", "VP marginal mean and std", body)
