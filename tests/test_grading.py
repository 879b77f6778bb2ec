"""``course grade`` on a corpus of planted submissions (tests/grading_corpus.py): the gradebook
is asserted exactly, the feedback carries the verdicts, and nothing outside the sandbox is touched."""

import csv
import io
import subprocess

import nbformat
import pytest

from course.cli import main
from course.exercises.grade import (
    StudentGrade,
    discover,
    grade_submissions,
    gradebook_csv,
    write_results,
)
from course.exercises.registry import CHAPTERS
from course.exercises.runner import Limits, NotebookReport, check_notebook
from course.exercises.verdict import CheckResult
from tests.grading_corpus import CHAPTER, EXPECTED, LIMITS, ROOT, expected_gradebook, write_corpus


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade the whole corpus once through the command line (2 notebooks at a time)."""
    root = tmp_path_factory.mktemp("grading")
    subs = write_corpus(root / "submissions")
    out = root / "grades"
    out.mkdir()
    (out / "keep.txt").write_text("the instructor's file")
    before = sorted(p.relative_to(subs) for p in subs.rglob("*"))
    args = ["grade", str(subs), "--out", str(out), "--jobs", "2", "--timeout", str(LIMITS["notebook_timeout"]),
            "--cell-timeout", str(LIMITS["cell_timeout"]), "--check-timeout", str(LIMITS["check_timeout"]),
            "--memory-mb", str(LIMITS["memory_mb"])]
    assert main(args) == 0
    return root, subs, out, before


def test_gradebook_of_the_planted_corpus_is_exactly_as_expected(graded):
    _, _, out, _ = graded
    text = (out / "gradebook.csv").read_text()
    assert text == expected_gradebook(), text


def test_feedback_names_what_went_wrong(graded):
    _, _, out, _ = graded
    fb = {p.stem: p.read_text() for p in (out / "feedback").glob("*.md")}
    assert sorted(fb) == sorted(EXPECTED)
    assert "Total: 3 / 3 points (status: graded)" in fb["correct"]
    assert "\u2713 Exercise 1.1" in fb["correct"]
    assert "wrong sign" in fb["drift_wrong_sign"]
    assert "returns beta(t); the diffusion is its square root" in fb["diffusion_is_variance"]
    assert "still raises NotImplementedError" in fb["stub_untouched"]
    assert "NaN or inf" in fb["returns_nan"]
    assert "returned shape (16, 1)" in fb["wrong_shape"]
    assert "no function named vp_drift" in fb["renamed_functions"]
    assert "IndexError" in fb["raises_exception"]
    assert "did not finish within 10 s" in fb["endless_loop_in_function"]
    assert "cell 5 (`i = 0`) ran past 6 s and was interrupted" in fb["endless_loop_in_cell"]
    assert "ran past its 60 s limit" in fb["loop_that_swallows_interrupts"]
    assert "SystemExit" in fb["sys_exit_in_cell"] and "SystemExit" in fb["sys_exit_in_function"]
    assert "exited with status 3" in fb["os_exit_in_cell"]
    assert "printed 40,0" in fb["huge_output"] and "more than the 1,000,000 expected" in fb["huge_output"]
    assert "can't allocate memory" in fb["memory_hog"] or "MemoryError" in fb["memory_hog"], fb["memory_hog"]
    assert "ModuleNotFoundError" in fb["typo_in_imports"]
    assert "vp_drift uses the course's reference implementation (it uses course.sde)" in fb["wraps_the_reference"]
    assert "could not read the notebook" in fb["corrupted_json"]
    assert "could not read the notebook" in fb["not_a_notebook"]
    assert "no notebook for chapter 01_forward_sdes was submitted" in fb["nothing_submitted"]


def test_submissions_and_instructor_files_survive(graded):
    root, subs, out, before = graded
    assert sorted(p.relative_to(subs) for p in subs.rglob("*")) == before
    assert (out / "keep.txt").read_text() == "the instructor's file"
    assert not (out / "gradebook.partial.csv").exists()  # replaced by the full gradebook at the end
    assert (out / "grading.txt").read_text().startswith("isolation: ")
    assert not list(root.glob("*.ipynb"))  # nothing written beside the folders either


def test_checks_use_fresh_random_inputs_so_pasted_values_fail(tmp_path):
    # "hard_coded_values" fails with every seed: its pasted numbers match one t only
    subs = write_corpus(tmp_path / "s")
    limits = Limits(**LIMITS)
    for seed in (0, 1):
        report = check_notebook(subs / "hard_coded_values" / f"{CHAPTER}.ipynb", seed=seed, limits=limits)
        assert [r.status for r in report.results] == ["passed", "passed", "failed"], report.summary()


def test_discover_layouts_chapters_and_missing(tmp_path):
    import os

    nb = nbformat.v4.new_notebook()
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "01_forward_sdes.ipynb").write_text(nbformat.writes(nb))
    (tmp_path / "ann" / "03_probability_flow.ipynb").write_text(nbformat.writes(nb))
    (tmp_path / "ann" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "ann" / ".ipynb_checkpoints" / "01_forward_sdes-checkpoint.ipynb").write_text("{}")
    (tmp_path / "bob-01_forward_sdes.ipynb").write_text(nbformat.writes(nb))
    (tmp_path / "bob_01_forward_sdes (1).ipynb").write_text(nbformat.writes(nb))
    os.utime(tmp_path / "bob_01_forward_sdes (1).ipynb", ns=(1, 1))  # older: the newest is graded
    tagged = nbformat.v4.new_notebook(metadata={"course": {"chapter": "03_probability_flow"}})
    (tmp_path / "cy.ipynb").write_text(nbformat.writes(tagged))  # chapter from metadata, student from name
    (tmp_path / "notes.ipynb").write_text(nbformat.writes(nb))  # no chapter anywhere
    subs, notes = discover(tmp_path)
    got = {(s.student, s.chapter): (s.path.name if s.path else None) for s in subs}
    assert got == {("ann", "01_forward_sdes"): "01_forward_sdes.ipynb",
                   ("ann", "03_probability_flow"): "03_probability_flow.ipynb",
                   ("bob", "01_forward_sdes"): "bob-01_forward_sdes.ipynb",
                   ("bob", "03_probability_flow"): None,
                   ("cy", "01_forward_sdes"): None,
                   ("cy", "03_probability_flow"): "cy.ipynb"}
    bob = next(s for s in subs if s.student == "bob" and s.chapter == "01_forward_sdes")
    assert [p.name for p in bob.ignored] == ["bob_01_forward_sdes (1).ipynb"]
    assert any("notes.ipynb" in n for n in notes)
    chosen, notes = discover(tmp_path, choose=["bob_01_forward_sdes (1).ipynb"])  # the instructor's pick
    bob = next(s for s in chosen if s.student == "bob" and s.chapter == "01_forward_sdes")
    assert bob.path.name == "bob_01_forward_sdes (1).ipynb" and [p.name for p in bob.ignored] == \
        ["bob-01_forward_sdes.ipynb"]
    assert any("graded the chosen one, " in n and "bob_01_forward_sdes (1).ipynb; not graded" in n
               for n in notes), notes
    for wrong, message in (("ann/02_reverse_sde.ipynb", "not a notebook that was found"),
                           (tmp_path.parent / "elsewhere.ipynb", "not inside the submissions folder")):
        with pytest.raises(ValueError, match=message):
            discover(tmp_path, choose=[wrong])
    with pytest.raises(ValueError, match="names 2 notebooks for bob"):
        discover(tmp_path, choose=["bob-01_forward_sdes.ipynb", "bob_01_forward_sdes (1).ipynb"])
    only, _ = discover(tmp_path, ["03_probability_flow"])
    assert {s.chapter for s in only} == {"03_probability_flow"}
    with pytest.raises(ValueError, match="unknown chapter"):
        discover(tmp_path, ["99_nope"])
    with pytest.raises(FileNotFoundError, match="no submissions folder"):
        discover(tmp_path / "nowhere")


def test_points_come_from_the_registry_and_status_lists_each_problem(monkeypatch):
    ch1 = CHAPTERS["01_forward_sdes"]

    def report(chapter, status, passed):
        return NotebookReport("x.ipynb", chapter, status, tuple(
            CheckResult(ex.id, ex.title, "passed" if ok else "failed", "") for ex, ok in zip(CHAPTERS[chapter], passed, strict=True)))

    g = StudentGrade("ann", (report("01_forward_sdes", "graded", [1, 0, 1]),
                             report("03_probability_flow", "timed out", [1, 0, 0])))
    assert g.status == "03_probability_flow: timed out"
    assert g.total == 3
    weighted = {**CHAPTERS, "01_forward_sdes": tuple(
        type(ex)(ex.id, ex.title, ex.names, ex.check, points=p) for ex, p in zip(ch1, [2.5, 1, 1], strict=True))}
    monkeypatch.setattr("course.exercises.grade.CHAPTERS", weighted)
    book = list(csv.reader(io.StringIO(gradebook_csv([g]))))
    assert book[0] == ["student", "ex 1.1", "ex 1.2", "ex 1.3", "ex 3.1", "ex 3.2", "ex 3.3", "total", "out of",
                       "status"]
    assert book[1] == ["ann", "2.5", "0", "1", "1", "0", "0", "4.5", "7.5", "03_probability_flow: timed out"]


def test_grade_command_errors(tmp_path, capsys):
    assert main(["grade", str(tmp_path / "nowhere")]) == 2
    assert "no submissions folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["grade", str(tmp_path / "empty"), "--out", str(tmp_path / "g")]) == 2
    assert "no exercise notebooks" in capsys.readouterr().err
    with pytest.raises(ValueError, match="memory_mb >= 3072"):
        Limits(memory_mb=1000)
    with pytest.raises(ValueError, match="jobs >= 1"):
        grade_submissions([], jobs=0)
    assert write_results([], tmp_path / "g").read_text() == "student,total,out of,status\n"


def test_syllabus_points_equal_the_registry():
    readme = (ROOT / "README.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in readme.splitlines()
            if line.startswith("| ") and line.count(" | ") >= 6 and line[2:4].isdigit()}
    for chapter, exercises in CHAPTERS.items():
        expected = " · ".join(f"{ex.id}: {ex.points:g}" for ex in exercises)
        assert rows[chapter[:2]][4] == expected, (chapter, rows[chapter[:2]][4])


def test_gradebook_cells_cannot_start_a_formula():
    g = StudentGrade("=HYPERLINK(\"http://x\")", (NotebookReport("x.ipynb", "03_probability_flow", "graded", tuple(
        CheckResult(ex.id, ex.title, "passed", "") for ex in CHAPTERS["03_probability_flow"])),))
    rows = list(csv.reader(io.StringIO(gradebook_csv([g, StudentGrade("@bob", g.reports), StudentGrade("-x", g.reports),
                                                     StudentGrade("ann", g.reports)]))))
    assert [r[0] for r in rows[1:]] == ["'=HYPERLINK(\"http://x\")", "'@bob", "'-x", "ann"]
    assert rows[1][1:] == ["1", "1", "1", "3", "3", "graded"]


def test_partial_gradebook_keeps_each_grade_until_the_full_one_is_written(tmp_path):
    from course.exercises.grade import PARTIAL, PartialGradebook, Submission

    ch = "03_probability_flow"
    partial = PartialGradebook(tmp_path)
    rep = NotebookReport("x.ipynb", ch, "graded", (CheckResult("3.1", "t", "passed", ""),
                                                   CheckResult("3.2", "t", "failed", ""), CheckResult("3.3", "t", "failed", "")))
    partial.add(Submission("+ann", ch, None), rep)
    assert (tmp_path / PARTIAL).read_text() == "student,chapter,points,out of,status\n'+ann,03_probability_flow,1,3,graded\n"
    write_results([StudentGrade("+ann", (rep,))], tmp_path)
    assert not (tmp_path / PARTIAL).exists() and (tmp_path / "gradebook.csv").read_text().splitlines()[1] == \
        "'+ann,1,0,0,1,3,graded"
    assert not list(tmp_path.rglob("*.tmp"))


def test_discovery_notes_every_odd_entry_and_never_crashes(tmp_path):
    import os

    nb = nbformat.writes(nbformat.v4.new_notebook())
    ch1, ch3 = "01_forward_sdes", "03_probability_flow"
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / f"{ch1}.ipynb").write_text(nb)
    older = tmp_path / "ann" / f"{ch1} (old).ipynb"
    older.write_text(nb)
    os.utime(older, ns=(1, 1))  # the newest of several notebooks for one chapter is graded
    (tmp_path / "ann" / "link.ipynb").symlink_to(tmp_path / "ann" / f"{ch1}.ipynb")
    (tmp_path / "ann" / "linked_folder").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "ann" / "folder.ipynb").mkdir()
    os.mkfifo(tmp_path / "ann" / f"{ch3}.ipynb")
    (tmp_path / "ann" / "notes.txt").write_text("mine")  # a student's other files: kept, not noted
    (tmp_path / "bob_01_FORWARD_SDES.IPYNB").write_text("\ufeff" + nb)  # case variant and a byte-order mark
    (tmp_path / "cy_01_forward_sdes.zip").write_bytes(b"PK\x03\x04")
    (tmp_path / os.fsdecode(b"d\xffn_01_forward_sdes.ipynb")).write_text(nb)  # a name that is not UTF-8
    tagged = nbformat.writes(nbformat.v4.new_notebook(metadata={"course": {"chapter": ch3}}))
    (tmp_path / f"eve_{ch1}.ipynb").write_text(tagged)  # the name and the metadata disagree
    (tmp_path / "section-b").mkdir()
    for who in ("fay", "gus"):
        (tmp_path / "section-b" / f"{who}_{ch1}.ipynb").write_text(nb)
    subs, notes = discover(tmp_path)
    got = {(s.student, s.chapter): (s.path.name if s.path else None) for s in subs}
    assert got == {("ann", ch1): f"{ch1}.ipynb", ("bob", ch1): "bob_01_FORWARD_SDES.IPYNB",
                   ("d\ufffdn", ch1): "d\udcffn_01_forward_sdes.ipynb", ("eve", ch1): f"eve_{ch1}.ipynb",
                   ("fay", ch1): f"fay_{ch1}.ipynb", ("gus", ch1): f"gus_{ch1}.ipynb"}
    text = "\n".join(notes)
    text.encode("utf-8")  # every note can be written to unattributed.txt
    for expected in ("link.ipynb: a symbolic link; not followed", "linked_folder: a symbolic link",
                     "folder.ipynb: a folder named like a notebook", f"{ch3}.ipynb: not a regular file",
                     "cy_01_forward_sdes.zip: a zip archive; unpack it",
                     f"eve_{ch1}.ipynb: named for chapter {ch1} but its metadata says {ch3}",
                     "section-b: holds notebooks of 2 students (fay, gus)",
                     f"ann, {ch1}: 2 notebooks; graded the newest"):
        assert expected in text, (expected, text)
    assert "notes.txt" not in text
    report = check_notebook(tmp_path / "bob_01_FORWARD_SDES.IPYNB", chapter=ch1)
    assert report.status == "graded", report.summary()  # the byte-order mark is not an error


@pytest.mark.parametrize("content, why", [(b"", "the file is empty"), (b"\xff\xfe{}", "not UTF-8 text"),
                                          (b"{\"cells\": 3}", "could not read the notebook")])
def test_unreadable_files_are_invalid_notebooks_that_say_why(tmp_path, content, why):
    path = tmp_path / "01_forward_sdes.ipynb"
    path.write_bytes(content)
    report = check_notebook(path)
    assert report.status == "invalid notebook" and report.score == 0 and why in report.notes[0], report.notes


@pytest.mark.parametrize("kind", ["bwrap", "unshare"])
def test_attacks_on_classmates_and_the_grader_change_nothing_in_the_sandbox(tmp_path, kind):
    """Under bubblewrap or unshare, with two notebooks at a time: killing what it can see, its parent, a
    detached process that rewrites the gradebook after the grader exits, editing, deleting and
    listing classmates' notebooks by absolute path; everyone keeps their grade."""
    import os
    import time

    from course.exercises import isolation
    from tests.grading_corpus import isolation_attacks, submissions

    if not isolation.works(kind):
        pytest.skip(f"isolation {kind!r} does not work here (CI installs bubblewrap; unshare needs user namespaces)")
    subs, out = tmp_path / "submissions", tmp_path / "grades"
    attacks = isolation_attacks(subs, out)
    everyone = {"correct": submissions()["correct"], "drift_wrong_sign": submissions()["drift_wrong_sign"], **attacks}
    for student, nb in everyone.items():
        (subs / student).mkdir(parents=True)
        (subs / student / f"{CHAPTER}.ipynb").write_text(nbformat.writes(nb))
    before = {p: p.read_bytes() for p in subs.rglob("*") if p.is_file()}
    args = ["grade", str(subs), "--out", str(out), "--jobs", "2", "--isolation", kind,
            "--timeout", str(LIMITS["notebook_timeout"]), "--cell-timeout", str(LIMITS["cell_timeout"]),
            "--check-timeout", str(LIMITS["check_timeout"]), "--memory-mb", str(LIMITS["memory_mb"])]
    assert main(args) == 0
    time.sleep(5)  # longer than the detached writer waits
    rows = {r["student"]: r for r in csv.DictReader(io.StringIO((out / "gradebook.csv").read_text()))}
    assert set(rows) == set(everyone)
    for student in everyone:
        want = ("2", "graded") if student == "drift_wrong_sign" else ("3", "graded")
        assert (rows[student]["total"], rows[student]["status"]) == want, (student, rows[student])
    assert {p: p.read_bytes() for p in subs.rglob("*") if p.is_file()} == before
    assert (out / "grading.txt").read_text().startswith(f"isolation: {kind}")
    assert "AssertionError" not in (out / "feedback" / "reads_the_submissions.md").read_text()  # saw nothing
    leftovers = subprocess.run(["pgrep", "-f", "time.sleep(4)"], capture_output=True, text=True).stdout.split()
    assert [p for p in leftovers if int(p) != os.getpid()] == []


