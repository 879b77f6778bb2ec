"""Checks for chapter 05 (flow matching).

Exercise 5.1  ``conditional_flow(x0, eps, t, path) -> (x_t, u_t)``
Exercise 5.2  ``cfm_loss(model, x0, eps, t, path) -> scalar``
Exercise 5.3  ``velocity_to_score(v, x, t, path)`` and ``score_to_velocity(score, x, t, path)``
Exercise 5.4  ``ot_pair(x0, eps) -> eps reordered``
Exercise 5.5  ``marginal_velocity(x, t, means, stds, weights, path)``: the exact velocity of mixture data
Exercise 5.6  ``velocity_model``: the student's own trained network, measured on the 8-mode mixture

Every check draws fresh inputs from ``seed`` and uses the linear (rectified-flow) path with a
random sigma_min and a VP path with random betas, on 2-D points and images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..conversions import convert
from ..flow_matching import conditional_velocity, oracle_velocity, ot_coupling
from ..paths import LinearPath
from ..toy_data import GaussianMixture, eight_gaussians
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


# ---- 5.5 the marginal velocity of a Gaussian mixture ---------------------------------------------
def _mixture_velocity(x, t, means, stds, weights, path, *, mistake: str = ""):
    """sum_k p(k | x_t) (alpha' E[x0 | x_t, k] + sigma' E[eps | x_t, k]); ``mistake`` plants one."""
    a, s = path.alpha(t)[:, None, None], path.sigma(t)[:, None, None]  # (B, 1, 1)
    da, ds = path.d_alpha(t)[:, None, None], path.d_sigma(t)[:, None, None]
    sd = torch.zeros_like(stds) if mistake == "points" else stds
    var = a**2 * sd[None, :, None] ** 2 + s**2  # (B, K, 1)
    diff = x[:, None, :] - a * means[None]  # (B, K, D)
    if mistake == "clean responsibilities":
        log_r = torch.log(weights) - 0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1) / stds**2 \
            - x.shape[1] * torch.log(stds)
    else:
        log_r = torch.log(weights) - 0.5 * (diff**2).sum(-1) / var[..., 0] - 0.5 * x.shape[1] * torch.log(var[..., 0])
    r = weights[None].expand(x.shape[0], -1) if mistake == "prior weights" else torch.softmax(log_r, dim=1)
    x0 = means[None] + a * sd[None, :, None] ** 2 / var * diff
    eps = s / var * diff
    comp = da * x0 + ds * eps  # (B, K, D)
    if mistake == "velocity at the means":
        comp = da * means[None] + ds * eps
    return (r[..., None] * comp).sum(1)


def check_marginal_velocity(marginal_velocity: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 5.5: the exact marginal velocity of a Gaussian mixture under a path, at t = 0 and t = 1 too."""
    gen = _generator(seed)

    def body() -> str:
        for k, d in [(8, 2), (5, 3)]:
            means = 2 * torch.randn(k, d, generator=gen, dtype=torch.float64)
            stds = 0.05 + 0.45 * torch.rand(k, generator=gen, dtype=torch.float64)
            weights = torch.rand(k, generator=gen, dtype=torch.float64) + 0.2
            weights = weights / weights.sum()
            exact = GaussianMixture(means, stds, weights)
            for path in [*_paths(gen), LinearPath()]:  # sigma_min = 0 too: there sigma(0) = 0
                v_ref = oracle_velocity(exact, path)
                x = 2 * torch.randn(16, d, generator=gen, dtype=torch.float64)
                times = [("at t=1.00", torch.ones(16, dtype=torch.float64)),
                         ("at per-sample t", torch.rand(16, generator=gen, dtype=torch.float64))]
                if isinstance(path, LinearPath):  # the VP path's sigma' is infinite at t = 0
                    times.insert(0, ("at t=0.00", torch.zeros(16, dtype=torch.float64)))
                for when, t in times:
                    where = f"{when} for {k} components in {d}-D on the {_path_name(path)}"
                    got = call_student(marginal_velocity, "marginal_velocity", x.clone(), t.clone(), means.clone(),
                                       stds.clone(), weights.clone(), path, where=where)
                    if isinstance(got, Tensor) and got.shape == x.shape and not torch.isfinite(got).all() \
                            and when != "at per-sample t":
                        raise Mismatch(f"marginal_velocity returned NaN or inf {where}: E[eps | x] written as "
                                       "(x - alpha E[x0 | x]) / sigma is 0/0 where sigma = 0, and E[x0 | x] through "
                                       "the score divides by alpha = 0; use each component's Gaussian posterior, "
                                       "which is finite at both ends")

                    def mutant(m, x=x, t=t, means=means, stds=stds, weights=weights, path=path):
                        return _mixture_velocity(x, t, means, stds, weights, path, mistake=m)

                    compare("marginal_velocity", got, v_ref(x, t), where=where, mistakes={
                        "weights the components by the mixture weights w_k; the marginal velocity weights them by "
                        "the posterior p(k | x_t), which depends on x and t": mutant("prior weights"),
                        "treats each component as a point at its mean (its std s_k is left out)": mutant("points"),
                        "takes p(k | x_t) from the clean components N(mu_k, s_k^2); at time t component k is "
                        "N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)": mutant("clean responsibilities"),
                        "uses alpha' mu_k, not alpha' E[x0 | x_t, k]: given x_t, x0 is not the component's mean":
                            mutant("velocity at the means"),
                    })
        return ("marginal_velocity matches the exact velocity of the mixture on the linear and VP paths, in 2-D and "
                "3-D, at t = 1, at per-sample times and (linear path) at t = 0.")

    return run_check("5.5", "the marginal velocity of a Gaussian mixture", body)


