"""Verdicts do not depend on the seed or on the precision the student computes in.

Every exercise's solution is run the way a student who works in float32 runs it: tensor inputs cast
to float32, the models and score functions the check passes in called in float32 (inside they keep
their float64 parameters), outputs returned in float32. That answer passes on 50 seeds of every
check, and the same answer with a 0.1 % error, or computed in half precision, still fails: the
tolerances follow the dtype without becoming loose. Exercises 5.6 and 8.4 (the student's own trained
velocity network and autoencoder, measured by what they generate) compare qualities, not values, and are not
listed.
"""

import pytest
import torch

from course.exercises import CHAPTERS, check
from tests.notebook_code import notebook_functions

SEEDS = range(50)
MEASURED = ("5.6", "8.4")  # a trained model measured by its samples, not values compared with a reference
EXERCISES = [(chapter, ex) for chapter, exs in CHAPTERS.items() for ex in exs if ex.id not in MEASURED]
SOLUTIONS = {chapter: notebook_functions(f"solutions/{chapter}.ipynb") for chapter in CHAPTERS}


def _is_model(v) -> bool:
    """A model or score function the check passes in (not an SDE, a path or a generator)."""
    return callable(v) and not isinstance(v, (type, torch.Generator)) and not any(
        hasattr(v, attr) for attr in ("coefficients", "marginal"))


def _to(v, dtype):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.to(dtype)
    if isinstance(v, (list, tuple)):
        return type(v)(_to(a, dtype) for a in v)
    return v


def _model_in(fn, dtype):
    """``fn`` called from code that computes in ``dtype``: float64 inside, ``dtype`` out."""
    def call(*args, **kwargs):
        return _to(fn(*_to(args, torch.float64), **kwargs), dtype)
    if hasattr(fn, "parameters"):
        call.parameters = fn.parameters
    return call


def _computed_in(fn, dtype, error: float = 0.0):
    """The answer ``fn`` computed in ``dtype``; ``error`` scales its (first) output by 1 + error."""
    def student(*args, **kwargs):
        args = [_model_in(a, dtype) if _is_model(a) else _to(a, dtype) for a in args]
        out = _to(fn(*args, **kwargs), dtype)
        if error:
            out = (out[0] * (1 + error), *out[1:]) if isinstance(out, tuple) else out * (1 + error)
        return out
    student.__name__ = fn.__name__
    return student


def _answers(chapter, ex, dtype, error=0.0):
    return [_computed_in(SOLUTIONS[chapter][name], dtype, error) for name in ex.names]


@pytest.mark.parametrize("chapter, ex", EXERCISES, ids=[ex.id for _, ex in EXERCISES])
def test_a_float32_answer_passes_every_seed(chapter, ex):
    failed = {}
    for seed in SEEDS:
        r = check(ex.id, *_answers(chapter, ex, torch.float32), seed=seed)
        if not r.passed:
            failed[seed] = r.message
    assert not failed, f"{len(failed)} of {len(SEEDS)} seeds failed, e.g. {next(iter(failed.items()))}"


@pytest.mark.parametrize("chapter, ex", EXERCISES, ids=[ex.id for _, ex in EXERCISES])
def test_a_float32_answer_off_by_a_tenth_of_a_percent_fails(chapter, ex):
    for seed in range(3):
        r = check(ex.id, *_answers(chapter, ex, torch.float32, error=1e-3), seed=seed)
        assert not r.passed, str(r)


@pytest.mark.parametrize("chapter, ex", [e for e in EXERCISES if e[1].id in ("1.3", "3.1", "5.4", "8.1")],
                         ids=["1.3", "3.1", "5.4", "8.1"])
def test_half_precision_is_refused_by_name(chapter, ex):
    r = check(ex.id, *_answers(chapter, ex, torch.bfloat16), seed=0)
    assert not r.passed and "bfloat16" in r.message and "float32 or float64" in r.message, str(r)
