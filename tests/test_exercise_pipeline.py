"""One source, two outputs: exercises/ is generated from solutions/ and checked headless."""

import json
import re
import shutil
import socket
from pathlib import Path

import nbformat
import pytest

from course.cli import main
from course.exercises.build import ExerciseBuildError, build_exercises, strip_solutions
from course.exercises.registry import CHAPTERS
from course.exercises.runner import Limits, check_notebook
from tests.notebook_code import ROOT


def test_exercises_are_in_sync_with_solutions():
    stale = build_exercises(ROOT / "solutions", ROOT / "exercises", check=True)
    assert stale == [], f"run `course build-exercises`: {stale}"


def test_exercise_notebooks_have_no_outputs_and_no_solutions():
    for path in sorted((ROOT / "exercises").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            assert "BEGIN SOLUTION" not in cell.source and "END SOLUTION" not in cell.source
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None
        assert nb.metadata["course"]["chapter"] == path.stem


def test_strip_solutions_keeps_indentation_and_prompt():
    src = (
        "def f(x):\n"
        "    y = 1\n"
        "    ### BEGIN SOLUTION Exercise 3.1: return twice x\n"
        "    return 2 * x\n"
        "    ### END SOLUTION\n"
        "after = True"
    )
    out = strip_solutions(src)
    assert out == (
        "def f(x):\n"
        "    y = 1\n"
        "    raise NotImplementedError('Exercise 3.1: return twice x')\n"
        "after = True"
    )
    namespace = {}
    exec(out, namespace)
    with pytest.raises(NotImplementedError, match="Exercise 3.1: return twice x"):
        namespace["f"](1)


@pytest.mark.parametrize("src, words", [
    ("### BEGIN SOLUTION\nx = 1\n### END SOLUTION", "Exercise N.M"),
    ("### BEGIN SOLUTION Exercise 1.1: a\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "without BEGIN"),
    ("### BEGIN SOLUTION Exercise 1.1: a\n### BEGIN SOLUTION Exercise 1.2: b\n", "inside another"),
])
def test_malformed_markers_are_rejected(src, words):
    with pytest.raises(ExerciseBuildError, match=words):
        strip_solutions(src, where="cell 3")


def _copy_tree(tmp_path):
    shutil.copytree(ROOT / "solutions", tmp_path / "solutions")
    shutil.copytree(ROOT / "exercises", tmp_path / "exercises")
    return tmp_path / "solutions", tmp_path / "exercises"


def test_stale_exercises_are_detected_and_rebuilt(tmp_path, capsys):
    sol, ex = _copy_tree(tmp_path)
    target = ex / "01_forward_sdes.ipynb"
    nb = json.loads(target.read_text())
    nb["cells"][0]["source"] = "edited by hand"
    target.write_text(json.dumps(nb))
    (ex / "orphan.ipynb").write_text(target.read_text())
    args = ["--solutions", str(sol), "--exercises", str(ex)]
    assert main(["build-exercises", "--check", *args]) == 1
    err = capsys.readouterr().err
    assert "01_forward_sdes.ipynb is out of date" in err and "orphan.ipynb" in err
    assert main(["build-exercises", *args]) == 0
    (ex / "orphan.ipynb").unlink()
    assert main(["build-exercises", "--check", *args]) == 0


def test_solution_only_cells_are_dropped():
    sol = nbformat.read(ROOT / "solutions/01_forward_sdes.ipynb", as_version=4)
    tagged = [c.source for c in sol.cells if "solution-only" in c.metadata.get("tags", [])]
    assert tagged, "the solution notebook should carry a solution-only note"
    ex = nbformat.read(ROOT / "exercises/01_forward_sdes.ipynb", as_version=4)
    assert not any(c.source == s for c in ex.cells for s in tagged)


def test_course_check_on_solution_and_stub(tmp_path):
    sol, ex = _copy_tree(tmp_path)
    good = check_notebook(sol / "01_forward_sdes.ipynb", seed=0)
    assert good.status == "graded" and (good.score, good.max_score) == (3, 3), good.summary()
    stub = check_notebook(ex / "01_forward_sdes.ipynb", seed=0)
    assert stub.status == "graded" and stub.score == 0, stub.summary()
    assert all(r.status == "not attempted" for r in stub.results)


@pytest.mark.parametrize("chapter", list(CHAPTERS))
def test_every_solution_gets_full_marks_across_the_trust_boundary(chapter):
    """Each solution notebook, run in its own process with its checks in this one (planted
    functions sent by value or called back, gradients taken in the student's process), passes
    every exercise with fresh random inputs. The cell limit is generous: exercise 8.4 trains."""
    report = check_notebook(ROOT / "solutions" / f"{chapter}.ipynb",
                            limits=Limits(notebook_timeout=900, cell_timeout=400, check_timeout=120))
    assert report.status == "graded" and report.score == report.max_score, report.summary()


def test_course_check_on_invalid_notebook(tmp_path, capsys):
    bad = tmp_path / "01_forward_sdes.ipynb"
    bad.write_text("{ not json")
    report = check_notebook(bad)
    assert report.status == "invalid notebook" and report.score == 0
    assert main(["check", str(bad)]) == 2
    assert main(["check", str(tmp_path / "missing.ipynb")]) == 2
    assert "no notebook at" in capsys.readouterr().err


@pytest.mark.parametrize("folder", ["notebooks", "solutions"])
def test_committed_notebooks_are_executed_with_their_figures(folder):
    """Lecture and solution notebooks are committed executed top to bottom in one kernel, and every
    cell that draws a figure shows it (a kernel started with MPLBACKEND=Agg would drop them)."""
    for path in sorted((ROOT / folder).glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        counts = [c.execution_count for c in code]
        assert counts == list(range(1, len(code) + 1)), f"{path}: not executed top to bottom in one kernel: {counts}"
        for i, cell in enumerate(code):
            if "plt.subplots(" in cell.source:
                kinds = {k for out in cell.outputs for k in out.get("data", {})}
                assert "image/png" in kinds, f"{path}, code cell {i + 1}: draws a figure but has none in its output"
            for out in cell.outputs:  # a widget alone shows nothing without a kernel or trust
                if "application/vnd.jupyter.widget-view+json" in out.get("data", {}):
                    assert "image/png" in out["data"], (f"{path}, code cell {i + 1}: a widget output without the "
                                                        "static picture of its default values (interactive_figure)")


# Absolute paths of a machine (scratch folders, home folders, installed packages) and drive letters.
MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:tmp|home|root|Users|work|var|opt|private|mnt|srv)/[^\s'\"]*"
                          r"|site-packages|dist-packages|\b[A-Za-z]:\\")


def _output_texts(out) -> list[str]:
    texts = [out.get("text", "")] + list(out.get("traceback", []))
    texts += [v for k, v in out.get("data", {}).items() if k.startswith("text/") and isinstance(v, str)]
    return texts


@pytest.mark.parametrize("folder", ["notebooks", "solutions"])
def test_committed_outputs_carry_nothing_of_the_machine(folder):
    """No interpreter paths, home folders, user or host names in what a student opens."""
    home, host = str(Path.home()), socket.gethostname()
    found = []
    for path in sorted((ROOT / folder).glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
            for text in (t for out in cell.outputs for t in _output_texts(out)):
                hits = [m.group(0) for m in MACHINE_PATH.finditer(text)]
                hits += [home] if home not in ("/", "") and home in text else []
                hits += [host] if len(host) >= 4 and re.search(rf"\b{re.escape(host)}\b", text) else []
                found += [f"{path.name}, code cell {i + 1}: {h}" for h in hits]
    assert not found, "machine-specific strings in committed outputs:\n" + "\n".join(found)


def test_machine_path_pattern():
    for text in ("at /tmp/venvtest/bin/python", "/home/ana/x.py", "C:\\Users\\ana", "/root/.cache/course",
                 "lib/python3.11/site-packages/torch"):
        assert MACHINE_PATH.search(text), text
    for text in (".venv/bin/python (in the course folder)", "~/.cache/course/data", "x/tmp", "24 steps/s"):
        assert not MACHINE_PATH.search(text), text
