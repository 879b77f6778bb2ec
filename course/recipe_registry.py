"""The recipe registry: what a recipe is, how its kind trains and measures it, and its checkpoint.

A recipe is a frozen dataclass: what to build, how long to train it and on which data. Running
it (:func:`run_recipe`) trains on the training split of ``recipe.data`` (MNIST's offline subset
when ``COURSE_OFFLINE=1``), measures the model on the held-out split, and writes
``checkpoints/NAME.pt`` atomically with an entry in ``checkpoints/manifest.json`` (sha256, the
recipe's fields, training wall time on this machine, the measured metrics). :func:`load` reads
them back, verified.

A recipe's ``kind`` names a :class:`RecipeKind` (how to build, train and measure that kind of
model). The module that owns a kind registers it with :func:`register_kind` and its recipes with
:func:`register_recipe`; this module knows no kind. ``course.recipes`` imports every module that
registers kinds (the catalogue); ``course.pretrained`` loads from it. The dependencies run one
way: registry <- kind modules <- ``course.recipes`` <- ``course.pretrained``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .datasets import ImageData, load_cifar10, load_mnist
from .training import CheckpointError, TrainConfig, load_checkpoint, save_checkpoint, train
from .utils import check_positive, check_positive_int, display_path, fast_mode, offline_mode

__all__ = ["Recipe", "RecipeKind", "RECIPES", "KINDS", "DATASETS", "IMAGE_SHAPES", "register_kind", "register_recipe", "get_recipe",
           "build_model", "recipe_loss", "run_recipe", "RecipeResult", "checkpoint_dir", "sha256_of", "manifest",
           "load", "load_data", "CheckpointError", "state_path_for"]


_MISSING = object()


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a checkpoint (stored in the manifest)."""

    name: str
    kind: str  # a registered RecipeKind (KINDS)
    steps: int
    batch_size: int
    lr: float
    width: int = 32  # classifiers: first-stage channels
    channels: tuple[int, int, int] = (32, 64, 64)  # U-Net widths
    patch: int = 2  # U-Net: 2x2 pixel patches folded into channels (4x faster on CPU, see docs)
    label_dropout: float = 0.1  # U-Net: share of labels replaced by the null class
    max_shift: int = 2  # classifiers: random translation by up to this many pixels
    ema_decay: float = 0.999
    seed: int = 0
    fast_steps: int = 20  # steps under COURSE_FAST=1 (tests)
    eval_w: float = 1.0  # U-Net: guidance weight of the reported metrics
    eval_nfe: int = 20  # U-Net: Euler steps of the reported metrics (2 NFE each when eval_w > 0)
    teacher: str = ""  # distillation: the recipe whose checkpoint is the teacher
    student_steps: int = 1  # distillation: sampling steps of the student
    options: tuple[tuple[str, object], ...] = ()  # settings of one kind (name, value), read by option()
    data: str = "mnist"  # the training and held-out images (DATASETS); evaluation classifier f"{data}_classifier"
    description: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown recipe kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.data not in DATASETS:
            raise ValueError(f"unknown data {self.data!r} for recipe {self.name!r}; expected one of {', '.join(DATASETS)}")
        check_positive_int(self.student_steps, "student_steps")
        check_positive_int(self.steps, "steps")
        check_positive_int(self.fast_steps, "fast_steps")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"expected 0 <= label_dropout < 1; got {self.label_dropout}")
        if not isinstance(self.options, tuple) or not all(
                isinstance(o, tuple) and len(o) == 2 and isinstance(o[0], str) for o in self.options):
            raise ValueError(f"expected options as a tuple of (name, value) pairs; got {self.options!r}")

    def option(self, name: str, default=_MISSING):
        """The value of option ``name`` (a setting only one recipe kind reads), else ``default``."""
        for key, value in self.options:
            if key == name:
                return value
        if default is _MISSING:
            known = ", ".join(k for k, _ in self.options) or "none"
            raise ValueError(f"recipe {self.name!r} has no option {name!r}; its options: {known}")
        return default


