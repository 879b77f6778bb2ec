"""Answers that use the course's own implementation are recognised from the notebook's code
(course/exercises/provenance.py), however the reference is reached; real solutions are not."""

import nbformat
import pytest

from course.exercises.provenance import reference_use, resolve_reference
from course.exercises.registry import CHAPTERS, REFERENCES, get_exercise, uses_reference
from tests.notebook_code import ROOT

REF = ("course.samplers.reverse_em_step",)
SIG = "x, t, dt, sde, score_fn, z"

COPIES = {
    "an alias": ["from course.samplers import reverse_em_step as ref",
                 f"def reverse_em_step({SIG}):\n    return ref({SIG})"],
    "the name itself": ["from course.samplers import reverse_em_step"],
    "a module alias": ["import course.samplers as cs", f"def reverse_em_step({SIG}):\n    return cs.reverse_em_step({SIG})"],
    "an assignment": ["import course", "reverse_em_step = course.samplers.reverse_em_step"],
    "a lambda": ["import course", "reverse_em_step = lambda *a: course.samplers.reverse_em_step(*a)"],
    "a helper": ["from course import samplers", "def helper(*a):\n    return samplers.reverse_em_step(*a)",
                 f"def reverse_em_step({SIG}):\n    return helper({SIG})"],
    "a class": ["from course.samplers import reverse_em_step as r",
                "class Step:\n    def __call__(self, *a):\n        return r(*a)", "reverse_em_step = Step()"],
    "getattr with a constant": ["import course.samplers as cs",
                                "def reverse_em_step(*a):\n    return getattr(cs, 'reverse_em_step')(*a)"],
    "getattr with a computed name": ["import course.samplers as cs",
                                     "def reverse_em_step(*a):\n    return getattr(cs, 'reverse_' + 'em_step')(*a)"],
    "importlib": ["import importlib",
                  "def reverse_em_step(*a):\n    return importlib.import_module('course.samplers').reverse_em_step(*a)"],
    "__import__": ["def reverse_em_step(*a):\n    m = __import__('course.samplers', fromlist=['x'])\n"
                   "    return m.reverse_em_step(*a)"],
    "an import inside": ["def reverse_em_step(*a):\n    from course.samplers import reverse_em_step as r\n    return r(*a)"],
    "a default argument": ["import course.samplers as cs",
                           "def reverse_em_step(*a, step=cs.reverse_em_step):\n    return step(*a)"],
    "a magic line beside": ["%matplotlib inline\nfrom course.samplers import reverse_em_step as ref",
                            "def reverse_em_step(*a):\n    return ref(*a)"],
}


@pytest.mark.parametrize("how", list(COPIES))
def test_every_way_of_reaching_the_reference_is_found(how):
    assert reference_use(COPIES[how], "reverse_em_step", REF) is not None, how


def test_own_code_passes_and_the_message_says_how():
    own = ["import torch\nfrom course import expand_like\nimport course.samplers as cs\nfrom course.samplers import time_grid",
           f"def reverse_em_step({SIG}):\n    g = expand_like(sde.diffusion(t), x)\n"
           "    return x - (sde.drift(x, t) - g**2 * score_fn(x, t)) * dt + g * abs(dt) ** 0.5 * z",
           "grid = cs.time_grid(10)  # the module is used elsewhere: not by the answer"]
    assert reference_use(own, "reverse_em_step", REF) is None
    shadow = ["import course.samplers as sde", f"def reverse_em_step({SIG}):\n    return sde.reverse_em_step(x)"]
    assert reference_use(shadow, "reverse_em_step", REF) is None  # the parameter sde is the check's object
    helper_named_like_a_parameter = [
        "from course.samplers import reverse_em_step as library_step",
        "def score_fn(x, t):\n    return library_step(x, t, 0.1, None, None, x)",  # a notebook def, elsewhere
        f"def reverse_em_step({SIG}):\n    g = sde.diffusion(t)\n    return x - (sde.drift(x, t) - g**2 * score_fn(x, t)) * dt",
    ]  # score_fn in the answer is its parameter (the check's score), not the notebook's def of that name
    assert reference_use(helper_named_like_a_parameter, "reverse_em_step", REF) is None
    assert reference_use(COPIES["a helper"], "reverse_em_step", REF) == \
        "it uses course.samplers.reverse_em_step through helper"
    redefined = [*COPIES["an alias"], f"def reverse_em_step({SIG}):\n    return x"]  # the last definition counts
    assert reference_use(redefined, "reverse_em_step", REF) is None
    assert reference_use(["def f(:"], "reverse_em_step", REF) is None  # cells that do not parse are skipped


def test_every_exercise_names_real_references_and_no_solution_uses_them():
    assert {ex.id for exs in CHAPTERS.values() for ex in exs} == set(REFERENCES)
    for chapter, exercises in CHAPTERS.items():
        nb = nbformat.read(ROOT / "solutions" / f"{chapter}.ipynb", as_version=4)
        sources = [c.source for c in nb.cells if c.cell_type == "code"]
        for ex in exercises:
            assert ex.reference, ex.id
            for path in ex.reference:
                resolve_reference(path)
            assert uses_reference(ex, sources) is None, (ex.id, uses_reference(ex, sources))
    with pytest.raises(ValueError, match="inside the course package"):
        resolve_reference("torch.exp")


def test_the_verdict_names_the_reference():
    ex = get_exercise("2.2")
    result = uses_reference(ex, COPIES["a module alias"])
    assert result.status == "failed" and "uses the course's reference implementation" in result.message
    assert "course.samplers.reverse_em_step" in result.message
