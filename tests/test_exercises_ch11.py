"""Chapter 11 checks, proven both ways: the solutions pass (also in float32), the stubs, the course's
own functions and planted mistakes fail with one clear line that names the mistake."""

import pytest
import torch

from course.exercises import check
from course.gan import diffuse_pair
from course.perceptual import layer_distances
from tests.exercise_harness import assert_solutions_pass, assert_stubs_state_the_task
from tests.notebook_code import notebook_functions
from tests.test_exercises_ch01 import _assert_clean_failure

CHAPTER = "11_diffusion_and_gans"
NAMES = ("diffusion_augment", "lpips", "add_distillation_loss", "r1_penalty")
SOLUTION = notebook_functions(f"solutions/{CHAPTER}.ipynb", NAMES)
STUB = notebook_functions(f"exercises/{CHAPTER}.ipynb")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solutions_pass(seed):
    assert_solutions_pass(CHAPTER, SOLUTION, ["11.1", "11.2", "11.3", "11.4"], seed)


def _float32(fn):
    def wrapped(*args):
        cast = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else
                [b.float() for b in a] if isinstance(a, list) else a for a in args]
        return fn(*cast)
    wrapped.__name__ = fn.__name__
    return wrapped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_answers_pass(seed):
    for ex, name in (("11.1", "diffusion_augment"), ("11.2", "lpips")):
        result = check(ex, _float32(SOLUTION[name]), seed=seed)
        assert result.passed, str(result)


def test_stubs_fail_cleanly_and_state_the_task_not_the_code():
    assert_stubs_state_the_task(CHAPTER, STUB, NAMES, "Exercise 11.",
                                ("torch.", "sqrt(", ".norm(", "autograd", ".detach(", "create_graph", "mean("))


def test_the_course_functions_are_not_answers():
    def course_augment(real, fake, t_max, u, e_r, e_f):
        return diffuse_pair(real, fake, t_max)

    course_augment.__module__ = "course.gan"
    _assert_clean_failure(check("11.1", course_augment, seed=0), "course's own reference")
    _assert_clean_failure(check("11.2", layer_distances, seed=0), "course's own reference")


# ---- 11.1 ----------------------------------------------------------------------------------------
def _augment(kind):
    def diffusion_augment(real, fake, t_max, u, eps_real, eps_fake):
        t = t_max * u if kind == "uniform" else t_max * u.sqrt()
        t_f = t_max * torch.rand_like(u).sqrt() if kind == "independent" else t
        e_f = eps_real if kind == "same-noise" else eps_fake
        if kind == "detach":
            fake = fake.detach()
        a, b = t[:, None, None, None], t_f[:, None, None, None]
        if kind == "swap":
            return a * real + (1 - a) * eps_real, b * fake + (1 - b) * e_f, t
        return (1 - a) * real + a * eps_real, (1 - b) * fake + b * e_f, t
    return diffusion_augment


@pytest.mark.parametrize("kind, words", [
    ("uniform", ["uniformly on [0, t_max]", "inverse CDF"]),
    ("independent", ["other times than the real ones"]),
    ("same-noise", ["reuses the real images' noise"]),
    ("swap", ["swaps the path's ends"]),
    ("detach", ["no (or the wrong) gradient"]),
])
def test_diffusion_augment_mistakes_are_named(kind, words):
    _assert_clean_failure(check("11.1", _augment(kind), seed=0), *words)


# ---- 11.2 ----------------------------------------------------------------------------------------
def _lpips(kind):
    def lpips(fa, fb, weights):
        total = 0.0
        for a, b, w in zip(fa, fb, weights, strict=True):
            if kind == "spatial":
                a = a / a.flatten(2).norm(dim=2)[:, :, None, None]
                b = b / b.flatten(2).norm(dim=2)[:, :, None, None]
            elif kind != "raw":
                a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
            ww = w**2 if kind == "w2" else w
            per = (ww[None, :, None, None] * (a - b) ** 2).sum(1)
            if kind == "sqrt":
                per = per.sqrt()
            total = total + (per.sum((-2, -1)) if kind == "sum" else per.mean((-2, -1)))
        return total
    return lpips


@pytest.mark.parametrize("kind, words", [
    ("raw", ["does not normalise"]),
    ("spatial", ["over the positions; LPIPS normalises"]),
    ("sum", ["sums over the positions"]),
    ("sqrt", ["square root"]),
    ("w2", ["squares the weights"]),
])
def test_lpips_mistakes_are_named(kind, words):
    _assert_clean_failure(check("11.2", _lpips(kind), seed=0), *words)


# ---- 11.3 ----------------------------------------------------------------------------------------
def _distill(kind):
    def add_distillation_loss(teacher, x, t, eps):
        tt = t[:, None, None, None]
        xs = x if kind in ("no-detach", "no-sg") else x.detach()
        x_t = tt * xs + (1 - tt) * eps if kind == "swap" else (1 - tt) * xs + tt * eps
        target = teacher(x_t, t)
        if kind not in ("no-sg", "teacher-grad"):  # teacher-grad: x detached, the teacher's output not
            target = target.detach()
        weight = {"none": torch.ones_like(t), "t": t}.get(kind, 1 - t)
        loss = (weight * (x - target).pow(2).flatten(1).mean(1)).mean()
        return loss.detach() if kind == "no-grad" else loss
    return add_distillation_loss


@pytest.mark.parametrize("kind, words", [
    ("none", ["does not weight by c(t)"]),
    ("t", ["weights by t"]),
    ("swap", ["swaps the path's ends"]),
    ("no-sg", ["flows through the teacher's target"]),
    ("teacher-grad", ["gradient with respect to the teacher's weights"]),
    ("no-grad", ["no gradient path"]),
])
def test_add_distillation_loss_mistakes_are_named(kind, words):
    _assert_clean_failure(check("11.3", _distill(kind), seed=0), *words)


def test_add_distillation_target_detached_from_x_only_passes():
    # detaching the teacher's output suffices when x_t is built from x itself: the gradient is the same
    result = check("11.3", _distill("no-detach"), seed=0)
    assert result.passed, str(result)


# ---- 11.4 ----------------------------------------------------------------------------------------
def _r1(kind):
    def r1_penalty(disc, real, gamma):
        x = real.detach().requires_grad_(True)
        logits = disc(x)
        (g,) = torch.autograd.grad(logits.mean() if kind == "mean" else logits.sum(), x,
                                   create_graph=kind != "no-graph")
        sq = g.flatten(1).pow(2).sum(1)
        if kind == "norm":
            sq = sq.sqrt()
        per = sq.sum() if kind == "batch-sum" else sq.mean()
        out = (gamma if kind == "no-half" else 0.5 * gamma) * per
        return out
    return r1_penalty


@pytest.mark.parametrize("kind, words", [
    ("no-half", ["leaves out the 1/2"]),
    ("mean", ["differentiates the batch mean"]),
    ("norm", ["squared norm"]),
    ("batch-sum", ["sums over the batch"]),
    ("no-graph", ["cannot train the discriminator", "create_graph=True"]),
])
def test_r1_penalty_mistakes_are_named(kind, words):
    _assert_clean_failure(check("11.4", _r1(kind), seed=0), *words)
