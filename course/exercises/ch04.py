"""Checks for chapter 04 (accelerated sampling).

Exercise 4.1  ``ddim_step(x, eps_hat, alpha_t, sigma_t, alpha_s, sigma_s)``
Exercise 4.2  ``dpm_solver_2_step(x, t, s, eps_fn, sde)``
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..fast_samplers import dpm_solver_1_step, log_snr
from ..fast_samplers import dpm_solver_2_step as reference_dpm2
from ..utils import expand_like
from .ch01 import _generator
from .ch02 import _sdes
from .verdict import CheckResult, call_student, compare, run_check

SHAPES = [(16, 2), (4, 1, 8, 8)]


def check_ddim_step(ddim_step: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 4.1: alpha_s x0_hat + sigma_s eps_hat with x0_hat = (x - sigma_t eps_hat) / alpha_t."""
    gen = _generator(seed)

    def body() -> str:
        for sde in _sdes(gen):
            for shape in SHAPES:
                for t, s in [(1.0, 0.8), (0.5, 0.3), (0.1, 0.01)]:
                    x = torch.randn(shape, generator=gen, dtype=torch.float64)
                    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
                    tt = torch.full((shape[0],), t, dtype=torch.float64)
                    ss = torch.full((shape[0],), s, dtype=torch.float64)
                    a_t, s_t, a_s, s_s = sde.alpha(tt), sde.sigma(tt), sde.alpha(ss), sde.sigma(ss)
                    where = f"from t={t} to s={s} for input shape {shape} ({sde.name} SDE)"
                    got = call_student(ddim_step, "ddim_step", x.clone(), eps.clone(), a_t, s_t, a_s,
                                       s_s, where=where)
                    A_t, S_t, A_s, S_s = (expand_like(v, x) for v in (a_t, s_t, a_s, s_s))
                    x0 = (x - S_t * eps) / A_t
                    compare("ddim_step", got, A_s * x0 + S_s * eps, where=where, mistakes={
                        "forgets to divide by alpha_t when predicting x0": A_s * (x - S_t * eps) + S_s * eps,
                        "re-noises with sigma_t; the new noise level is sigma_s": A_s * x0 + S_t * eps,
                        "adds sigma_t eps_hat when predicting x0; x0 = (x - sigma_t eps_hat) / alpha_t":
                            A_s * (x + S_t * eps) / A_t + S_s * eps,
                    })
        return "ddim_step matches the reference for VP and VE on 2-D and image shapes."

    return run_check("4.1", "one DDIM step", body)


def check_dpm_solver_2_step(dpm_solver_2_step: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 4.2: DPM-Solver-2 with the midpoint in log-SNR."""
    gen = _generator(seed)

    def body() -> str:
        for sde in _sdes(gen):
            for shape in SHAPES:
                w = 0.5 + torch.rand((), generator=gen).item()

                def eps_fn(x, t, w=w):
                    return torch.tanh(w * x) + expand_like(t, x) * 0.3

                for t, s in [(1.0, 0.7), (0.4, 0.2), (0.05, 0.01)]:
                    x = torch.randn(shape, generator=gen, dtype=torch.float64)
                    where = f"from t={t} to s={s} for input shape {shape} ({sde.name} SDE)"
                    got = call_student(dpm_solver_2_step, "dpm_solver_2_step", x.clone(), t, s,
                                       eps_fn, sde, where=where)
                    ref = reference_dpm2(x, t, s, eps_fn, sde)
                    m_lin = (t + s) / 2  # a midpoint in t instead of in log-SNR
                    u = dpm_solver_1_step(x, t, m_lin, eps_fn(x, torch.full((shape[0],), t, dtype=x.dtype)), sde)
                    a_t = sde.alpha(torch.tensor(t, dtype=torch.float64))
                    a_s, s_s = (v(torch.tensor(s, dtype=torch.float64)) for v in (sde.alpha, sde.sigma))
                    h = (log_snr(sde, torch.tensor(s, dtype=torch.float64))
                         - log_snr(sde, torch.tensor(t, dtype=torch.float64))).item()
                    lin_mid = (a_s / a_t) * x - s_s * math.expm1(h) * eps_fn(
                        u, torch.full((shape[0],), m_lin, dtype=x.dtype))
                    first = dpm_solver_1_step(x, t, s, eps_fn(x, torch.full((shape[0],), t, dtype=x.dtype)), sde)
                    compare("dpm_solver_2_step", got, ref, where=where, mistakes={
                        "takes the midpoint halfway in t; DPM-Solver-2 takes it halfway in log-SNR "
                        "(time_from_log_snr)": lin_mid,
                        "is the first-order step (DDIM); the second evaluation at the midpoint "
                        "is missing": first,
                    })
        return "dpm_solver_2_step matches the reference for VP and VE on 2-D and image shapes."

    return run_check("4.2", "one DPM-Solver-2 step", body)