@dataclass(frozen=True)
class RecipeKind:
    """How one kind of model is built, trained and measured.

    ``build(recipe)`` gives the untrained network (also used to load checkpoints);
    ``prepare(recipe, model, folder, fast)`` may load a teacher or initial weights and returns a
    context dict; ``loss(recipe, model, context)`` gives ``loss(model, (images, labels), generator)``;
    ``dataset(recipe, images, labels, context)`` may replace the training tensors (e.g. by their
    latent codes, computed once) and returns the tuple that batches are drawn from;
    ``finish(recipe, model, train_data, fast, context)`` may complete the trained model before it is
    measured and saved (e.g. measure the latent scale);
    ``metrics(recipe, model, held_out, fast, classifier, context)`` measures the trained model (the
    evaluation classifier ``f"{recipe.data}_classifier"`` is loaded when ``needs_classifier``)."""

    build: Callable[[Recipe], nn.Module]
    loss: Callable[[Recipe, nn.Module, dict], Callable]
    metrics: Callable[..., dict]
    prepare: Callable[..., dict] | None = None
    needs_classifier: bool = False
    dataset: Callable[..., tuple] | None = None
    finish: Callable[..., None] | None = None


KINDS: dict[str, RecipeKind] = {}
RECIPES: dict[str, Recipe] = {}
DATASETS: dict[str, Callable[..., ImageData]] = {"mnist": load_mnist, "cifar10": load_cifar10}
IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def load_data(recipe: Recipe, split: str, *, verbose: bool = True, variant: str | None = None) -> ImageData:
    """The ``split`` ("train" or "test") of the recipe's dataset. ``variant`` "subset" asks for the
    offline subset, "full" for the whole dataset (an error where it cannot be had), ``None`` for
    the default (``COURSE_OFFLINE`` decides)."""
    if variant is None:
        return DATASETS[recipe.data](split, verbose=verbose)
    if recipe.data == "mnist" and variant == "subset":
        return load_mnist(split, offline=True, verbose=verbose)
    if recipe.data == "mnist":  # the torchvision files, downloaded only when COURSE_OFFLINE is off
        from .datasets import _torchvision_mnist, data_root

        try:
            data = _torchvision_mnist(split, data_root(), download=not offline_mode())
        except Exception as exc:  # noqa: BLE001 - missing files, no network
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise RuntimeError(f"--data full needs the 70 000 torchvision MNIST digits in {display_path(data_root())}, which could "
                               f"not be had here ({type(exc).__name__}: {first}); run once with a network and "
                               "COURSE_OFFLINE unset, or train without --data full") from exc
        if verbose:
            print(f"Using {data.source}.")
        return data
    if variant == "subset":
        raise ValueError(f"recipe {recipe.name!r} trains on {recipe.data}, which has no offline subset")
    return DATASETS[recipe.data](split, verbose=verbose)


def register_kind(name: str, kind: RecipeKind) -> None:
    """Make recipe kind ``name`` known (called by the module that owns it, at import)."""
    if name in KINDS and KINDS[name] is not kind:
        raise ValueError(f"recipe kind {name!r} is already registered")
    KINDS[name] = kind


def register_recipe(recipe: Recipe) -> Recipe:
    """Make ``recipe`` runnable by ``course train`` and loadable by ``course.pretrained.load``."""
    if recipe.name in RECIPES and RECIPES[recipe.name] != recipe:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def build_model(recipe: Recipe) -> nn.Module:
    """The untrained network of ``recipe``."""
    return KINDS[recipe.kind].build(recipe)


def recipe_loss(recipe: Recipe, model: nn.Module | None = None, context: dict | None = None):
    """The training loss ``loss(model, (images, labels), generator)`` of ``recipe``."""
    return KINDS[recipe.kind].loss(recipe, model, context or {})


