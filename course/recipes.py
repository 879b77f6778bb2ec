"""Named training recipes for the image track: ``course train NAME`` runs one.

A recipe is a frozen dataclass: what to build, how long to train it and on which data. Running
it trains on the MNIST training split (the offline subset when ``COURSE_OFFLINE=1``), measures
the model on the held-out split, and writes ``checkpoints/NAME.pt`` atomically with an entry in
``checkpoints/manifest.json`` (sha256, the recipe's fields, training wall time on this machine,
the measured metrics). :func:`course.pretrained.load` reads them back.

A recipe's ``kind`` names a :class:`RecipeKind` (how to build, train and measure that kind of
model). The module that owns a kind registers it with :func:`register_kind` and its recipes with
:func:`register_recipe`; this module only runs them. Recipes defined here:
- ``mnist_classifier``: the evaluation classifier (clean digits; features for MNIST-FD).
- ``mnist_noisy_classifier``: a time-conditioned classifier of x_t on the linear (rectified-flow)
  path, for classifier guidance.
- ``mnist_cfm_unet``: a class-conditional U-Net trained with the rectified-flow (CFM) loss and
  label dropout to the null class, for classifier-free guidance.

Chapter 07's students (``course.distillation_recipes``) are registered when this module is imported.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .classifiers import ConvClassifier
from .datasets import ImageData, load_mnist
from .flow_matching import cfm_loss
from .guidance import classifier_free_guidance
from .ode import sample_flow_euler
from .paths import LinearPath
from .training import TrainConfig, save_checkpoint, train
from .unet import UNet
from .utils import check_positive_int, fast_mode

__all__ = ["Recipe", "RecipeKind", "RECIPES", "KINDS", "register_kind", "register_recipe", "get_recipe",
           "build_model", "recipe_loss", "run_recipe", "sample_classes", "sample_metrics", "random_shift",
           "checkpoint_dir", "sha256_of"]


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
    description: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown recipe kind {self.kind!r}; expected one of {', '.join(KINDS)}")
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
    ``metrics(recipe, model, held_out, fast, classifier, context)`` measures the trained model (the
    evaluation classifier is loaded when ``needs_classifier``)."""

    build: Callable[[Recipe], nn.Module]
    loss: Callable[[Recipe, nn.Module, dict], Callable]
    metrics: Callable[..., dict]
    prepare: Callable[..., dict] | None = None
    needs_classifier: bool = False


