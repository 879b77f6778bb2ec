"""Checks for chapter 03 (probability-flow ODE and likelihood).

Exercise 3.1  ``probability_flow_drift(x, t, sde, score_fn)``
Exercise 3.2  ``hutchinson_divergence(velocity, x, t, probes)``
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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
