"""Checks for chapter 05 (flow matching).

Exercise 5.1  ``conditional_flow(x0, eps, t, path) -> (x_t, u_t)``
Exercise 5.2  ``cfm_loss(model, x0, eps, t, path) -> scalar``
Exercise 5.3  ``velocity_to_score(v, x, t, path)`` and ``score_to_velocity(score, x, t, path)``
Exercise 5.4  ``ot_pair(x0, eps) -> eps reordered``

Every check draws fresh inputs from ``seed`` and uses the linear (rectified-flow) path with a
random sigma_min and a VP path with random betas, on 2-D points and images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..conversions import convert
from ..flow_matching import conditional_velocity, ot_coupling
from ..paths import LinearPath
from ..utils import expand_like
from .ch01 import _generator, _random_vp
from .verdict import (
    CheckResult,
    Mismatch,
    call_student,
    check_gradient_path,
    compare,
    run_check,
    student_dtype,
)

SHAPES = [(16, 2), (4, 1, 6, 6)]


def _paths(gen: torch.Generator):
    sigma_min = 0.1 * torch.rand((), generator=gen).item()
    return [LinearPath(sigma_min=sigma_min), _random_vp(gen)]


def _path_name(path) -> str:
    return f"linear path (sigma_min={path.sigma_min:.3f})" if isinstance(path, LinearPath) else "VP path"


def _cases(gen: torch.Generator):
    """(path, shape, x0, eps, t, where) with per-sample times in (0.02, 0.98)."""
    for path in _paths(gen):
        for shape in SHAPES:
            x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
            eps = torch.randn(shape, generator=gen, dtype=torch.float64)
            t = 0.02 + 0.96 * torch.rand(shape[0], generator=gen, dtype=torch.float64)
            yield path, shape, x0, eps, t, f"for input shape {shape} on the {_path_name(path)}"


def check_conditional_flow(conditional_flow: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 5.1: x_t = alpha x0 + sigma eps and u_t = alpha' x0 + sigma' eps."""
    gen = _generator(seed)

    def body() -> str:
        for path, _, x0, eps, t, where in _cases(gen):
            got = call_student(conditional_flow, "conditional_flow", x0.clone(), eps.clone(), t.clone(),
                               path, where=where)
            if not isinstance(got, tuple) or len(got) != 2:
                raise Mismatch(f"conditional_flow returned {type(got).__name__} {where}; expected a "
                               f"tuple (x_t, u_t)")
            a, s = path.coefficients(t, x0)
            da, ds = path.derivatives(t, x0)
            compare("conditional_flow's x_t", got[0], a * x0 + s * eps, where=where, mistakes={
                "puts the noise at t = 0 (Lipman's convention); in this course t = 0 is data":
                    s * x0 + a * eps,
                "swaps x0 and eps": a * eps + s * x0,
            })
            compare("conditional_flow's u_t", got[1], conditional_velocity(path, x0, eps, t), where=where,
                    mistakes={
                "returns eps - x0, the target of the linear path with sigma_min = 0 only; use "
                "path.d_alpha(t) x0 + path.d_sigma(t) eps": eps - x0,
                "returns x0 - eps: that is the velocity in Lipman's time s = 1 - t": x0 - eps,
                "differentiates the wrong coefficients (alpha' eps + sigma' x0)": da * eps + ds * x0,
                "returns the path x_t, not its velocity": a * x0 + s * eps,
            })
        return "conditional_flow matches x_t and u_t on the linear and VP paths, 2-D and image shapes."

    return run_check("5.1", "conditional path sample and target", body)


class _TrainableField(nn.Module):
    """tanh(w x) - t x with a trainable w: the loss must have a gradient path to it."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x, t):
        return torch.tanh(self.w * x) - expand_like(t, x) * x


def check_cfm_loss(cfm_loss: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 5.2: mean over the batch of mean_d (model(x_t, t) - u_t)^2."""
    gen = _generator(seed)

    def body() -> str:
        for path, shape, x0, eps, t, where in _cases(gen):
            model = _TrainableField(0.5 + torch.rand((), generator=gen, dtype=torch.float64))

            a, s = path.coefficients(t, x0)
            x_t = a * x0 + s * eps
            u = conditional_velocity(path, x0, eps, t)
            got = call_student(cfm_loss, "cfm_loss", model, x0.clone(), eps.clone(), t.clone(), path,
                               where=where)
            if isinstance(got, torch.Tensor) and got.ndim == 1 and got.shape[0] == shape[0]:
                raise Mismatch(f"cfm_loss returned one value per sample (shape {tuple(got.shape)}) "
                               f"{where}; expected a scalar: average over the batch too")
            d = int(torch.tensor(shape[1:]).prod())
            err = (model(x_t, t) - u).pow(2).flatten(1)
            compare("cfm_loss", got, err.mean(), where=where, mistakes={
                f"sums over the {d} dimensions instead of averaging (off by a factor {d})": err.sum(1).mean(),
                "regresses onto x0; flow matching regresses onto the velocity u_t": (
                    model(x_t, t) - x0).pow(2).mean(),
                "regresses onto eps: that is the noise-prediction (DSM) target": (
                    model(x_t, t) - eps).pow(2).mean(),
                "evaluates the model at x0 instead of at x_t": (model(x0, t) - u).pow(2).mean(),
                "has the target's sign flipped (Lipman's time convention)": (model(x_t, t) + u).pow(2).mean(),
            })
            check_gradient_path("cfm_loss", got, err.mean(), model.parameters(), where=where)
        return ("cfm_loss matches the reference on the linear and VP paths, 2-D and image shapes, with a gradient "
                "path to the model.")

    return run_check("5.2", "the conditional flow-matching loss", body)