# ---- 5.6 a measured training run ----------------------------------------------------------------
MEASURED_N, MEASURED_SETS, MEASURED_STEPS = 2000, 3, 100
MAX_MMD_RATIO, MAX_MODE_ERROR = 1.5, 0.025


def check_own_velocity_model(velocity_model: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 5.6: the student's trained velocity network on the 8-mode mixture (linear path,
    t = 1 noise): 100 Euler steps from fresh noise, MMD at most 1.5 x its floor (mean over 3 sets of 2000)
    and every mode's weight within 0.025 of 1/8 (the mean over the sets of the largest error); not the exact
    velocity."""
    gen = _generator(seed)

    def body() -> str:
        from ..metrics import make_reference, sample_quality

        data, path = eight_gaussians(), LinearPath()
        probe = 2.5 * torch.randn(64, 2, generator=gen)
        t_probe = torch.rand(64, generator=gen)
        with torch.no_grad():
            got = call_student(velocity_model, "velocity_model", probe.clone(), t_probe.clone(),
                               where="on 64 points with one time per sample")
        if not isinstance(got, Tensor) or got.shape != probe.shape:
            raise Mismatch(f"velocity_model returned {type(got).__name__} {tuple(getattr(got, 'shape', ()))} for "
                           "points of shape (64, 2) and t of shape (64,); expected a velocity per point, shape (64, 2)")
        exact = oracle_velocity(data, path)(probe.double(), t_probe.double())
        if torch.allclose(got.double(), exact, rtol=1e-3, atol=1e-3):
            raise Mismatch("velocity_model is the exact velocity of the mixture; the exercise is to train a network")
        reference = make_reference(data, MEASURED_N, repeats=MEASURED_SETS, generator=gen)
        x = torch.randn(MEASURED_N * MEASURED_SETS, 2, generator=gen)
        ts = torch.linspace(1.0, 0.0, MEASURED_STEPS + 1).tolist()
        with torch.no_grad():
            for a, b in zip(ts[:-1], ts[1:], strict=True):
                v = call_student(velocity_model, "velocity_model", x, torch.full((len(x),), a),
                                 where=f"while sampling with {MEASURED_STEPS} Euler steps")
                x = x + v.float() * (b - a)
        if not torch.isfinite(x).all():
            raise Mismatch(f"sampling velocity_model with {MEASURED_STEPS} Euler steps from t = 1 to 0 gave NaN or inf")
        q = sample_quality(x, reference)
        facts = (f"MMD {q.mmd_ratio:.2f} +/- {q.mmd_ratio_se:.2f} x its noise floor and a largest mode-weight error "
                 f"of {q.mode_error:.3f} ({MEASURED_SETS} sets of {MEASURED_N} samples, {MEASURED_STEPS} Euler steps)")
        if q.mmd_ratio > MAX_MMD_RATIO or q.mode_error > MAX_MODE_ERROR:
            raise Mismatch(f"your model reaches {facts}; at most {MAX_MMD_RATIO:g} x the floor and a mode-weight "
                           f"error of {MAX_MODE_ERROR} pass: train longer, with a learning-rate decay, or check the "
                           "time convention (t = 1 is noise, the target is eps - x0)")
        return (f"your trained velocity network samples the 8-mode mixture within {MAX_MMD_RATIO:g} x the MMD's noise "
                f"floor and {MAX_MODE_ERROR} of every mode's weight ({MEASURED_SETS} sets of {MEASURED_N} samples, "
                f"{MEASURED_STEPS} Euler steps).")

    return run_check("5.6", "your own flow-matching training run, measured", body)
