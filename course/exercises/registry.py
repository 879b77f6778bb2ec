"""Which exercises each chapter has, the names they define, their checks and their points.

This is the one place the syllabus, ``course check`` and grading read exercises from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from . import ch01, ch02, ch03, ch04, ch05, ch06, ch07, ch08, ch09, ch10, ch11, ch12
from .provenance import reference_use
from .verdict import CheckResult

__all__ = ["Exercise", "CHAPTERS", "REFERENCES", "get_exercise", "check", "run_checks", "uses_reference"]


@dataclass(frozen=True)
class Exercise:
    """One exercise: the functions the student defines and the check that verifies them."""

    id: str  # "1.2"
    title: str
    names: tuple[str, ...]  # functions the student's notebook must define, in check order
    check: Callable[..., CheckResult]
    points: float = 1.0

    @property
    def reference(self) -> tuple[str, ...]:
        """The course's own implementation of what the exercise asks for (dotted paths of functions,
        classes or modules): a solution that uses one gets no point (course.exercises.provenance)."""
        return REFERENCES.get(self.id, ())


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
        Exercise("3.3", "the likelihood integral of the augmented ODE", ("ode_log_likelihood",),
                 ch03.check_ode_log_likelihood),
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
        Exercise("5.5", "the marginal velocity of a Gaussian mixture", ("marginal_velocity",),
                 ch05.check_marginal_velocity),
        Exercise("5.6", "your own flow-matching training run, measured", ("velocity_model",),
                 ch05.check_own_velocity_model),
    ),
    "06_guidance": (
        Exercise("6.1", "the classifier-free guidance combination", ("cfg_combine",), ch06.check_cfg_combine),
        Exercise("6.2", "one classifier-guided DDIM step", ("guided_ddim_step",), ch06.check_guided_ddim_step),
        Exercise("6.3", "SDEdit: perturb, then denoise", ("sdedit",), ch06.check_sdedit),
        Exercise("6.4", "one classifier-guided ancestral step (Algorithm 1)", ("guided_ddpm_step",),
                 ch06.check_guided_ddpm_step),
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
    "09_text_to_image": (
        Exercise("9.1", "CLIP's symmetric InfoNCE loss", ("clip_loss",), ch09.check_clip_loss),
        Exercise("9.2", "cross-attention from image tokens to a padded caption", ("cross_attention",),
                 ch09.check_cross_attention),
        Exercise("9.3", "classifier-free guidance with the empty caption", ("guided_velocity",),
                 ch09.check_guided_velocity),
        Exercise("9.4", "the stroke thickness a caption's 'bold' refers to", ("stroke_thickness",),
                 ch09.check_stroke_thickness),
    ),
    "10_scaling_and_control": (
        Exercise("10.1", "one adaLN-Zero residual branch", ("adaln_zero_branch",), ch10.check_adaln_zero_branch),
        Exercise("10.2", "patchify and unpatchify", ("patchify", "unpatchify"), ch10.check_patchify),
        Exercise("10.3", "one PatchMatch propagation sweep", ("propagate",), ch10.check_propagate),
    ),
    "11_diffusion_and_gans": (
        Exercise("11.1", "Diffusion-GAN's discriminator input", ("diffusion_augment",), ch11.check_diffusion_augment),
        Exercise("11.2", "the LPIPS distance", ("lpips",), ch11.check_lpips),
        Exercise("11.3", "ADD's distillation loss", ("add_distillation_loss",), ch11.check_add_distillation_loss),
        Exercise("11.4", "the R1 penalty", ("r1_penalty",), ch11.check_r1_penalty),
    ),
    "12_autoregressive_diffusion": (
        Exercise("12.1", "the diffusion loss of a token given z", ("diffusion_loss",), ch12.check_diffusion_loss),
        Exercise("12.2", "which tokens a MAR step reveals", ("reveal_next",), ch12.check_reveal_next),
        Exercise("12.3", "the pyramid scheduling matrix", ("pyramid_matrix",), ch12.check_pyramid_matrix),
        Exercise("12.4", "one Diffusion Forcing step with a noise level per token", ("df_step",),
                 ch12.check_df_step),
    ),
}


# What each exercise may not use: the course's implementation of the same thing.
REFERENCES: dict[str, tuple[str, ...]] = {
    "1.1": ("course.sde",), "1.2": ("course.simulate",), "1.3": ("course.sde",),
    "2.1": ("course.losses",),
    "2.2": ("course.samplers.reverse_em_step", "course.samplers.sample_reverse_em",
            "course.samplers.reverse_diffusion_step"),
    "2.3": ("course.samplers.langevin_step", "course.samplers.snr_step_size", "course.samplers.langevin_dynamics",
            "course.samplers.sample_pc"),
    "2.4": ("course.samplers.sample_vp_pc_algorithm3", "course.samplers.sample_pc", "course.samplers.langevin_step",
            "course.samplers.snr_step_size"),
    "3.1": ("course.sde.SDE.probability_flow_drift", "course.conversions", "course.ode"),
    "3.2": ("course.ode.hutchinson_divergence", "course.ode.exact_divergence", "course.ode.log_likelihood"),
    "3.3": ("course.ode",),
    "4.1": ("course.fast_samplers.ddim_step", "course.fast_samplers.sample_ddim", "course.distillation.ddim_x0_step",
            "course.guidance.classifier_guided_ddim_step"),
    "4.2": ("course.fast_samplers.dpm_solver_2_step", "course.fast_samplers.dpm_solver_1_step",
            "course.fast_samplers.sample_dpm_solver_2", "course.fast_samplers.sample_dpm_solver_pp_2m"),
    "5.1": ("course.flow_matching",), "5.2": ("course.flow_matching",), "5.3": ("course.conversions",),
    "5.4": ("course.flow_matching",), "5.5": ("course.flow_matching", "course.toy_data", "course.conversions"),
    "5.6": ("course.flow_matching", "course.training", "course.recipes", "course.recipe_registry", "course.pretrained"),
    "6.1": ("course.guidance",), "6.2": ("course.guidance", "course.fast_samplers"), "6.3": ("course.guidance",),
    "6.4": ("course.guidance", "course.fast_samplers"),
    "7.1": ("course.distillation",), "7.2": ("course.consistency",), "7.3": ("course.consistency",),
    "7.4": ("course.consistency",),
    "8.1": ("course.autoencoder",), "8.2": ("course.flow_matching", "course.latent", "course.autoencoder"),
    "8.3": ("course.cascade",),
    "8.4": ("course.autoencoder", "course.latent", "course.pretrained", "course.recipe_registry", "course.recipes",
            "course.latent_recipes", "course.training"),
    "9.1": ("course.clip",), "9.2": ("course.transformer", "course.unet"), "9.3": ("course.text_to_image",
                                                                                    "course.guidance"),
    "9.4": ("course.captions",),
    "10.1": ("course.transformer", "course.dit"), "10.2": ("course.transformer", "course.dit"),
    "10.3": ("course.inpainting",),
    "11.1": ("course.gan",), "11.2": ("course.perceptual",), "11.3": ("course.adversarial",),
    "11.4": ("course.gan",),
    "12.1": ("course.autoregressive", "course.flow_matching"), "12.2": ("course.autoregressive",),
    "12.3": ("course.diffusion_forcing",), "12.4": ("course.diffusion_forcing", "course.autoregressive"),
}


def get_exercise(exercise_id: str) -> Exercise:
    """Look an exercise up by its id, e.g. ``"1.2"``."""
    for exercises in CHAPTERS.values():
        for ex in exercises:
            if ex.id == exercise_id:
                return ex
    known = ", ".join(ex.id for exs in CHAPTERS.values() for ex in exs)
    raise ValueError(f"unknown exercise {exercise_id!r}; known exercises: {known}")


def uses_reference(ex: Exercise, sources: Sequence[str]) -> CheckResult | None:
    """A failed verdict when the notebook's code (``sources``: its code cells) answers ``ex`` with
    the course's own implementation of it (see :mod:`course.exercises.provenance`), else None."""
    for name in ex.names:
        how = reference_use(sources, name, ex.reference)
        if how:
            return CheckResult(ex.id, ex.title, "failed",
                               f"{name} uses the course's reference implementation ({how}); write it yourself: "
                               "torch, math, the course's other helpers (such as expand_like) and the objects the "
                               "check passes in are fine")
    return None


