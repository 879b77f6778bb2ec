"""Chapter 09 checks, proven both ways: the solutions pass, the stubs, the course's own functions and
planted mistakes fail with one clear line that names the mistake."""

import math

import pytest
import torch
import torch.nn.functional as F

from course.clip import info_nce
from course.exercises import check
from tests.exercise_harness import assert_solutions_pass, assert_stubs_state_the_task
from tests.notebook_code import notebook_functions
from tests.test_exercises_ch01 import _assert_clean_failure

CHAPTER = "09_text_to_image"
NAMES = ("clip_loss", "cross_attention", "guided_velocity", "stroke_thickness")
SOLUTION = notebook_functions(f"solutions/{CHAPTER}.ipynb", NAMES)
STUB = notebook_functions(f"exercises/{CHAPTER}.ipynb")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solutions_pass(seed):
    assert_solutions_pass(CHAPTER, SOLUTION, ["9.1", "9.2", "9.3", "9.4"], seed)


def test_stubs_fail_cleanly_and_state_the_task_not_the_code():
    assert_stubs_state_the_task(CHAPTER, STUB, NAMES, "Exercise 9.", ("torch.", "F.", "normalize", "softmax(", "masked_fill", "expand", "sqrt(", ".abs()", "@"))


def test_the_course_functions_are_not_answers():
    def from_the_course(image_features, text_features, logit_scale):
        return info_nce(F.normalize(image_features, dim=1), F.normalize(text_features, dim=1), logit_scale)
    from_the_course.__module__ = "course.clip"
    _assert_clean_failure(check("9.1", from_the_course, seed=0), "course's own reference")


# ---- 9.1 -------------------------------------------------------------------------------------------
def _clip(kind):
    def clip_loss(image_features, text_features, logit_scale):
        u = image_features if kind in ("no-norm", "text-only") else F.normalize(image_features, dim=1)
        v = text_features if kind in ("no-norm", "image-only") else F.normalize(text_features, dim=1)
        factor = {"raw": logit_scale, "divide": 1 / logit_scale}.get(kind, logit_scale.exp())
        logits = factor * u @ v.T
        target = torch.arange(u.shape[0])
        red = "sum" if kind == "sum" else "mean"
        rows, cols = F.cross_entropy(logits, target, reduction=red), F.cross_entropy(logits.T, target, reduction=red)
        out = {"rows": rows, "cols": cols, "add": rows + cols}.get(kind, (rows + cols) / 2)
        return out.detach() if kind == "detach" else out
    return clip_loss


@pytest.mark.parametrize("kind, words", [
    ("rows", ["only the image -> text"]),
    ("cols", ["only the text -> image"]),
    ("add", ["adds the two cross-entropies"]),
    ("no-norm", ["does not normalise"]),
    ("image-only", ["normalises only the image"]),
    ("text-only", ["normalises only the text"]),
    ("raw", ["multiplies by logit_scale itself"]),
    ("divide", ["divides by logit_scale"]),
    ("sum", ["sums the cross-entropies"]),
    ("detach", ["no gradient path"]),
])
def test_clip_loss_mistakes_are_named(kind, words):
    _assert_clean_failure(check("9.1", _clip(kind), seed=0), *words)


def test_clip_loss_of_identical_directions_is_log_b():
    ones = torch.ones(5, 3, dtype=torch.float64)
    assert SOLUTION["clip_loss"](3 * ones, ones, torch.tensor(1.3, dtype=torch.float64)).item() == pytest.approx(
        math.log(5), rel=1e-12)


# ---- 9.2 -------------------------------------------------------------------------------------------
def _attn(kind):
    def cross_attention(queries, keys, values, key_mask):
        d = queries.shape[-1]
        scale = {"none": 1.0, "d": 1 / d}.get(kind, 1 / math.sqrt(d))
        scores = scale * queries @ keys.transpose(1, 2)
        if kind == "inverted":
            scores = scores.masked_fill(key_mask[:, None, :], float("-inf"))
        elif kind not in ("ignore", "after"):
            scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=1 if kind == "axis" else -1)
        if kind == "after":  # zeroes the padded weights after the softmax, without renormalising
            weights = weights * key_mask[:, None, :]
        if kind == "weights":
            return weights
        return weights @ values
    return cross_attention


@pytest.mark.parametrize("kind, words", [
    ("none", ["does not scale the scores"]),
    ("d", ["divides the scores by d"]),
    ("ignore", ["ignores key_mask"]),
    ("inverted", ["attends to the padding"]),
    ("axis", ["runs over the queries"]),
    ("after", ["not the weights after it"]),
    ("weights", ["returned the attention weights"]),
])
def test_cross_attention_mistakes_are_named(kind, words):
    _assert_clean_failure(check("9.2", _attn(kind), seed=0), *words)


# ---- 9.3 -------------------------------------------------------------------------------------------
def _guide(kind):
    def guided_velocity(model, z, t, context, context_mask, empty_context, empty_mask, w):
        b = z.shape[0]
        cond = model(z, t, context=context, context_mask=context_mask)
        e_ctx, e_mask = (empty_context, empty_mask) if kind == "no-expand" else (
            empty_context.expand(b, -1, -1), empty_mask.expand(b, -1))
        uncond = model(z, t, context=e_ctx, context_mask=e_mask)
        return {"w-form": w * cond + (1 - w) * uncond, "swapped": (1 + w) * uncond - w * cond,
                "cond": cond, "plus": cond + w * uncond}.get(kind, (1 + w) * cond - w * uncond)
    return guided_velocity


@pytest.mark.parametrize("kind, words", [
    ("w-form", ["w cond + (1 - w) uncond"]),
    ("swapped", ["swaps the caption and the empty caption"]),
    ("cond", ["conditional velocity alone"]),
    ("plus", ["adds w times the unconditional"]),
    ("no-expand", ["expand the empty caption's row to the batch"]),
])
def test_guided_velocity_mistakes_are_named(kind, words):
    _assert_clean_failure(check("9.3", _guide(kind), seed=0), *words)


# ---- 9.4 -------------------------------------------------------------------------------------------
def _thick(kind):
    def stroke_thickness(images):
        p = images[:, 0] if kind == "raw" else (images[:, 0] + 1) / 2
        power = 2 if kind == "square" else 1
        dv = (p[:, 1:] - p[:, :-1]).abs().pow(power).sum((1, 2))
        dh = (p[:, :, 1:] - p[:, :, :-1]).abs().pow(power).sum((1, 2))
        tv = {"rows": dh, "cols": dv}.get(kind, dv + dh)
        return (1 if kind == "half" else 2) * p.sum((1, 2)) / tv
    return stroke_thickness


@pytest.mark.parametrize("kind, words", [
    ("raw", ["the ink is p = (x + 1) / 2"]),
    ("rows", ["along the rows only"]),
    ("cols", ["down the columns only"]),
    ("half", ["leaves out the factor 2"]),
    ("square", ["squares the differences"]),
])
def test_stroke_thickness_mistakes_are_named(kind, words):
    _assert_clean_failure(check("9.4", _thick(kind), seed=0), *words)
