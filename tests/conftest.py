import os

import pytest
import torch

# Tests always run small and offline, whatever the caller's environment says.
os.environ.setdefault("COURSE_FAST", "1")
os.environ.setdefault("COURSE_OFFLINE", "1")


@pytest.fixture
def gen():
    """A fixed-seed generator: every statistical test is reproducible."""
    return torch.Generator().manual_seed(1234)


# The two shapes every rank-agnostic function is tested on: 2-D points and images.
SHAPES = [(64, 2), (8, 1, 6, 6)]

os.environ.setdefault("MPLBACKEND", "Agg")
