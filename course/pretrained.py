"""Load the course's pretrained checkpoints: ``course.pretrained.load("mnist_classifier")``.

Each checkpoint ``checkpoints/NAME.pt`` was written by ``course train NAME`` together with an
entry in ``checkpoints/manifest.json``. Loading checks the file's sha256 against the manifest,
rebuilds the network from the recipe recorded there and loads the weights with
``torch.load(weights_only=True)``. Anything wrong (missing, truncated, corrupted, replaced, not
in the manifest) raises :class:`~course.training.CheckpointError` naming the command that
rebuilds the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .recipes import RECIPES, Recipe, build_model, checkpoint_dir, sha256_of
from .training import CheckpointError, load_checkpoint

__all__ = ["load", "manifest", "CheckpointError"]


def manifest(folder: str | Path | None = None) -> dict:
    """The manifest of ``folder`` (default: the course's ``checkpoints/``); {} when there is none."""
    path = (Path(folder) if folder is not None else checkpoint_dir()) / "manifest.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it from git") from exc


def load(name: str, *, folder: str | Path | None = None, allow_fast: bool = False) -> nn.Module:
    """The pretrained model ``name`` in eval mode, verified against the manifest.

    ``allow_fast`` accepts a checkpoint written in fast mode (a few steps; tests only)."""
    if name not in RECIPES:
        raise ValueError(f"unknown checkpoint {name!r}; known: {', '.join(RECIPES)}")
    folder = Path(folder) if folder is not None else checkpoint_dir()
    path, rebuild = folder / f"{name}.pt", f"course train {name}"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is missing; rebuild it with `{rebuild}`")
    entry = manifest(folder).get(name)
    if entry is None:
        raise CheckpointError(f"checkpoint {path} has no entry in {folder / 'manifest.json'}; "
                              f"rebuild it with `{rebuild}`")
    digest = sha256_of(path)
    if digest != entry["sha256"]:
        raise CheckpointError(f"checkpoint {path} does not match its sha256 in the manifest (truncated, corrupted "
                              f"or replaced: {digest[:12]}... instead of {entry['sha256'][:12]}...); "
                              f"rebuild it with `{rebuild}`")
    if entry.get("fast") and not allow_fast:
        raise CheckpointError(f"checkpoint {path} was trained in fast mode (a test run); "
                              f"rebuild it with `{rebuild}` without COURSE_FAST")
    fields = dict(entry["recipe"])
    fields["channels"] = tuple(fields.get("channels", RECIPES[name].channels))
    fields["options"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in fields.get("options", ()))
    model = build_model(Recipe(**fields))
    load_checkpoint(path, model, rebuild=rebuild)
    return model.eval()
