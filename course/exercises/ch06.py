"""Checks for chapter 06 (guidance).

Exercise 6.1  ``cfg_combine(model, x, t, y, w, null_label) -> (1 + w) cond - w uncond``
Exercise 6.2  ``guided_ddim_step(x, eps_hat, grad, scale, alpha_t, sigma_t, alpha_s, sigma_s)``
Exercise 6.3  ``sdedit(velocity_fn, x, t0, n_steps, eps, path)``
Exercise 6.4  ``guided_ddpm_step(x, eps_hat, grad, scale, alpha_t, sigma_t, alpha_s, sigma_s, z)``: Algorithm 1

Every check draws fresh inputs from ``seed``: random class-dependent models, random guidance
weights and scales, the linear path with a random sigma_min and a VP path with random betas, on
2-D points and images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..guidance import classifier_guided_ddpm_step
from ..utils import expand_like
from .ch01 import _generator
from .ch05 import _path_name, _paths
from .verdict import CheckResult, call_student, compare, run_check

SHAPES = [(16, 2), (4, 1, 6, 6)]


def _labelled_model(gen: torch.Generator, shape, n_classes: int):
    """A smooth model ``model(x, t, y=...)`` whose output depends on the label (the null class
    ``n_classes`` included), with clear errors for labels passed the wrong way."""
    dim = torch.Size(shape[1:]).numel()
    shift = torch.randn(n_classes + 1, dim, generator=gen, dtype=torch.float64)
    gain = 0.5 + torch.rand(n_classes + 1, generator=gen, dtype=torch.float64)

    def model(x: Tensor, t: Tensor, *, y: Tensor) -> Tensor:
        b = x.shape[0]
        if not isinstance(y, Tensor) or y.shape != (b,) or y.dtype != torch.long:
            raise ValueError(f"the model expects labels y as an int64 tensor of shape ({b},); got "
                             f"{type(y).__name__} {tuple(getattr(y, 'shape', ()))} {getattr(y, 'dtype', '')} "
                             "(torch.full_like(y, null_label) makes the null labels)")
        if y.min() < 0 or y.max() > n_classes:
            raise ValueError(f"the model knows labels 0..{n_classes - 1} and the null class {n_classes}; "
                             f"got {y.min().item()}..{y.max().item()}")
        if not isinstance(t, Tensor) or t.shape != (b,):
            raise ValueError(f"the model expects t as a tensor of shape ({b},)")
        out = torch.tanh(expand_like(gain[y], x) * x) + shift[y].reshape(x.shape)
        return out * (1 + expand_like(t, x))

    return model


def check_cfg_combine(cfg_combine: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 6.1: (1 + w) model(x, t, y=y) - w model(x, t, y=null)."""
    gen = _generator(seed)

    def body() -> str:
        for shape in SHAPES:
            n_classes = 3 + int(torch.randint(0, 5, (), generator=gen))
            model = _labelled_model(gen, shape, n_classes)
            for w in (0.5 + 3.5 * torch.rand((), generator=gen).item(), 0.0):
                x = torch.randn(shape, generator=gen, dtype=torch.float64)
                t = torch.rand(shape[0], generator=gen, dtype=torch.float64)
                y = torch.randint(0, n_classes, (shape[0],), generator=gen)
                where = f"at w={w:.2f} for input shape {shape}"
                got = call_student(cfg_combine, "cfg_combine", model, x.clone(), t.clone(), y.clone(), w, n_classes,
                                   where=where)
                c, u = model(x, t, y=y), model(x, t, y=torch.full_like(y, n_classes))
                mistakes = {
                    "uses the real labels in the unconditional call too: it needs y = null_label": c,
                    "swaps the conditional and unconditional terms": (1 + w) * u - w * c,
                    "returns the unconditional prediction only": u,
                }
                if w > 0:
                    mistakes.update({
                        "uses the other convention, w cond + (1 - w) uncond; here w = 0 is the plain conditional "
                        "model, i.e. (1 + w) cond - w uncond": w * c + (1 - w) * u,
                        "subtracts the guidance direction: cond - w (cond - uncond); it is cond + w (cond - uncond)":
                            (1 - w) * c + w * u,
                        "returns only the guidance direction w (cond - uncond)": w * (c - u),
                    })
                compare("cfg_combine", got, (1 + w) * c - w * u, where=where, mistakes=mistakes)
        return "cfg_combine matches (1 + w) cond - w uncond on 2-D and image shapes, w = 0 included."

    return run_check("6.1", "the classifier-free guidance combination", body)