def _cell_sources(namespace: Mapping[str, object] | None = None) -> list[str]:
    """The code run so far in this IPython session (its ``In`` list), or nothing outside IPython."""
    history = (namespace or {}).get("In")
    if history is None:
        try:
            from IPython import get_ipython

            shell = get_ipython()
            history = shell.user_ns.get("In") if shell is not None else None
        except ImportError:
            history = None
    return [s for s in history if isinstance(s, str)] if isinstance(history, list) else []


def check(exercise_id: str, *functions: Callable, seed: int | None = None) -> CheckResult:
    """Check the student's functions for one exercise, e.g. ``check("1.1", vp_drift, vp_diffusion)``."""
    ex = get_exercise(exercise_id)
    if len(functions) != len(ex.names):
        raise ValueError(f"exercise {ex.id} checks {len(ex.names)} function(s) "
                         f"({', '.join(ex.names)}); got {len(functions)}")
    return uses_reference(ex, _cell_sources()) or ex.check(*functions, seed=seed)


def run_checks(chapter: str, namespace: Mapping[str, object], *, seed: int | None = None,
               only: str | None = None, sources: Sequence[str] | None = None) -> list[CheckResult]:
    """Run every check of ``chapter`` (or only exercise ``only``, e.g. ``"1.2"``) on the
    functions found by name in ``namespace``. ``sources`` (the notebook's code cells; by default
    the IPython session's history) is read for answers that use the course's reference."""
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
        copied = uses_reference(ex, sources if sources is not None else _cell_sources(namespace))
        results.append(copied or ex.check(*(namespace[n] for n in ex.names), seed=seed))
    return results