def test_feedback_file_names_are_unique_and_listed(tmp_path):
    rep = NotebookReport("x.ipynb", "03_probability_flow", "graded", tuple(
        CheckResult(ex.id, ex.title, "passed", "") for ex in CHAPTERS["03_probability_flow"]))
    names = ["c5 collide", "c5_collide", "ann", "../../etc"]
    write_results([StudentGrade(n, (rep,)) for n in names], tmp_path, report=["isolation: none"])
    index = list(csv.reader(io.StringIO((tmp_path / "feedback" / "index.csv").read_text())))
    assert index == [["student", "feedback"], ["c5 collide", "feedback/c5_collide.md"],
                     ["c5_collide", "feedback/c5_collide-2.md"], ["ann", "feedback/ann.md"],
                     ["../../etc", "feedback/etc.md"]]
    for student, file in index[1:]:
        assert (tmp_path / file).read_text().startswith(f"# Feedback for {student}"), file
    assert sorted(p.name for p in (tmp_path / "feedback").iterdir()) == \
        ["ann.md", "c5_collide-2.md", "c5_collide.md", "etc.md", "index.csv"]
    report = (tmp_path / "grading.txt").read_text()
    assert "'c5 collide' -> feedback/c5_collide.md" in report and "'c5_collide' -> feedback/c5_collide-2.md" \
        in report and "'ann'" not in report, report