def check_guided_ddim_step(guided_ddim_step: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 6.2: eps' = eps_hat - scale sigma_t grad, then the DDIM step with eps'."""
    gen = _generator(seed)

    def body() -> str:
        for path in _paths(gen):
            for shape in SHAPES:
                for t, s in [(0.9, 0.7), (0.5, 0.3), (0.1, 0.02)]:
                    x = torch.randn(shape, generator=gen, dtype=torch.float64)
                    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
                    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
                    scale = 0.5 + 4.5 * torch.rand((), generator=gen).item()
                    tt = torch.full((shape[0],), t, dtype=torch.float64)
                    ss = torch.full((shape[0],), s, dtype=torch.float64)
                    a_t, s_t, a_s, s_s = path.alpha(tt), path.sigma(tt), path.alpha(ss), path.sigma(ss)
                    where = f"from t={t} to s={s} at scale {scale:.2f} for input shape {shape} on the {_path_name(path)}"
                    got = call_student(guided_ddim_step, "guided_ddim_step", x.clone(), eps.clone(), grad.clone(),
                                       scale, a_t, s_t, a_s, s_s, where=where)
                    A_t, S_t, A_s, S_s = (expand_like(v, x) for v in (a_t, s_t, a_s, s_s))

                    def ddim(e, e_dir=None, x=x, A_t=A_t, S_t=S_t, A_s=A_s, S_s=S_s):
                        return A_s * (x - S_t * e) / A_t + S_s * (e if e_dir is None else e_dir)

                    guided = eps - scale * S_t * grad
                    compare("guided_ddim_step", got, ddim(guided), where=where, mistakes={
                        "adds the gradient: the score is -eps / sigma, so raising log p(y | x) means "
                        "eps_hat - scale * sigma_t * grad": ddim(eps + scale * S_t * grad),
                        "multiplies the gradient by sigma_t^2 (1 - alphabar) instead of sigma_t = sqrt(1 - alphabar)":
                            ddim(eps - scale * S_t**2 * grad),
                        "leaves out sigma_t: eps_hat - scale * grad": ddim(eps - scale * grad),
                        "uses sigma_s (the target time) in the guidance term; the gradient is taken at t":
                            ddim(eps - scale * S_s * grad),
                        "leaves out the scale": ddim(eps - S_t * grad),
                        "guides only the direction term; x0_hat must use the guided eps as well":
                            ddim(eps, guided),
                        "is the unguided DDIM step (the gradient is not used)": ddim(eps),
                    })
        return "guided_ddim_step matches Algorithm 2 on the linear and VP paths, 2-D and image shapes."

    return run_check("6.2", "one classifier-guided DDIM step", body)


def _velocity_field(gen: torch.Generator):
    """A smooth velocity field that depends on x and t."""
    w = 0.5 + torch.rand((), generator=gen, dtype=torch.float64)

    def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
        if not isinstance(t, Tensor) or t.shape != (x.shape[0],):
            raise ValueError(f"velocity_fn expects t as a tensor of shape ({x.shape[0]},), one time per sample "
                             f"(torch.full((B,), t)); got {type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
        return torch.tanh(w * x) + 0.5 * expand_like(t, x) * x

    return velocity_fn


def _euler(velocity_fn: Callable, x: Tensor, grid: list[float], *, sign: float = 1.0, late: bool = False) -> Tensor:
    """Euler over ``grid``; ``sign=-1`` and ``late=True`` are the planted mistakes."""
    for a, b in zip(grid[:-1], grid[1:], strict=True):
        x = x + velocity_fn(x, torch.full((x.shape[0],), b if late else a, dtype=x.dtype)) * sign * (b - a)
    return x


def check_sdedit(sdedit: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 6.3: x_t0 = alpha(t0) x + sigma(t0) eps, then n_steps Euler steps from t0 to 0."""
    gen = _generator(seed)

    def body() -> str:
        for path in _paths(gen):
            for shape in SHAPES:
                for t0, n_steps in [(0.6, 6), (0.25 + 0.5 * torch.rand((), generator=gen).item(),
                                                3 + int(torch.randint(0, 5, (), generator=gen)))]:
                    x = torch.randn(shape, generator=gen, dtype=torch.float64)
                    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
                    velocity_fn = _velocity_field(gen)
                    where = f"from t0={t0:.2f} in {n_steps} steps for input shape {shape} on the {_path_name(path)}"
                    got = call_student(sdedit, "sdedit", velocity_fn, x.clone(), t0, n_steps, eps.clone(), path,
                                       where=where)
                    a, s = path.coefficients(t0, x)
                    x_t0 = a * x + s * eps

                    def grid(start, n):
                        return torch.linspace(start, 0.0, n + 1, dtype=torch.float64).tolist()

                    compare("sdedit", got, _euler(velocity_fn, x_t0, grid(t0, n_steps)), where=where, mistakes={
                        "returns the perturbed input x_t0 without denoising it": x_t0,
                        "perturbs with x + sigma(t0) eps; the forward process also scales x by alpha(t0)":
                            _euler(velocity_fn, x + s * eps, grid(t0, n_steps)),
                        "integrates from t = 1 instead of from t0": _euler(velocity_fn, x_t0, grid(1.0, n_steps)),
                        "starts from pure noise eps at t = 1: SDEdit starts from the perturbed input at t0":
                            _euler(velocity_fn, eps, grid(1.0, n_steps)),
                        f"takes {n_steps - 1} steps; {n_steps} steps need a grid of n_steps + 1 times "
                        "(torch.linspace(t0, 0, n_steps + 1))": _euler(velocity_fn, x_t0, grid(t0, n_steps - 1)),
                        f"takes {n_steps + 1} steps; {n_steps} steps need a grid of n_steps + 1 times":
                            _euler(velocity_fn, x_t0, grid(t0, n_steps + 1)),
                        "steps forward in time (dt > 0); from t0 to 0 each step is dt = t_next - t < 0":
                            _euler(velocity_fn, x_t0, grid(t0, n_steps), sign=-1.0),
                        "evaluates the velocity at the end of each step (t_next); Euler uses its start t":
                            _euler(velocity_fn, x_t0, grid(t0, n_steps), late=True),
                    })
        return "sdedit perturbs to t0 and integrates back to 0 like the reference on the linear and VP paths."

    return run_check("6.3", "SDEdit: perturb, then denoise", body)



# ---- 6.4 Algorithm 1: the classifier-guided ancestral step -----------------------------------------
def _ddpm(x, e, grad, scale, z, a_t, s_t, a_s, s_s, *, mistake: str = ""):
    """The ancestral step from t to s written out, with one planted ``mistake`` (the reference is
    ``course.guidance.classifier_guided_ddpm_step``)."""
    var = s_s**2 * (1 - (a_t * s_s) ** 2 / (a_s * s_t) ** 2)  # Sigma = c^2 of q(x_s | x_t, x_0)
    if mistake == "algorithm 2":
        e = e - scale * s_t * grad
    x0 = (x - s_t * e) / a_t
    mean = a_s * x0 + (s_s**2 - var).sqrt() * e
    if mistake == "ddim mean":
        mean = a_s * x0 + s_s * e
    shift = {"no sigma": scale * grad, "forward variance": scale * s_t**2 * grad, "minus": -scale * var * grad,
             "unguided": 0 * grad, "algorithm 2": 0 * grad}.get(mistake, scale * var * grad)
    noise = {"variance as std": var * z, "no noise": 0 * z}.get(mistake, var.sqrt() * z)
    return mean + shift + noise


def check_guided_ddpm_step(guided_ddpm_step: Callable, *, seed: int | None = None) -> CheckResult:
    """Exercise 6.4: x_s ~ N(mu + scale Sigma grad, Sigma), mu and Sigma those of the DDPM posterior."""
    gen = _generator(seed)

    def body() -> str:
        for path in _paths(gen):
            for shape in SHAPES:
                for t, s in [(0.9, 0.7), (0.5, 0.3), (0.1, 0.02)]:
                    x, eps, grad, z = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
                    scale = 0.5 + 4.5 * torch.rand((), generator=gen).item()
                    tt = torch.full((shape[0],), t, dtype=torch.float64)
                    ss = torch.full((shape[0],), s, dtype=torch.float64)
                    coefs = (path.alpha(tt), path.sigma(tt), path.alpha(ss), path.sigma(ss))
                    where = f"from t={t} to s={s} at scale {scale:.2f} for input shape {shape} on the {_path_name(path)}"
                    got = call_student(guided_ddpm_step, "guided_ddpm_step", x.clone(), eps.clone(), grad.clone(),
                                       scale, *(c.clone() for c in coefs), z.clone(), where=where)
                    expanded = [expand_like(c, x) for c in coefs]

                    def step(m="", x=x, eps=eps, grad=grad, scale=scale, z=z, expanded=expanded):
                        return _ddpm(x, eps, grad, scale, z, *expanded, mistake=m)

                    reference = classifier_guided_ddpm_step(x, tt, ss, eps, grad, path, scale=scale, z=z)
                    compare("guided_ddpm_step", got, reference, where=where, mistakes={
                        "shifts the mean by scale * grad: Algorithm 1 shifts it by scale * Sigma * grad, Sigma the "
                        "step's variance": step("no sigma"),
                        "shifts the mean by scale * sigma_t^2 * grad; Sigma is the variance of the step from t to s, "
                        "not of the noise at t": step("forward variance"),
                        "moves against the classifier's gradient: the shift is + scale * Sigma * grad":
                            step("minus"),
                        "adds Sigma * z; the noise has standard deviation sqrt(Sigma)": step("variance as std"),
                        "adds no noise: Algorithm 1 samples x_s from N(mu + scale Sigma grad, Sigma)": step("no noise"),
                        "uses the deterministic DDIM mean alpha_s x0_hat + sigma_s eps_hat; the ancestral step's mean "
                        "keeps only sqrt(sigma_s^2 - Sigma) of eps_hat": step("ddim mean"),
                        "is the unguided ancestral step (the gradient is not used)": step("unguided"),
                        "guides eps_hat like Algorithm 2 (eps_hat - scale sigma_t grad) instead of shifting the "
                        "ancestral step's mean": step("algorithm 2"),
                    })
        return "guided_ddpm_step matches Algorithm 1 on the linear and VP paths, 2-D and image shapes."

    return run_check("6.4", "one classifier-guided ancestral step (Algorithm 1)", body)