def checkpoint_dir() -> Path:
    """``$COURSE_CHECKPOINTS``, else the repository's ``checkpoints/`` folder."""
    env = os.environ.get("COURSE_CHECKPOINTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "checkpoints"


def sha256_of(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path, name: str, entry: dict) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest[name] = entry
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="manifest", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(dict(sorted(manifest.items())), f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@dataclass
class RecipeResult:
    model: nn.Module
    seconds: float
    metrics: dict = field(default_factory=dict)
    path: Path | None = None


def _context_state(context: dict) -> dict:
    """What a recipe kind keeps changing in its context while it trains (a discriminator and its
    optimiser, a controller, logs): modules and optimisers by their state dicts, dataclass-like
    controllers by their fields, plain containers and numbers as they are. Functions and other
    objects are rebuilt identically by ``prepare`` and are not saved."""
    out = {}
    for key, value in context.items():
        if isinstance(value, (nn.Module, torch.optim.Optimizer)):
            out[key] = ("state_dict", copy.deepcopy(value.state_dict()))
        elif is_dataclass(value) and not isinstance(value, type):
            out[key] = ("fields", copy.deepcopy(vars(value)))
        elif value is None or isinstance(value, (bool, int, float, str, list, dict, tuple, torch.Tensor)):
            out[key] = ("value", copy.deepcopy(value))
    return out


def _restore_context(context: dict, saved: dict) -> None:
    for key, (how, value) in saved.items():
        current = context.get(key)
        if how == "state_dict":
            current.load_state_dict(value)
        elif how == "fields":
            vars(current).update(value)
        elif isinstance(current, list):
            current[:] = value  # in place: a loss closure may hold the list itself
        elif isinstance(current, dict):
            current.clear()
            current.update(value)
        else:
            context[key] = value


def state_path_for(name: str, folder: str | Path | None = None) -> Path:
    """Where ``course train NAME`` keeps its resumable training state while it runs."""
    return (Path(folder) if folder is not None else checkpoint_dir()) / f"{name}.state.pt"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def run_recipe(name: str, *, folder: str | Path | None = None, fast: bool | None = None, progress: bool = True,
               save: bool = True, device: str | torch.device | None = "cpu", steps: int | None = None,
               minutes: float | None = None, data: str | None = None, precision: str = "fp32",
               shards: int | None = None, resume: bool = False, state_every: int | None = None) -> RecipeResult:
    """Train recipe ``name``, measure it and (``save``) write its checkpoint and manifest entry.

    In fast mode the recipe runs ``fast_steps`` steps and the checkpoint is marked ``"fast": true``
    (for tests; :func:`course.pretrained.load` refuses such checkpoints unless asked).

    ``device`` ("cpu", "cuda", "auto", ...) is where it trains; the trained model is measured on
    the CPU. ``steps`` and ``minutes`` override the recipe's length (a time limit stops early),
    ``data`` = "full" requires the whole dataset (MNIST's 60 000 digits; an error where they
    cannot be had) and "subset" the offline one; ``precision`` "bf16" trains under autocast.
    ``shards`` (default: the number of processes) splits every batch as :mod:`course.distributed`
    describes. While it trains, the training state is written to :func:`state_path_for` every
    ``state_every`` steps (default: every 5 % of the run, at least 50 steps) and removed once the
    checkpoint is written; ``resume`` continues from it. Every override is recorded in the manifest
    entry. Under ``torchrun`` only rank 0 measures and writes files."""
    recipe = get_recipe(name)
    fast = fast_mode() if fast is None else fast
    info = distributed.current()
    device = distributed.resolve_device(device, local_rank=info.local_rank)
    shards = info.world_size if shards is None else check_positive_int(shards, "shards")
    if info.active and shards != info.world_size:
        raise ValueError(f"under torchrun every process draws one shard: expected shards = {info.world_size}; "
                         f"got {shards}")
    if data not in (None, "full", "subset"):
        raise ValueError(f"expected data to be 'full', 'subset' or None (the default); got {data!r}")
    if minutes is not None:
        check_positive(minutes, "minutes")
    steps = check_positive_int(steps, "steps") if steps is not None else (recipe.fast_steps if fast else recipe.steps)
    torch.manual_seed(recipe.seed)
    train_data, held_out = load_data(recipe, "train", variant=data), load_data(recipe, "test", verbose=False,
                                                                               variant=data)
    on_device = torch.device(device) if device.type != "cpu" else contextlib.nullcontext()
    with on_device:  # what the kind builds (teachers, discriminators, generators) lives on the device
        gens = [torch.Generator(device=device).manual_seed(distributed.shard_seed(recipe.seed, s, shards))
                for s in range(shards)]
        kind, model = KINDS[recipe.kind], build_model(recipe)
        context = kind.prepare(recipe, model, folder, fast) if kind.prepare is not None else {}
        if shards > 1 and any(isinstance(v, torch.optim.Optimizer) for v in context.values()):
            raise ValueError(f"recipe {name!r} trains a second network (its discriminator) inside its loss, which "
                             "cannot be split into shards or processes; train it in one process (one GPU or the CPU)")
        tensors = (train_data.images.to(device), train_data.labels.to(device))
        if kind.dataset is not None:
            tensors = kind.dataset(recipe, *tensors, context)
        config = TrainConfig(steps=steps, batch_size=recipe.batch_size, lr=recipe.lr, ema_decay=recipe.ema_decay,
                             betas=tuple(recipe.option("adam_betas", (0.9, 0.999))),
                             time_limit=None if minutes is None else 60.0 * minutes)
        state_path = state_path_for(name, folder) if save else None
        every = state_every if state_every is not None else max(50, steps // 20)
        res = train(model, kind.loss(recipe, model, context), tensors, config,
                    generator=gens[0] if shards == 1 else gens, device=device, progress=progress and info.is_main,
                    precision=precision, state_path=state_path, state_every=every, resume=resume,
                    extra_state=(lambda: _context_state(context), lambda s: _restore_context(context, s)),
                    dist_info=info)
    trained = res.ema_model.cpu()
    for value in context.values():  # the kind's own networks follow the model to the CPU for measuring
        if isinstance(value, nn.Module):
            value.cpu()
    result = RecipeResult(trained, res.seconds, {})
    if info.is_main:
        if kind.finish is not None:
            kind.finish(recipe, trained, train_data, fast, context)
        classifier = None
        if kind.needs_classifier:
            try:
                classifier = load(f"{recipe.data}_classifier", folder=folder, allow_fast=fast)
            except Exception as exc:  # noqa: BLE001 - metrics are then reported without the classifier
                print(f"note: sample metrics without the evaluation classifier ({exc})")
        result.metrics = kind.metrics(recipe, trained, held_out, fast, classifier,
                                      {**context, "train_seconds": res.seconds})
    if save and info.is_main:
        folder = Path(folder) if folder is not None else checkpoint_dir()
        path = save_checkpoint(folder / f"{name}.pt", trained, {"recipe": name})
        entry = {
            "file": path.name, "sha256": sha256_of(path), "recipe": asdict(recipe), "fast": fast, "steps": res.steps,
            "train_seconds": round(res.seconds, 1), "metrics": result.metrics, "data": train_data.source,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        }
        training = {"device": _device_name(device), "processes": info.world_size, "shards": shards,
                    "precision": precision, "resumed": resume, "steps_asked": steps, "minutes": minutes}
        if training != {"device": "cpu", "processes": 1, "shards": 1, "precision": "fp32", "resumed": False,
                        "steps_asked": recipe.fast_steps if fast else recipe.steps, "minutes": None}:
            entry["training"] = training  # how it was made, where that differs from the recipe on one CPU
        _write_manifest(folder, name, entry)
        result.path = path
        if state_path is not None and state_path.exists():
            state_path.unlink()
    distributed.barrier()
    return result


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
        raise ValueError(f"unknown checkpoint {name!r}; known: {', '.join(RECIPES)} "
                         "(import course.recipes to register every chapter's recipes)")
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