KINDS: dict[str, RecipeKind] = {}
RECIPES: dict[str, Recipe] = {}


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


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by a random integer offset in [-max_shift, max_shift]^2, filling with
    the background value -1 (a cheap augmentation that lifts held-out accuracy)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    off = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = (off[0][:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (off[1][:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


PATH = LinearPath()


@torch.no_grad()
def sample_classes(model: nn.Module, labels: Tensor, *, w: float = 1.0, nfe: int = 20,
                   generator: torch.Generator | None = None, batch: int = 500) -> Tensor:
    """Class-conditional samples of a ``cfm_unet`` model: Euler on the guided velocity, ``nfe``
    uniform steps from t = 1 to 0 (``nfe`` network calls of a 2B batch when w > 0)."""
    model.eval()
    field = classifier_free_guidance(model, w, null_label=model.num_classes)
    ts = torch.linspace(1.0, 0.0, check_positive_int(nfe, "nfe") + 1)
    shape = (1, 28, 28) if model.in_channels == 1 else (3, 32, 32)
    out = []
    for y in labels.split(batch):
        x1 = torch.randn((y.shape[0], *shape), generator=generator)
        out.append(sample_flow_euler(field, x1, ts, y=y))
    return torch.cat(out)


def eval_labels(fast: bool) -> Tensor:
    """The labels of a generator's reported metrics: 100 per class (5 in fast mode)."""
    return torch.arange(10).repeat_interleave(5 if fast else 100)


def sample_metrics(classifier: nn.Module | None, samples: Tensor, labels: Tensor, held_out: ImageData,
                   seconds: float, nfe: int, *, generator: torch.Generator | None = None) -> dict:
    """NFE, samples per second and (with the evaluation classifier) class accuracy, MNIST-FD beside
    its floor and diversity of class-conditional ``samples``: what every generator recipe reports."""
    from .image_metrics import evaluate_class_conditional

    out = {"nfe": nfe, "samples_per_second": len(labels) / seconds}
    if classifier is not None:
        per_class = int((labels == 0).sum())
        out.update(evaluate_class_conditional(classifier, samples, labels, held_out, per_class_fd=min(per_class, 50),
                                              generator=generator).as_dict())
    return out


# ---- the image track's own kinds --------------------------------------------------------------------
def _build_classifier(recipe: Recipe) -> nn.Module:
    return ConvClassifier(1, 10, width=recipe.width, time_conditional=recipe.kind == "noisy_classifier")


def _build_cfm_unet(recipe: Recipe) -> nn.Module:
    return UNet(1, channels=recipe.channels, num_classes=10, patch=recipe.patch)


def _classifier_loss(recipe, model, context):
    def loss(model, batch, g):
        x, y = batch
        return F.cross_entropy(model(random_shift(x, recipe.max_shift, g)), y)
    return loss


def _noisy_classifier_loss(recipe, model, context):
    def loss(model, batch, g):
        x, y = batch
        x = random_shift(x, recipe.max_shift, g)
        t = torch.rand(x.shape[0], generator=g)
        x_t = PATH.sample(x, t, eps=torch.randn(x.shape, generator=g)).x_t
        return F.cross_entropy(model(x_t, t), y)
    return loss


def _cfm_unet_loss(recipe, model, context, num_classes: int = 10):
    def loss(model, batch, g):
        x, y = batch
        drop = torch.rand(y.shape[0], generator=g) < recipe.label_dropout
        return cfm_loss(model, x, PATH, generator=g, y=torch.where(drop, num_classes, y))
    return loss


def _classifier_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    from .image_metrics import class_accuracy

    return {"held_out_accuracy": class_accuracy(model, held_out.images, held_out.labels)}


def _noisy_classifier_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    gen = torch.Generator().manual_seed(1)
    model.eval()
    out = {}
    with torch.no_grad():
        for t in (0.0, 0.25, 0.5, 0.75, 0.9):
            tt = torch.full((len(held_out),), t)
            x_t = PATH.sample(held_out.images, tt, eps=torch.randn(held_out.images.shape, generator=gen)).x_t
            pred = torch.cat([model(a, b).argmax(1) for a, b in zip(x_t.split(500), tt.split(500), strict=True)])
            out[f"held_out_accuracy_t{t:g}"] = float((pred == held_out.labels).double().mean())
    return out


def _cfm_unet_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    gen = torch.Generator().manual_seed(1)
    labels = eval_labels(fast)
    start = time.perf_counter()
    samples = sample_classes(model, labels, w=recipe.eval_w, nfe=recipe.eval_nfe, generator=gen)
    seconds = time.perf_counter() - start
    # with w > 0 each Euler step evaluates the conditional and the unconditional half: 2 NFE
    out = {"w": recipe.eval_w, "euler_steps": recipe.eval_nfe}
    out.update(sample_metrics(classifier, samples, labels, held_out, seconds,
                              recipe.eval_nfe * (2 if recipe.eval_w else 1), generator=gen))
    return out


register_kind("classifier", RecipeKind(_build_classifier, _classifier_loss, _classifier_metrics))
register_kind("noisy_classifier", RecipeKind(_build_classifier, _noisy_classifier_loss, _noisy_classifier_metrics))
register_kind("cfm_unet", RecipeKind(_build_cfm_unet, _cfm_unet_loss, _cfm_unet_metrics, needs_classifier=True))
for _recipe in (
    Recipe("mnist_classifier", "classifier", steps=1500, batch_size=128, lr=2e-3, width=16,
           description="evaluation classifier for MNIST (class accuracy, MNIST-FD features)"),
    Recipe("mnist_noisy_classifier", "noisy_classifier", steps=2000, batch_size=128, lr=2e-3,
           description="time-conditioned classifier of x_t on the linear path, for classifier guidance"),
    Recipe("mnist_cfm_unet", "cfm_unet", steps=3000, batch_size=128, lr=2e-3, ema_decay=0.999,
           description="class-conditional U-Net, rectified-flow loss, 10% label dropout (CFG)"),
):
    register_recipe(_recipe)


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


def run_recipe(name: str, *, folder: str | Path | None = None, fast: bool | None = None, progress: bool = True,
               save: bool = True) -> RecipeResult:
    """Train recipe ``name``, measure it and (``save``) write its checkpoint and manifest entry.

    In fast mode the recipe runs ``fast_steps`` steps and the checkpoint is marked ``"fast": true``
    (for tests; :func:`course.pretrained.load` refuses such checkpoints unless asked)."""
    recipe = get_recipe(name)
    fast = fast_mode() if fast is None else fast
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    train_data, held_out = load_mnist("train"), load_mnist("test", verbose=False)
    kind, model = KINDS[recipe.kind], build_model(recipe)
    context = kind.prepare(recipe, model, folder, fast) if kind.prepare is not None else {}
    steps = recipe.fast_steps if fast else recipe.steps
    config = TrainConfig(steps=steps, batch_size=recipe.batch_size, lr=recipe.lr, ema_decay=recipe.ema_decay)
    res = train(model, kind.loss(recipe, model, context), (train_data.images, train_data.labels), config,
                generator=gen, progress=progress)
    trained = res.ema_model
    classifier = None
    if kind.needs_classifier:
        from .pretrained import load

        try:
            classifier = load("mnist_classifier", folder=folder, allow_fast=fast)
        except Exception as exc:  # noqa: BLE001 - metrics are then reported without the classifier
            print(f"note: sample metrics without the evaluation classifier ({exc})")
    metrics = kind.metrics(recipe, trained, held_out, fast, classifier, {**context, "train_seconds": res.seconds})
    result = RecipeResult(trained, res.seconds, metrics)
    if save:
        folder = Path(folder) if folder is not None else checkpoint_dir()
        path = save_checkpoint(folder / f"{name}.pt", trained, {"recipe": name})
        _write_manifest(folder, name, {
            "file": path.name, "sha256": sha256_of(path), "recipe": asdict(recipe), "fast": fast, "steps": res.steps,
            "train_seconds": round(res.seconds, 1), "metrics": metrics, "data": train_data.source,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        })
        result.path = path
    return result


# the modules that own the later chapters' kinds register them (and their recipes) on import
from . import distillation_recipes, latent_recipes  # noqa: E402, F401
