"""Which exercises each chapter has, the names they define, their checks and their points.

This is the one place the syllabus, ``course check`` and grading read exercises from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import ch01, ch02, ch03, ch04, ch05, ch06, ch07, ch08
from .verdict import CheckResult

__all__ = ["Exercise", "CHAPTERS", "get_exercise", "check", "run_checks"]


@dataclass(frozen=True)
class Exercise:
    """One exercise: the functions the student defines and the check that verifies them."""

    id: str  # "1.2"
    title: str
    names: tuple[str, ...]  # functions the student's notebook must define, in check order
    check: Callable[..., CheckResult]
    points: float = 1.0


CHAPTERS: dict[str, tuple[Exercise, ...]] = {
    "01_forward_sdes": (
        Exercise("1.1", "VP drift and diffusion", ("vp_drift", "vp_diffusion"),
                 ch01.check_vp_drift_diffusion),
        Exercise("1.2", "one Euler-Maruyama step", ("euler_maruyama_step",),
                 ch01.check_euler_maruyama_step),
        Exercise("1.3", "VP marginal mean and std", ("vp_marginal",), ch01.check_vp_marginal),
    ),
    "02_reverse_sde": (
        Exercise("2.1", "denoising score matching loss", ("dsm_loss",), ch02.check_dsm_loss),
        Exercise("2.2", "one reverse-time Euler-Maruyama step", ("reverse_em_step",),
                 ch02.check_reverse_em_step),
        Exercise("2.3", "Langevin corrector step with SNR step size", ("langevin_corrector_step",),
                 ch02.check_langevin_corrector_step),
        Exercise("2.4", "predictor-corrector sampling, Algorithm 3", ("vp_pc_sampler",),
                 ch02.check_vp_pc_sampler),
    ),
    "03_probability_flow": (
        Exercise("3.1", "probability-flow drift", ("probability_flow_drift",),
                 ch03.check_probability_flow_drift),
        Exercise("3.2", "Hutchinson divergence estimator", ("hutchinson_divergence",),
                 ch03.check_hutchinson_divergence),
    ),
    "04_fast_sampling": (
        Exercise("4.1", "one DDIM step", ("ddim_step",), ch04.check_ddim_step),
        Exercise("4.2", "one DPM-Solver-2 step", ("dpm_solver_2_step",), ch04.check_dpm_solver_2_step),
    ),
    "05_flow_matching": (
        Exercise("5.1", "conditional path sample and target", ("conditional_flow",),
                 ch05.check_conditional_flow),
        Exercise("5.2", "the conditional flow-matching loss", ("cfm_loss",), ch05.check_cfm_loss),
        Exercise("5.3", "velocity <-> score conversion", ("velocity_to_score", "score_to_velocity"),
                 ch05.check_velocity_score),
        Exercise("5.4", "minibatch OT coupling", ("ot_pair",), ch05.check_ot_pair),
    ),
    "06_guidance": (
        Exercise("6.1", "the classifier-free guidance combination", ("cfg_combine",), ch06.check_cfg_combine),
        Exercise("6.2", "one classifier-guided DDIM step", ("guided_ddim_step",), ch06.check_guided_ddim_step),
        Exercise("6.3", "SDEdit: perturb, then denoise", ("sdedit",), ch06.check_sdedit),
    ),
    "07_distillation_consistency": (
        Exercise("7.1", "the progressive-distillation target", ("two_step_target",), ch07.check_two_step_target),
        Exercise("7.2", "the skip parameterisation and its boundary condition", ("skip_coefficients",),
                 ch07.check_skip_coefficients),
        Exercise("7.3", "the consistency-distillation loss with a stop-gradient target", ("cd_loss",),
                 ch07.check_cd_loss),
        Exercise("7.4", "multistep consistency sampling", ("multistep_consistency",),
                 ch07.check_multistep_consistency),
    ),
    "08_latent_diffusion": (
        Exercise("8.1", "the reparameterised posterior sample and its KL", ("posterior_sample_and_kl",),
                 ch08.check_posterior_sample_and_kl),
        Exercise("8.2", "the latent CFM loss through a frozen encoder", ("latent_cfm_loss",),
                 ch08.check_latent_cfm_loss),
        Exercise("8.3", "noise-conditioning augmentation for the super-resolution stage", ("sr_condition",),
                 ch08.check_sr_condition),
        Exercise("8.4", "your own autoencoder, measured on held-out digits", ("encode", "decode"),
                 ch08.check_own_autoencoder),
    ),
}


def get_exercise(exercise_id: str) -> Exercise:
    """Look an exercise up by its id, e.g. ``"1.2"``."""
    for exercises in CHAPTERS.values():
        for ex in exercises:
            if ex.id == exercise_id:
                return ex
    known = ", ".join(ex.id for exs in CHAPTERS.values() for ex in exs)
    raise ValueError(f"unknown exercise {exercise_id!r}; known exercises: {known}")


def check(exercise_id: str, *functions: Callable, seed: int | None = None) -> CheckResult:
    """Check the student's functions for one exercise, e.g. ``check("1.1", vp_drift, vp_diffusion)``."""
    ex = get_exercise(exercise_id)
    if len(functions) != len(ex.names):
        raise ValueError(f"exercise {ex.id} checks {len(ex.names)} function(s) "
                         f"({', '.join(ex.names)}); got {len(functions)}")
    return ex.check(*functions, seed=seed)


def run_checks(chapter: str, namespace: Mapping[str, object], *, seed: int | None = None,
               only: str | None = None) -> list[CheckResult]:
    """Run every check of ``chapter`` (or only exercise ``only``, e.g. ``"1.2"``) on the
    functions found by name in ``namespace``."""
    if chapter not in CHAPTERS:
        raise ValueError(f"unknown chapter {chapter!r}; expected one of {', '.join(CHAPTERS)}")
    exercises = [ex for ex in CHAPTERS[chapter] if only is None or ex.id == only]
    if not exercises:
        raise ValueError(f"chapter {chapter} has no exercise {only!r}; it has "
                         f"{', '.join(ex.id for ex in CHAPTERS[chapter])}")
    results = []
    for ex in exercises:
        missing = [n for n in ex.names if not callable(namespace.get(n))]
        if missing:
            results.append(CheckResult(ex.id, ex.title, "error",
                                       f"no function named {', '.join(missing)} was defined: "
                                       "run its cell and keep the name the exercise gives"))
            continue
        results.append(ex.check(*(namespace[n] for n in ex.names), seed=seed))
    return results
