"""What ``make lab`` prepares before it opens JupyterLab (``course lab``).

- **Settings shipped with the course** (:data:`LAB_SETTINGS`): JupyterLab's news pop-up and its
  update check are switched off. They are written as an ``overrides.d`` file of the environment
  that runs JupyterLab (``<prefix>/share/jupyter/lab/settings/overrides.d/course.json``), so they
  apply to the course's JupyterLab only and leave the user's own settings alone.
- **Trusted notebooks**: the committed lecture and solution notebooks are signed in the user's
  Jupyter trust database, so JupyterLab restores their saved widgets (the sliders of chapters 01
  and 06) without running them. Every widget cell also carries a static picture of its default
  values (``course.widgets.interactive_figure``), so nothing depends on trust to be seen.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from .environment import REPO_ROOT

__all__ = ["LAB_SETTINGS", "course_notebooks", "install_lab_settings", "prepare_lab", "trust_notebooks"]

LAB_SETTINGS = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}


def install_lab_settings(prefix: str | Path | None = None) -> Path:
    """Write :data:`LAB_SETTINGS` as the course's ``overrides.d`` file under ``prefix`` (default:
    this interpreter's ``sys.prefix``, the environment whose JupyterLab ``make lab`` starts)."""
    folder = Path(prefix if prefix is not None else sys.prefix) / "share" / "jupyter" / "lab" / "settings"
    target = folder / "overrides.d" / "course.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(LAB_SETTINGS, indent=2) + "\n"
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    return target


def course_notebooks(root: str | Path = REPO_ROOT) -> list[Path]:
    """The committed notebooks whose outputs a student opens: ``notebooks/`` and ``solutions/``."""
    root = Path(root)
    return sorted([*root.glob("notebooks/*.ipynb"), *root.glob("solutions/*.ipynb")])


def trust_notebooks(paths: Iterable[str | Path], *, data_dir: str | Path | None = None) -> list[Path]:
    """Sign each notebook in the Jupyter trust database (``jupyter trust``), in ``data_dir`` if
    given, else Jupyter's data folder; returns the notebooks that were not yet trusted."""
    import nbformat
    from nbformat.sign import NotebookNotary

    notary = NotebookNotary(data_dir=str(data_dir)) if data_dir is not None else NotebookNotary()
    Path(notary.data_dir).mkdir(parents=True, exist_ok=True)  # the notary keeps its secret and database there
    signed = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"expected a notebook file, got {path}")
        nb = nbformat.read(path, as_version=4)
        if not notary.check_signature(nb):
            notary.sign(nb)
            signed.append(path)
    return signed


def prepare_lab(root: str | Path = REPO_ROOT, *, prefix: str | Path | None = None,
                data_dir: str | Path | None = None) -> list[str]:
    """Install the settings and trust the course's notebooks; returns one line per action."""
    lines = [f"JupyterLab settings of the course: {install_lab_settings(prefix)}"]
    notebooks = course_notebooks(root)
    signed = trust_notebooks(notebooks, data_dir=data_dir)
    lines.append(f"trusted notebooks: {len(notebooks)} ({len(signed)} newly signed)")
    return lines
