"""Reference library of the diffusion-models course.

Modules (one concept each):

- ``course.utils``: seeding, devices, the broadcasting helper ``expand_like``, fast/offline modes,
  input validation.
- ``course.paths``: the Gaussian-path core x_t = alpha(t) x_0 + sigma(t) eps.
- ``course.sde``: VE, VP and sub-VP SDEs (Song et al. 2021), reverse-time and probability-flow drifts.
- ``course.toy_data``: 2-D toy distributions; Gaussian mixtures with exact perturbed scores.
- ``course.simulate``: Euler-Maruyama simulation and checks against the closed form.
- ``course.conversions``: score / eps / x0 predictions of any Gaussian path, in one place.
- ``course.losses``: denoising score matching.
- ``course.nets``: small time-conditioned networks for 2-D data.
- ``course.training``: the training loop (EMA, clipping, checkpoints).
- ``course.samplers``: reverse-time Euler-Maruyama, predictor-corrector, Algorithm 3, Langevin.
- ``course.ode``: the probability-flow ODE, its solvers and exact likelihoods.
- ``course.fast_samplers``: DDPM, DDIM, DPM-Solver and time grids.
- ``course.metrics``: distances between point clouds beside their noise floors.
- ``course.plotting``: figures, everything passed as arguments.
- ``course.exercises``: exercise checks, the registry, the notebook pipeline.
"""

from .utils import default_device, expand_like, fast_mode, offline_mode, pick, seed_everything

__version__ = "0.1.0"
__all__ = ["default_device", "expand_like", "fast_mode", "offline_mode", "pick", "seed_everything"]
