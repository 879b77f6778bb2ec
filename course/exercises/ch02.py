"""Checks for chapter 02 (denoising score matching and reverse-time sampling).

Exercise 2.1  ``dsm_loss(score_model, x0, t, eps, sde) -> scalar``
Exercise 2.2  ``reverse_em_step(x, t, dt, sde, score_fn, z)``
Exercise 2.3  ``langevin_corrector_step(x, t, score_fn, z, snr)``
Exercise 2.4  ``vp_pc_sampler(score_fn, x_init, n_steps, sde, corrector_steps, snr, generator)``
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..losses import dsm_loss_terms
from ..samplers import reverse_em_step as reference_reverse_em_step
from ..samplers import sample_vp_pc_algorithm3, snr_step_size
from ..sde import VESDE
from ..utils import expand_like
from .ch01 import _generator, _random_vp
from .verdict import (
    CheckResult,
    Mismatch,
    call_student,
    check_gradient_path,
    compare,
    describe_where,
    run_check,
    student_dtype,
)

SHAPES = [(16, 2), (4, 1, 8, 8)]
TIMES = [0.05, 0.3, 0.7, 1.0]


def _score_models(gen: torch.Generator) -> dict[str, Callable]:
    """Two score functions that work on any shape: a Gaussian's exact score and a non-linear one."""
    s = 0.3 + torch.rand((), generator=gen).item()

    def gaussian(sde):
        def score(x, t):
            var = sde.alpha(t) ** 2 * s**2 + sde.sigma(t) ** 2
            return -x / expand_like(var, x)
        return score

    def wiggly(sde):
        def score(x, t):
            return torch.sin(2 * x) * expand_like(1 + t, x) - x
        return score

    return {"the exact score of Gaussian data": gaussian, "a non-linear test score": wiggly}


def _sdes(gen: torch.Generator):
    u = torch.rand((), generator=gen).item()
    return [_random_vp(gen), VESDE(sigma_min=0.01, sigma_max=5.0 + 10 * u)]


def _cases(gen: torch.Generator):
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        for t in TIMES:
            yield t, shape, x, torch.full((shape[0],), t, dtype=torch.float64)
        yield "per-sample times t of shape (B,)", shape, x, 0.05 + 0.95 * torch.rand(
            shape[0], generator=gen, dtype=torch.float64)


def _sde_score_cases(gen: torch.Generator):
    """Every (sde, score label, score, t, shape, x, t tensor) combination a check runs:
    VP and VE, two score functions, 2-D and image shapes, several t."""
    for sde in _sdes(gen):
        for label, make in _score_models(gen).items():
            score = make(sde)
            for t, shape, x, tt in _cases(gen):
                yield sde, label, score, t, shape, x, tt


class _TrainableScore(nn.Module):
    """A planted score function with one parameter (a gain, 1 at the start): the loss must have a
    gradient path to it, as a network's loss must to its weights."""

    def __init__(self, score: Callable):
        super().__init__()
        self.score = score
        self.gain = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, t):
        return self.gain * self.score(x, t)


