"""Load the course's pretrained checkpoints: ``course.pretrained.load("mnist_classifier")``.

Each checkpoint ``checkpoints/NAME.pt`` was written by ``course train NAME`` together with an
entry in ``checkpoints/manifest.json``. Loading checks the file's sha256 against the manifest,
rebuilds the network from the recipe recorded there and loads the weights with
``torch.load(weights_only=True)``. Anything wrong (missing, truncated, corrupted, replaced, not
in the manifest) raises :class:`~course.training.CheckpointError` naming the command that
rebuilds the file.
"""

from __future__ import annotations

from . import recipes  # noqa: F401  (registers every chapter's recipes)
from .recipe_registry import CheckpointError, load, manifest

__all__ = ["load", "manifest", "CheckpointError"]
