"""Chapter 12 checks, proven both ways: the solutions pass, the stubs, the course's own functions and
planted mistakes fail with one clear line that names the mistake."""

import pytest
import torch

from course.autoregressive import diffusion_loss as course_diffusion_loss
from course.diffusion_forcing import scheduling_matrix
from course.exercises import check
from tests.exercise_harness import assert_solutions_pass, assert_stubs_state_the_task
from tests.notebook_code import notebook_functions
from tests.test_exercises_ch01 import _assert_clean_failure

CHAPTER = "12_autoregressive_diffusion"
NAMES = ("diffusion_loss", "reveal_next", "pyramid_matrix", "df_step")
SOLUTION = notebook_functions(f"solutions/{CHAPTER}.ipynb", NAMES)
STUB = notebook_functions(f"exercises/{CHAPTER}.ipynb")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solutions_pass(seed):
    assert_solutions_pass(CHAPTER, SOLUTION, ["12.1", "12.2", "12.3", "12.4"], seed)


def test_stubs_fail_cleanly_and_state_the_task_not_the_code():
    assert_stubs_state_the_task(CHAPTER, STUB, NAMES, "Exercise 12.", ("torch.", "repeat", "argsort", "clamp", "arange", "(s - t)", "/ steps", "mean("))


def test_the_course_functions_are_not_answers():
    _assert_clean_failure(check("12.3", scheduling_matrix, seed=0),
                          "course's own reference")
    _assert_clean_failure(check("12.1", course_diffusion_loss, seed=0), "course's own reference")


# ---- 12.1 ----------------------------------------------------------------------------------------
def _loss(kind):
    def diffusion_loss(head, tokens, z, eps, t):
        r = eps.shape[0] // tokens.shape[0]
        if kind == "first":
            eps, t, r = eps[:tokens.shape[0]], t[:tokens.shape[0]], 1
        rep = (lambda a: a.repeat_interleave(r, 0)) if kind == "interleave" else (lambda a: a.repeat(r, 1))
        x0, zz = rep(tokens), rep(z)
        if kind == "z-interleave":
            zz = z.repeat_interleave(r, 0)
        tt = t[:, None]
        x_t = tt * x0 + (1 - tt) * eps if kind == "swap" else (1 - tt) * x0 + tt * eps
        target = {"sign": x0 - eps, "eps": eps}.get(kind, eps - x0)
        out = head(x_t, t, zz)
        if kind == "detach":
            out = out.detach()
        err = (out - target).pow(2)
        return {"sum": err.sum(1).mean(), "total": err.sum()}.get(kind, err.mean())
    return diffusion_loss


@pytest.mark.parametrize("kind, words", [
    ("interleave", ["repeat_interleave", "draw k of token i"]),
    ("sign", ["target x - eps"]),
    ("swap", ["swaps the path's ends"]),
    ("sum", ["sums over each token's entries"]),
    ("total", ["sums over every draw and entry"]),
    ("z-interleave", ["pairs the tokens and their z differently"]),
    ("eps", ["onto eps (eps-prediction)"]),
    ("first", ["only the first draw"]),
    ("detach", ["no gradient path"]),
])
def test_diffusion_loss_mistakes_are_named(kind, words):
    _assert_clean_failure(check("12.1", _loss(kind), seed=0), *words)


# ---- 12.2 ----------------------------------------------------------------------------------------
def _reveal(kind):
    def reveal_next(mask, order, count):
        n = mask.shape[1]
        if kind == "rank":
            rank = order
        elif kind == "raster":
            rank = torch.arange(n).expand_as(order)
        else:
            rank = order.argsort(dim=1)
        if kind == "ignore-mask":
            return rank < count
        known = (~mask).sum(dim=1, keepdim=True)
        if kind == "raster":
            key = torch.where(mask, rank, n + rank)
            return mask & (key <= key.sort(dim=1).values[:, count - 1:count])
        if kind == "float":
            return (mask & (rank < known + count)).float()
        if kind == "one-more":
            return mask & (rank <= known + count)
        return mask & (rank < known + count)
    return reveal_next


@pytest.mark.parametrize("kind, words", [
    ("rank", ["reads order[b, p] as the rank", "argsort"]),
    ("raster", ["by index (raster order)"]),
    ("ignore-mask", ["already known"]),
    ("float", ["expected a boolean tensor"]),
    ("one-more", ["positions per row; expected exactly"]),
])
def test_reveal_next_mistakes_are_named(kind, words):
    _assert_clean_failure(check("12.2", _reveal(kind), seed=0), *words)


# ---- 12.3 ----------------------------------------------------------------------------------------
def _pyramid(kind):
    def pyramid_matrix(horizon, steps):
        rows = steps + horizon + (1 if kind == "rows" else 0)
        m, i = torch.arange(rows)[:, None], torch.arange(horizon)[None, :]
        k = steps + ((horizon - 1 - i) if kind == "reverse" else i) - m
        k = {"noclip": k, "low": k.clamp_min(0)}.get(kind, k.clamp(0, steps))
        return {"float": k.float(), "int32": k.int()}.get(kind, k)
    return pyramid_matrix


@pytest.mark.parametrize("kind, words", [
    ("rows", ["rows; expected steps + horizon"]),
    ("reverse", ["near tokens noisier"]),
    ("noclip", ["does not clip"]),
    ("float", ["noise levels are integers"]),
    ("int32", ["returned int32", "int64"]),
    ("low", ["rise above steps"]),
])
def test_pyramid_matrix_mistakes_are_named(kind, words):
    _assert_clean_failure(check("12.3", _pyramid(kind), seed=0), *words)


# ---- 12.4 ----------------------------------------------------------------------------------------
def _step(kind):
    def df_step(model, x, k_now, k_next, steps):
        t, s = k_now.to(x.dtype) / steps, k_next.to(x.dtype) / steps
        if kind == "shared":
            t = t.max(dim=1, keepdim=True).values.expand_as(t)
            s = s.max(dim=1, keepdim=True).values.expand_as(s)
        if kind == "levels":
            return x + (k_next - k_now).to(x.dtype)[..., None] * model(x, k_now.to(x.dtype))
        if kind == "one-level":
            s = torch.where(k_next < k_now, t - 1.0 / steps, t)
        if kind == "alone":
            v = torch.cat([model(x[:, i:i + 1], t[:, i:i + 1]) for i in range(x.shape[1])], dim=1)
            return x + (s - t)[..., None] * v
        if kind == "moves-all":
            return x + (-1.0 / steps) * model(x, t)
        v = model(x, s if kind == "next" else t)
        return x + ((t - s) if kind == "backwards" else (s - t))[..., None] * v
    return df_step


@pytest.mark.parametrize("kind, words", [
    ("shared", ["same level"]),
    ("next", ["at the next levels"]),
    ("backwards", ["steps away from the data"]),
    ("levels", ["time in [0, 1]", "divided by the number of steps"]),
    ("one-level", ["whatever k_next says"]),
    ("alone", ["needs the whole window"]),
    ("moves-all", ["changes tokens whose level does not change"]),
])
def test_df_step_mistakes_are_named(kind, words):
    _assert_clean_failure(check("12.4", _step(kind), seed=0), *words)