def check_dsm_loss(dsm_loss: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 2.1: mean over the batch and dimensions of (sigma s(x_t, t) + eps)^2, with a gradient
    path to the score model's parameters."""
    gen = _generator(seed)

    def body() -> str:
        for sde, label, plain, t, shape, x0, tt in _sde_score_cases(gen):
            score = _TrainableScore(plain)
            eps = torch.randn(shape, generator=gen, dtype=torch.float64)
            where = f"{describe_where(t, shape)} for the {sde.name} SDE with {label}"
            got = call_student(dsm_loss, "dsm_loss", score, x0.clone(), tt.clone(), eps.clone(),
                               sde, where=where)
            ref = dsm_loss_terms(score, x0, tt, eps, sde, prediction="score").mean()
            a, sig = expand_like(sde.alpha(tt), x0), expand_like(sde.sigma(tt), x0)
            x_t = a * x0 + sig * eps
            s = score(x_t, tt)
            returned = got  # the tensor the student returned (its gradient is asked for by identity)
            if isinstance(got, torch.Tensor) and got.numel() == 1 and got.ndim > 0:
                got = got.reshape(())
            compare("dsm_loss", got, ref, where=where, mistakes={
                "drops the weight lambda(t) = sigma(t)^2: (s + eps/sigma)^2 is unweighted":
                    (s + eps / sig).pow(2).mean(),
                "has the sign of the target flipped: the target score is -eps / sigma":
                    (sig * s - eps).pow(2).mean(),
                "sums over data dimensions; average over them (and over the batch)":
                    (sig * s + eps).pow(2).flatten(1).sum(1).mean(),
                "forgets alpha(t) when building x_t = alpha x0 + sigma eps":
                    (sig * score(x0 + sig * eps, tt) + eps).pow(2).mean(),
                "uses -eps as the target score; it is -eps / sigma(t)":
                    (sig**2 * (s + eps).pow(2)).mean(),
            })
            check_gradient_path("dsm_loss", returned, ref, score.parameters(), where=where)
        return ("dsm_loss matches the reference for VP and VE, two score models, 2-D and image "
                "shapes and several t, with a gradient path to the model.")

    return run_check("2.1", "denoising score matching loss", body)


def check_reverse_em_step(reverse_em_step: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 2.2: x - [f(x, t) - g(t)^2 s(x, t)] dt + g(t) sqrt(dt) z."""
    gen = _generator(seed)

    def body() -> str:
        for sde, label, score, t, shape, x, tt in _sde_score_cases(gen):
            dt = float(0.001 + 0.03 * torch.rand((), generator=gen))
            z = torch.randn(shape, generator=gen, dtype=torch.float64)
            where = f"{describe_where(t, shape)} for the {sde.name} SDE with {label} and dt={dt:.3g}"
            x_in = x.clone()
            got = call_student(reverse_em_step, "reverse_em_step", x_in, tt.clone(), dt, sde,
                               score, z.clone(), where=where)
            if not torch.equal(x_in, x):
                raise Mismatch(f"reverse_em_step changed its input x in place {where}")
            f, g = sde.drift(x, tt), expand_like(sde.diffusion(tt), x)
            s, noise = score(x, tt), g * math.sqrt(dt) * z
            compare("reverse_em_step", got, reference_reverse_em_step(x, tt, dt, sde, score, z),
                    where=where, mistakes={
                "uses 1/2 g^2 s: that is the probability-flow ODE drift, not the reverse SDE's "
                "g^2 s": x - (f - 0.5 * g**2 * s) * dt + noise,
                "uses g(t) s instead of g(t)^2 s": x - (f - g * s) * dt + noise,
                "steps forward in time: going from t to t - dt subtracts the drift f - g^2 s "
                "times dt": x + (f - g**2 * s) * dt + noise,
                "adds the score term with the wrong sign": x - (f + g**2 * s) * dt + noise,
                "scales the noise by dt instead of sqrt(dt)": x - (f - g**2 * s) * dt + g * dt * z,
                "forgets the noise term g(t) sqrt(dt) z": x - (f - g**2 * s) * dt,
            })
        return ("reverse_em_step matches the reference for VP and VE, two score models, 2-D and "
                "image shapes and several t.")

    return run_check("2.2", "one reverse-time Euler-Maruyama step", body)


def check_langevin_corrector_step(langevin_corrector_step: Callable, *, seed: int | None = None
                                  ) -> CheckResult:
    """Exercise 2.3: eps = 2 (r mean||z|| / mean||s||)^2, then x + eps s + sqrt(2 eps) z."""
    gen = _generator(seed)

    def body() -> str:
        sde = _random_vp(gen)
        for label, make in _score_models(gen).items():
            score = make(sde)
            for t, shape, x, tt in _cases(gen):
                snr = float(0.05 + 0.25 * torch.rand((), generator=gen))
                z = torch.randn(shape, generator=gen, dtype=torch.float64)
                where = f"{describe_where(t, shape)} with {label} and snr={snr:.3g}"
                got = call_student(langevin_corrector_step, "langevin_corrector_step", x.clone(),
                                   tt.clone(), score, z.clone(), snr, where=where)
                s = score(x, tt)
                eps = snr_step_size(s, z, snr)
                per_sample = expand_like(2 * (snr * z.flatten(1).norm(dim=1)
                                              / s.flatten(1).norm(dim=1)) ** 2, x)
                compare("langevin_corrector_step", got, x + eps * s + torch.sqrt(2 * eps) * z,
                        where=where, mistakes={
                    "uses per-sample norms; the step size uses the batch averages of ||z|| and ||s||":
                        x + per_sample * s + torch.sqrt(2 * per_sample) * z,
                    "forgets the factor 2 in eps = 2 (r ||z|| / ||s||)^2":
                        x + eps / 2 * s + torch.sqrt(eps) * z,
                    "uses sqrt(eps) for the noise; Langevin noise is sqrt(2 eps) z":
                        x + eps * s + torch.sqrt(eps) * z,
                    "does not square the ratio r ||z|| / ||s||":
                        x + math.sqrt(2) * eps.sqrt() * s + torch.sqrt(2 * math.sqrt(2) * eps.sqrt()) * z,
                })
        return ("langevin_corrector_step matches the reference for two score models, 2-D and "
                "image shapes, several t and SNRs.")

    return run_check("2.3", "Langevin corrector step with SNR step size", body)


def _mutant_algorithm3(score_fn, x_init, n, sde, m, snr, generator, *, mistake):
    """Algorithm 3 with one named mistake, to recognise what a student's loop gets wrong."""
    t_min, dt = 1e-3, (1 - 1e-3) / n
    ts = [t_min + (1 - t_min) * i / n for i in range(n + 1)]
    x = x_init
    for i in range(n - 1, -1, -1):
        t_next = torch.full((x.shape[0],), ts[i + 1], dtype=x.dtype)
        t_score = torch.full((x.shape[0],), ts[i] if mistake == "predictor time" else ts[i + 1],
                             dtype=x.dtype)
        beta = expand_like(sde.beta(t_next) * dt, x)
        x = (2 - torch.sqrt(1 - beta)) * x + beta * score_fn(x, t_score)
        x = x + torch.sqrt(beta) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        t_corr = ts[i + 1] if mistake == "corrector time" else ts[i]
        tc = torch.full((x.shape[0],), t_corr, dtype=x.dtype)
        for _ in range(m):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            s = score_fn(x, tc)
            eps = snr_step_size(s, z, snr)
            x = x + eps * s + torch.sqrt(2 * eps) * z
    return x


def check_vp_pc_sampler(vp_pc_sampler: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 2.4: Algorithm 3, compared with the reference on the same random numbers."""
    gen = _generator(seed)

    def body() -> str:
        sde = _random_vp(gen)
        score = _score_models(gen)["the exact score of Gaussian data"](sde)
        for shape in SHAPES:
            for n, m in [(40, 0), (40, 2), (25 + int(sde.beta_max), 1)]:
                snr = float(0.05 + 0.2 * torch.rand((), generator=gen))
                x_init = torch.randn(shape, generator=gen, dtype=torch.float64)
                noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
                where = f"for input shape {shape} with N={n}, M={m}, snr={snr:.3g}"
                got = call_student(vp_pc_sampler, "vp_pc_sampler", score, x_init.clone(), n, sde, m,
                                   snr, torch.Generator().manual_seed(noise_seed), where=where)
                # torch.randn draws other numbers in float32 than in float64: a sampler that computes
                # in float32 is compared with the reference run in float32 on the same generator
                dtype = student_dtype("vp_pc_sampler", got, where) if isinstance(got, torch.Tensor) \
                    else torch.float64
                x_ref = x_init.to(dtype)
                ref = sample_vp_pc_algorithm3(score, x_ref, n, sde=sde, corrector_steps=m, snr=snr,
                                              generator=torch.Generator().manual_seed(noise_seed)).double()
                mistakes = {
                    "evaluates the predictor's score at t_i; Algorithm 3 uses s(x_{i+1}, t_{i+1})":
                        "predictor time",
                    "runs the corrector at t_{i+1}; after the predictor step x_i lives at t_i":
                        "corrector time",
                }
                compare("vp_pc_sampler", got, ref, where=where, rtol=1e-6, atol=1e-8, mistakes={
                    hint: _mutant_algorithm3(score, x_ref, n, sde, m, snr,
                                             torch.Generator().manual_seed(noise_seed), mistake=key).double()
                    for hint, key in mistakes.items()
                })
        return "vp_pc_sampler reproduces Algorithm 3 exactly on 2-D and image shapes, with and without corrector steps."

    return run_check("2.4", "predictor-corrector sampling, Algorithm 3", body)


__all__ = ["check_dsm_loss", "check_reverse_em_step", "check_langevin_corrector_step",
           "check_vp_pc_sampler"]
