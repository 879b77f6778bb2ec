"""What every chapter's exercise tests assert about its solution and its generated stubs."""

import pytest

from course.exercises import run_checks


def _assert_clean_failure(result, *fragments):
    """``result`` failed with one line (no traceback) that contains every fragment."""
    assert not result.passed, str(result)
    text = result.message
    assert "\n" not in text and "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


# Code that a stub's message must not spell out (chapters 01-06): it states the task, the hint cell helps.
CODE_WORDS = ("expand_like", "sqrt", "torch", "**", "^", "mean(", "softmax", "linear_sum_assignment",
              "autograd", "alpha'", "sigma'", "1/2", "(1 + w)")


def assert_solutions_pass(chapter: str, solution: dict, ids: list[str], seed: int) -> None:
    """The solution notebook's functions pass every check of ``chapter``, in the order ``ids``."""
    results = run_checks(chapter, solution, seed=seed)
    assert [r.exercise for r in results] == ids
    for r in results:
        assert r.passed, str(r)


def assert_stubs_state_the_task(chapter: str, stub: dict, names, prefix: str, code_words) -> None:
    """The generated stubs fail as "not attempted" with one clean line, and each stub's message
    starts with ``prefix`` ("Exercise 9.") and contains none of ``code_words``."""
    for r in run_checks(chapter, stub):
        assert r.status == "not attempted", str(r)
        _assert_clean_failure(r, "NotImplementedError")
    for name in names:
        with pytest.raises(NotImplementedError) as info:
            stub[name](*([None] * stub[name].__code__.co_argcount))
        text = str(info.value)
        assert text.startswith(prefix)
        for code_word in code_words:
            assert code_word not in text, (name, code_word, text)
