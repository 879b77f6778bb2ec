"""Exercises: checks with specific verdicts, the registry, and the notebook pipeline.

In a notebook: ``from course.exercises import check`` then ``check("1.1", vp_drift, vp_diffusion)``.
"""

from .registry import CHAPTERS, Exercise, check, get_exercise, run_checks
from .verdict import CheckResult

__all__ = ["CHAPTERS", "Exercise", "CheckResult", "check", "get_exercise", "run_checks"]
