"""The ``course`` command line: ``build-exercises``, ``check``, ``grade``, ``train``, ``doctor`` and ``lab``."""

from __future__ import annotations

import argparse
import os
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


def _limits(args, hide=()):
    from .exercises.isolation import resolve
    from .exercises.runner import Limits

    return Limits(notebook_timeout=args.timeout, cell_timeout=args.cell_timeout,
                  check_timeout=args.check_timeout, memory_mb=args.memory_mb or None, fast=not args.full,
                  isolation=resolve(args.isolation), hide=tuple(str(Path(h).resolve()) for h in hide))


def _check(args) -> int:
    from .exercises.runner import check_notebook

    try:
        limits = _limits(args)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    worst = 0
    for name in args.notebooks:
        path = Path(name)
        if not path.is_file():
            print(f"error: no notebook at {path}", file=sys.stderr)
            worst = max(worst, 2)
            continue
        print(f"Running {path} headless (this takes a little while)...", flush=True)
        report = check_notebook(path, seed=args.seed, limits=limits)
        print(report.summary())
        if report.status != "graded":
            worst = max(worst, 2)
        elif report.score < report.max_score:
            worst = max(worst, 1)
    return worst


def _grade(args) -> int:
    from tqdm.auto import tqdm

    from .exercises.grade import (
        PartialGradebook,
        discover,
        grade_submissions,
        summary_table,
        write_results,
    )

    try:
        subs, notes = discover(args.submissions, args.chapters, choose=args.choose)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not subs:
        print(f"error: no exercise notebooks found in {args.submissions}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    try:
        limits = _limits(args, hide=(args.submissions, args.out))
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .exercises.isolation import describe

    isolation = describe(limits.isolation)
    print(f"isolation: {isolation}", file=sys.stderr if limits.isolation == "none" else sys.stdout)
    students = len({s.student for s in subs})
    chapters = sorted({s.chapter for s in subs})
    print(f"Grading {students} student(s), chapter(s) {', '.join(chapters)}: {len(subs)} notebook(s)")
    partial = PartialGradebook(args.out)
    with tqdm(total=len(subs), unit="notebook", file=sys.stderr, disable=None) as bar:
        def progress(sub, report):
            partial.add(sub, report)
            bar.set_postfix_str(f"{sub.student}: {report.status}")
            bar.update()

        grades = grade_submissions(subs, limits=limits, seed=args.seed, jobs=args.jobs, progress=progress)
    book = write_results(grades, args.out, notes, report=[f"isolation: {isolation}", *_run_facts(limits, args)])
    print(summary_table(grades))
    print(f"\nwrote {book} and {len(grades)} feedback file(s) in {Path(args.out) / 'feedback'}")
    return 0


def _run_facts(limits, args) -> list[str]:
    from . import __version__

    return [f"limits: notebook {limits.notebook_timeout:g} s, cell {limits.cell_timeout:g} s, check "
            f"{limits.check_timeout:g} s, memory {limits.memory_mb or 'no cap'} MB, "
            f"{'full' if not limits.fast else 'fast'} mode", f"jobs: {args.jobs}",
            f"seed: {'fresh' if args.seed is None else args.seed}", f"course {__version__}"]


def _train(args) -> int:
    from .recipes import RECIPES, run_recipe

    if args.name not in RECIPES:
        print(f"error: unknown recipe {args.name!r}; known recipes: {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    import torch

    from . import distributed

    try:
        info, device = distributed.init(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    precision = args.precision
    if precision == "auto":  # bf16 autocast where the GPU supports it; float32 on CPUs
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and info.active:  # the cores are shared between the processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    try:
        result = run_recipe(args.name, folder=args.out, fast=True if args.fast else None, device=device,
                            steps=args.steps, minutes=args.minutes, data=args.data, precision=precision,
                            shards=args.shards, resume=args.resume, state_every=args.state_every)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    if info.is_main:
        where = f"{info.world_size} processes on {device.type}" if info.active else str(device)
        print(f"trained {args.name} in {result.seconds:.1f} s ({where}, {precision}); "
              f"wrote {result.path}")
        for key, value in result.metrics.items():
            print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    return 0


def _doctor(args) -> int:
    from .environment import environment_report, format_report

    checks = environment_report()
    print(format_report(checks))
    return 0 if all(c.ok for c in checks) else 1


def _lab(args) -> int:
    from .lab import prepare_lab

    for line in prepare_lab():
        print(line)
    if args.prepare_only:
        return 0
    command = [str(Path(sys.executable).with_name("jupyter")), "lab", *args.jupyter_args]
    sys.stdout.flush()
    os.execv(command[0], command)
    return 0  # not reached: execv replaces this process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="course", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-exercises", help="generate exercises/ from solutions/")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 and name the files when exercises/ is stale")
    p.add_argument("--solutions", default="solutions", help="solutions folder (default: solutions)")
    p.add_argument("--exercises", default="exercises", help="exercises folder (default: exercises)")
    p.set_defaults(func=_build_exercises)

    def sandbox_options(p):
        p.add_argument("--timeout", type=float, default=600,
                       help="seconds for a whole notebook with its checks (default: 600)")
        p.add_argument("--cell-timeout", type=float, default=120, help="seconds per code cell (default: 120)")
        p.add_argument("--check-timeout", type=float, default=60, help="seconds per exercise check (default: 60)")
        p.add_argument("--memory-mb", type=int, default=8192,
                       help="address-space cap per notebook in MB, 0 for none (default: 8192)")
        p.add_argument("--full", action="store_true",
                       help="run notebooks in full mode (default: COURSE_FAST=1; points come only from the checks)")
        p.add_argument("--seed", type=int, default=None,
                       help="seed of the checks' random inputs (default: fresh each run)")
        p.add_argument("--isolation", choices=("auto", "bwrap", "unshare", "none"), default="auto",
                       help="OS sandbox per notebook: bwrap (bubblewrap), unshare, none, or auto: the first that "
                            "works here (default)")

    p = sub.add_parser("check", help="run exercise notebooks in the sandbox and print each verdict")
    p.add_argument("notebooks", nargs="+", help="exercise notebook(s) to check")
    sandbox_options(p)
    p.set_defaults(func=_check)

    p = sub.add_parser("grade", help="grade a folder of submitted exercise notebooks (instructors)")
    p.add_argument("submissions", help="folder with one sub-folder (or file-name prefix) per student")
    p.add_argument("--out", default="grades", help="where gradebook.csv and feedback/ go (default: grades)")
    p.add_argument("--chapters", nargs="+", default=None,
                   help="chapters to grade, e.g. 01_forward_sdes (default: every chapter submitted)")
    p.add_argument("--jobs", type=int, default=1, help="notebooks run at the same time (default: 1)")
    p.add_argument("--choose", action="append", default=[], metavar="NOTEBOOK",
                   help="where a student submitted several notebooks for one chapter, grade this one instead of "
                        "the newest (a path in the submissions folder; repeat for several students)")
    sandbox_options(p)
    p.set_defaults(func=_grade)

    p = sub.add_parser("train", help="train a named recipe and write checkpoints/NAME.pt and its manifest entry")
    p.add_argument("name", help="recipe name, e.g. mnist_classifier")
    p.add_argument("--out", default=None, help="checkpoint folder (default: the course's checkpoints/)")
    p.add_argument("--fast", action="store_true", help="a few steps only (as under COURSE_FAST=1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: the best one here)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="bf16 autocast or float32 (default auto: bf16 on GPUs that support it, else fp32)")
    p.add_argument("--steps", type=int, default=None, help="train this many steps instead of the recipe's")
    p.add_argument("--minutes", type=float, default=None, help="stop after this many minutes of training")
    p.add_argument("--data", default=None, choices=("full", "subset"),
                   help="full: the whole dataset (60 000 MNIST digits; an error where unavailable); "
                        "subset: the offline 4 000 (default: COURSE_OFFLINE decides)")
    p.add_argument("--shards", type=int, default=None,
                   help="draw every batch as this many shards (default: one per process; "
                        "one process with --shards N reproduces N processes)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its training state")
    p.add_argument("--state-every", type=int, default=None,
                   help="write the resumable training state every this many steps (default: 5 %% of the run, >= 50)")
    p.set_defaults(func=_train)

    p = sub.add_parser("doctor", help="check that this environment can run the course")
    p.set_defaults(func=_doctor)

    p = sub.add_parser("lab", help="install the course's JupyterLab settings, trust its notebooks, open JupyterLab "
                                   "(make lab)")
    p.add_argument("--prepare-only", action="store_true", help="install and trust, but do not start JupyterLab")
    p.epilog = "Any other options (--allow-root, --port=8890, ...) are passed on to `jupyter lab`."
    p.set_defaults(func=_lab)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``course`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "lab":
        args.jupyter_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