def check_velocity_score(velocity_to_score: Callable, score_to_velocity: Callable, *,
                         seed: int | None = None) -> CheckResult:
    """Exercise 5.3: both directions between the marginal velocity and the score."""
    gen = _generator(seed)

    def body() -> str:
        for path, _, x, v, t, where in _cases(gen):
            a, s = path.coefficients(t, x)
            da, ds = path.derivatives(t, x)
            score = convert(v, "velocity", "score", x, t, path)
            got = call_student(velocity_to_score, "velocity_to_score", v.clone(), x.clone(), t.clone(), path,
                               where=where)
            eps_wrong = (a * v - da * x) / (a * ds - da * s)
            compare("velocity_to_score", got, score, where=where, mistakes={
                "returns eps_hat; the score is -eps_hat / sigma": eps_wrong,
                "forgets the minus sign in score = -eps_hat / sigma": eps_wrong / s,
                "divides by sigma^2 instead of sigma": -eps_wrong / s**2,
            })
            got = call_student(score_to_velocity, "score_to_velocity", score.clone(), x.clone(), t.clone(),
                               path, where=where)
            eps_hat = -s * score
            x0_hat = (x - s * eps_hat) / a
            compare("score_to_velocity", got, v, where=where, mistakes={
                "uses eps_hat = +sigma * score; it is -sigma * score":
                    da * (x + s * eps_hat) / a - ds * eps_hat,
                "forgets the alpha' x0_hat term": ds * eps_hat,
                "forgets the sigma' eps_hat term": da * x0_hat,
                "returns x0_hat; the velocity is alpha' x0_hat + sigma' eps_hat": x0_hat,
            })
            round_trip = call_student(velocity_to_score, "velocity_to_score",
                                      call_student(score_to_velocity, "score_to_velocity", score.clone(),
                                                   x.clone(), t.clone(), path, where=where),
                                      x.clone(), t.clone(), path, where=where)
            compare("velocity_to_score(score_to_velocity(score))", round_trip, score, where=where)
        return ("velocity_to_score and score_to_velocity match the reference and round-trip on the "
                "linear and VP paths, 2-D and image shapes.")

    return run_check("5.3", "velocity <-> score conversion", body)


def check_ot_pair(ot_pair: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 5.4: reorder eps to minimise sum_i |x0_i - eps_pi(i)|^2 exactly."""
    gen = _generator(seed)

    def body() -> str:
        for n, shape in [(8, (2,)), (32, (2,)), (6, (1, 3, 3))]:
            x0 = torch.randn(n, *shape, generator=gen, dtype=torch.float64) + 1.0
            eps = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
            where = f"for a batch of {n} with sample shape {shape}"
            got = call_student(ot_pair, "ot_pair", x0.clone(), eps.clone(), where=where)
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(eps.shape):
                raise Mismatch(f"ot_pair returned {type(got).__name__} of shape "
                               f"{tuple(getattr(got, 'shape', ()))} {where}; expected eps reordered, "
                               f"shape {tuple(eps.shape)}")
            # a row of eps, stored in the student's dtype, matches to that dtype's rounding
            same = 1e-9 if student_dtype("ot_pair", got, where) == torch.float64 else \
                4 * torch.finfo(got.dtype).eps * max(1.0, float(eps.abs().max()))
            flat_got, flat_eps = got.detach().flatten(1).double(), eps.flatten(1)
            match = (flat_got[:, None, :] - flat_eps[None, :, :]).abs().amax(-1) < same
            if not (match.sum(1) == 1).all() or not (match.sum(0) == 1).all():
                if torch.allclose(got.double(), x0):
                    raise Mismatch(f"ot_pair {where} returned x0; return the noise eps reordered")
                raise Mismatch(f"ot_pair {where} did not return a reordering of eps: every row of "
                               f"eps must appear exactly once")
            best = ot_coupling(x0, eps)[1]

            def cost(e, x0=x0):
                return (x0 - e).pow(2).flatten(1).sum(1).sum().item()

            _, cols = linear_sum_assignment(torch.cdist(x0.flatten(1), eps.flatten(1)).numpy())
            mistakes = {
                "leaves the pairs as drawn (the independent coupling)": eps,
                "minimises the sum of distances; the OT cost here is the squared distance":
                    eps[torch.as_tensor(cols)],
            }
            chosen = eps[match.int().argmax(1)]  # the reordering the student returned, in float64
            if abs(cost(chosen) - cost(best)) > 1e-9:
                for hint, wrong in mistakes.items():
                    if torch.equal(chosen, wrong):
                        raise Mismatch(f"ot_pair {where}: {hint}; total squared cost "
                                       f"{cost(chosen):.4f} vs the optimum {cost(best):.4f}")
                raise Mismatch(f"ot_pair {where} is a reordering but not the optimal one: total squared "
                               f"cost {cost(chosen):.4f} vs the optimum {cost(best):.4f}")
        return "ot_pair returns the cost-minimising reordering of eps on 2-D and image batches."

    return run_check("5.4", "minibatch OT coupling", body)
