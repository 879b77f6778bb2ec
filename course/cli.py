"""The ``course`` command line: ``build-exercises``, ``check`` and ``doctor``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _build_exercises(args) -> int:
    from .exercises.build import ExerciseBuildError, build_exercises

    try:
        changed = build_exercises(args.solutions, args.exercises, check=args.check)
    except ExerciseBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        for path in changed:
            print(f"{path} is out of date with {args.solutions}/: run `course build-exercises`",
                  file=sys.stderr)
        if not changed:
            print(f"{args.exercises}/ is in sync with {args.solutions}/")
        return 1 if changed else 0
    for path in changed:
        print(f"wrote {path}")
    if not changed:
        print(f"{args.exercises}/ was already up to date")
    return 0


def _check(args) -> int:
    from .exercises.runner import check_notebook

    worst = 0
    for name in args.notebooks:
        path = Path(name)
        if not path.is_file():
            print(f"error: no notebook at {path}", file=sys.stderr)
            worst = max(worst, 2)
            continue
        print(f"Running {path} headless (this takes a little while)...", flush=True)
        try:
            report = check_notebook(path, cell_timeout=args.timeout, seed=args.seed)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            worst = max(worst, 2)
            continue
        print(report.summary())
        if report.status != "graded":
            worst = max(worst, 2)
        elif report.score < report.max_score:
            worst = max(worst, 1)
    return worst


def _doctor(args) -> int:
    from .environment import environment_report, format_report

    checks = environment_report()
    print(format_report(checks))
    return 0 if all(c.ok for c in checks) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="course", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-exercises", help="generate exercises/ from solutions/")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 and name the files when exercises/ is stale")
    p.add_argument("--solutions", default="solutions", help="solutions folder (default: solutions)")
    p.add_argument("--exercises", default="exercises", help="exercises folder (default: exercises)")
    p.set_defaults(func=_build_exercises)

    p = sub.add_parser("check", help="run exercise notebooks headless and print each verdict")
    p.add_argument("notebooks", nargs="+", help="exercise notebook(s) to check")
    p.add_argument("--timeout", type=float, default=300, help="seconds per cell (default: 300)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the checks' random inputs (default: fresh each run)")
    p.set_defaults(func=_check)

    p = sub.add_parser("doctor", help="check that this environment can run the course")
    p.set_defaults(func=_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``course`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
