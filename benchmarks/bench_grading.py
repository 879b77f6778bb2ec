"""Grader benchmark: wall time of ``course grade`` over the planted corpus of tests/grading_corpus.py.

Usage:  python benchmarks/bench_grading.py [--jobs 1 2] [--isolation none bwrap]

Writes the 32 planted chapter-01 submissions (correct, wrong in typical ways, stub, exceptions,
endless loops, sys.exit, os._exit, huge output, file deletion, NaN, wrong shape, broken JSON,
missing, ...) to a temporary folder and grades them with the corpus's limits (60 s per notebook,
6 s per cell, 10 s per check), once per --jobs and --isolation value (isolations that do not
work on this machine are skipped with a line saying so). Prints the wall time, the number of
notebooks per status and whether the gradebook equals the expected one. One submission swallows
every interrupt and so always costs the full 60 s notebook limit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from course.exercises import isolation  # noqa: E402
from course.exercises.grade import discover, grade_submissions, gradebook_csv  # noqa: E402
from course.exercises.runner import Limits  # noqa: E402
from tests.grading_corpus import LIMITS, expected_gradebook, write_corpus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--isolation", nargs="+", default=["none", "bwrap"], choices=isolation.ISOLATIONS[1:])
    args = parser.parse_args()
    print("| isolation | jobs | notebooks | wall time | graded | timed out | crashed | invalid | missing "
          "| gradebook as expected |")
    print("|-----------|------|-----------|-----------|--------|-----------|---------|---------|---------"
          "|-----------------------|")
    runs = []
    for kind in args.isolation:
        if not isolation.works(kind):
            print(f"({kind} does not work on this machine: skipped)")
            continue
        runs += [(kind, jobs) for jobs in args.jobs]
    for kind, jobs in runs:
        limits = Limits(**LIMITS, isolation=kind)
        with tempfile.TemporaryDirectory() as tmp:
            subs, _ = discover(write_corpus(Path(tmp) / "submissions"))
            start = time.perf_counter()
            grades = grade_submissions(subs, limits=limits, jobs=jobs)
            wall = time.perf_counter() - start
        statuses = Counter(rep.status for g in grades for rep in g.reports)
        counts = {s: statuses[s] for s in ("graded", "timed out", "crashed", "invalid notebook", "missing")}
        ok = gradebook_csv(grades) == expected_gradebook()
        print(f"| {kind:<9} | {jobs:4d} | {len(subs):9d} | {wall:7.1f} s | " + " | ".join(
            f"{counts[s]:{w}d}" for s, w in zip(counts, (6, 9, 7, 7, 7), strict=True)) + f" | {'yes' if ok else 'NO':<21} |",
            flush=True)


if __name__ == "__main__":
    main()
