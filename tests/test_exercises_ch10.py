"""Chapter 10 checks, proven both ways: the solutions pass, the stubs, the course's own functions and
planted mistakes fail with one clear line that names the mistake."""

import pytest
import torch
import torch.nn.functional as F

from course.exercises import check
from course.transformer import patchify as course_patchify
from course.transformer import unpatchify as course_unpatchify
from tests.exercise_harness import assert_solutions_pass, assert_stubs_state_the_task
from tests.notebook_code import notebook_functions
from tests.test_exercises_ch01 import _assert_clean_failure

CHAPTER = "10_scaling_and_control"
NAMES = ("adaln_zero_branch", "patchify", "unpatchify", "propagate")
SOLUTION = notebook_functions(f"solutions/{CHAPTER}.ipynb", NAMES)
STUB = notebook_functions(f"exercises/{CHAPTER}.ipynb")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solutions_pass(seed):
    assert_solutions_pass(CHAPTER, SOLUTION, ["10.1", "10.2", "10.3"], seed)


def test_stubs_fail_cleanly_and_state_the_task_not_the_code():
    assert_stubs_state_the_task(CHAPTER, STUB, NAMES, "Exercise 10.", ("torch.", "F.", "reshape", "permute", "chunk", "clamp", "where", "layer_norm", "silu"))


def test_the_course_functions_are_not_answers():
    _assert_clean_failure(check("10.2", course_patchify, course_unpatchify, seed=0), "course's own reference")


# ---- 10.1 ------------------------------------------------------------------------------------------
def _adaln(kind):
    def adaln_zero_branch(x, branch, cond, weight, bias):
        c = cond if kind == "no-silu" else F.silu(cond)
        shift, scale, gate = (c @ weight.T + bias)[:, None, :].chunk(3, dim=-1)
        if kind == "order":
            shift, scale, gate = scale, shift, gate
        h = x if kind == "no-norm" else F.layer_norm(x, x.shape[-1:], eps=1e-6)
        out = branch(h * (scale if kind == "raw-scale" else 1 + scale) + shift)
        if kind == "no-gate":
            return x + out
        if kind == "no-residual":
            return gate * out
        return x + gate * out
    return adaln_zero_branch


@pytest.mark.parametrize("kind, words", [
    ("raw-scale", ["scales by scale itself"]),  # the gate is 0 at zero modulation: only the planted mistake tells
    ("no-gate", ["must return x unchanged"]),
    ("no-residual", ["must return x unchanged"]),
    ("order", ["(shift, scale, gate), in that order"]),
    ("no-norm", ["does not normalise x"]),
    ("no-silu", ["applies SiLU to it first"]),
])
def test_adaln_mistakes_are_named(kind, words):
    _assert_clean_failure(check("10.1", _adaln(kind), seed=0), *words)


# ---- 10.2 ------------------------------------------------------------------------------------------
def _patch(kind):
    def patchify(x, p):
        b, c, h, w = x.shape
        order = {"channel-last": (0, 2, 4, 3, 5, 1), "column-major": (0, 4, 2, 1, 3, 5),
                 "transposed": (0, 2, 4, 1, 5, 3)}.get(kind, (0, 2, 4, 1, 3, 5))
        return x.reshape(b, c, h // p, p, w // p, p).permute(*order).reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(tokens, p, shape):
        if kind == "bad-inverse":
            return SOLUTION["unpatchify"](tokens, p, shape).transpose(2, 3) if shape[1] == shape[2] else \
                SOLUTION["unpatchify"](tokens, p, shape).flip(3)
        return SOLUTION["unpatchify"](tokens, p, shape)
    return patchify, unpatchify


@pytest.mark.parametrize("kind, words", [
    ("channel-last", ["channel last"]),
    ("column-major", ["column by column; the tokens go row by row"]),
    ("transposed", ["flattens each patch column by column"]),
    ("bad-inverse", ["unpatchify"]),
])
def test_patchify_mistakes_are_named(kind, words):
    _assert_clean_failure(check("10.2", *_patch(kind), seed=0), *words)


# ---- 10.3 ------------------------------------------------------------------------------------------
def _prop(kind):
    def propagate(nnf, dist, cost, source_rows, source_cols):
        sh, sw = source_rows, source_cols
        best, d = nnf.clone(), dist.clone()
        for axis in (1, 0):
            cand = nnf.clone()
            if axis == 1:
                cand[:, 1:] = nnf[:, :-1]
            else:
                cand[1:, :] = nnf[:-1, :]
            cand[..., axis] += {"none": 0, "wrong": -1}.get(kind, 1)
            if kind != "no-clip":
                cand[..., 0] = cand[..., 0].clamp(0, sh - 1)
                cand[..., 1] = cand[..., 1].clamp(0, sw - 1)
            c = cost(cand)
            better = torch.ones_like(c, dtype=torch.bool) if kind == "always" else c < d
            best = torch.where(better[..., None], cand, best)
            d = torch.where(better, c, d)
        return (best.float() if kind == "float" else best), d
    return propagate


@pytest.mark.parametrize("kind, words", [
    ("none", ["without moving them"]),
    ("wrong", ["the wrong way"]),
    ("always", ["even where they are worse"]),
    ("no-clip", ["clip the candidates to the source"]),
    ("float", ["expected int64"]),
])
def test_propagate_mistakes_are_named(kind, words):
    _assert_clean_failure(check("10.3", _prop(kind), seed=0), *words)
