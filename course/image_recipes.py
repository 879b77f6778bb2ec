"""The image track's recipe kinds (chapter 06) and what every image generator's recipe shares.

- ``mnist_classifier``: the evaluation classifier (clean digits; features for MNIST-FD).
- ``cifar10_classifier``: the same for CIFAR-10 (needs the CIFAR-10 folder; not shipped).
- ``mnist_noisy_classifier``: a time-conditioned classifier of x_t on the linear (rectified-flow)
  path, for classifier guidance.
- ``mnist_cfm_unet``: a class-conditional U-Net trained with the rectified-flow (CFM) loss and
  label dropout to the null class, for classifier-free guidance.

Shared by the later chapters' generators: :func:`sample_classes` (CFG + Euler, decoding latent
models), :func:`eval_labels`, :func:`sample_metrics`, :func:`random_shift` and ``PATH``.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .classifiers import ConvClassifier
from .datasets import ImageData
from .flow_matching import cfm_loss
from .guidance import classifier_free_guidance
from .latent import LatentDiffusion
from .ode import sample_flow_euler
from .paths import LinearPath
from .recipe_registry import IMAGE_SHAPES, Recipe, RecipeKind, register_kind, register_recipe
from .unet import UNet
from .utils import check_positive_int

__all__ = ["PATH", "random_shift", "sample_classes", "eval_labels", "sample_metrics", "drop_labels", "cfm_unet_metrics"]


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
                   generator: torch.Generator | None = None, batch: int = 500,
                   shape: tuple[int, int, int] | None = None, **cond) -> Tensor:
    """Class-conditional samples of a ``cfm_unet`` model: Euler on the guided velocity, ``nfe``
    uniform steps from t = 1 to 0 (``nfe`` network calls of a 2B batch when w > 0). A
    :class:`~course.latent.LatentDiffusion` is sampled in its latent space and decoded. ``shape``
    overrides the sample shape (default: 28x28 MNIST or 32x32 CIFAR-10 by the model's channels).
    Further conditions ``cond`` (a control image per sample, SDXL's size and crop) are passed to the
    model; tensors of one row per label are split into batches with the labels."""
    model.eval()
    field = classifier_free_guidance(model, w, null_label=model.num_classes)
    ts = torch.linspace(1.0, 0.0, check_positive_int(nfe, "nfe") + 1)
    latent = isinstance(model, LatentDiffusion)
    if shape is None:
        shape = model.latent_shape if latent else (1, 28, 28) if model.in_channels == 1 else (3, 32, 32)
    out = []
    for start in range(0, len(labels), batch):
        y = labels[start:start + batch]
        part = {k: v[start:start + batch] if isinstance(v, Tensor) and v.ndim and v.shape[0] == len(labels) else v
                for k, v in cond.items()}
        x1 = torch.randn((y.shape[0], *shape), generator=generator)
        x0 = sample_flow_euler(field, x1, ts, y=y, **part)
        out.append(model.decode(x0) if latent else x0)
    return torch.cat(out)


def eval_labels(fast: bool) -> Tensor:
    """The labels of a generator's reported metrics: 100 per class (5 in fast mode)."""
    return torch.arange(10).repeat_interleave(5 if fast else 100)


def sample_metrics(classifier: nn.Module | None, samples: Tensor, labels: Tensor, held_out: ImageData,
                   seconds: float, nfe: int, *, generator: torch.Generator | None = None, data: str = "mnist") -> dict:
    """NFE, samples per second and (with the evaluation classifier) class accuracy, FD in the
    classifier's features beside its floor, and diversity of class-conditional ``samples``: what
    every generator recipe reports. The FD keys are named after ``data`` (``mnist_fd``, ``cifar10_fd``)."""
    from .image_metrics import evaluate_class_conditional

    out = {"nfe": nfe, "samples_per_second": len(labels) / seconds}
    if classifier is not None:
        per_class = int((labels == 0).sum())
        quality = evaluate_class_conditional(classifier, samples, labels, held_out, per_class_fd=min(per_class, 50),
                                             generator=generator).as_dict()
        out.update({key.replace("mnist_", f"{data}_"): value for key, value in quality.items()})
    return out


# ---- the image track's own kinds --------------------------------------------------------------------
def _build_classifier(recipe: Recipe) -> nn.Module:
    return ConvClassifier(IMAGE_SHAPES[recipe.data][0], 10, width=recipe.width,
                          time_conditional=recipe.kind == "noisy_classifier")


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


def drop_labels(y: Tensor, p: float, generator: torch.Generator | None, null: int = 10) -> Tensor:
    """Labels with a share ``p`` replaced by the null class ``null`` (label dropout, for CFG)."""
    return torch.where(torch.rand(y.shape[0], generator=generator) < p, null, y)


def _cfm_unet_loss(recipe, model, context):
    def loss(model, batch, g):
        x, y = batch
        return cfm_loss(model, x, PATH, generator=g, y=drop_labels(y, recipe.label_dropout, g))
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


def cfm_unet_metrics(recipe, model, held_out, fast, classifier, context) -> dict:
    """What every class-conditional generator sampled by :func:`sample_classes` reports."""
    gen = torch.Generator().manual_seed(1)
    labels = eval_labels(fast)
    start = time.perf_counter()
    samples = sample_classes(model, labels, w=recipe.eval_w, nfe=recipe.eval_nfe, generator=gen)
    seconds = time.perf_counter() - start
    # with w > 0 each Euler step evaluates the conditional and the unconditional half: 2 NFE
    out = {"w": recipe.eval_w, "euler_steps": recipe.eval_nfe}
    out.update(sample_metrics(classifier, samples, labels, held_out, seconds,
                              recipe.eval_nfe * (2 if recipe.eval_w else 1), generator=gen, data=recipe.data))
    return out


register_kind("classifier", RecipeKind(_build_classifier, _classifier_loss, _classifier_metrics))
register_kind("noisy_classifier", RecipeKind(_build_classifier, _noisy_classifier_loss, _noisy_classifier_metrics))
register_kind("cfm_unet", RecipeKind(_build_cfm_unet, _cfm_unet_loss, cfm_unet_metrics, needs_classifier=True))
for _recipe in (
    Recipe("mnist_classifier", "classifier", steps=1500, batch_size=128, lr=2e-3, width=16,
           description="evaluation classifier for MNIST (class accuracy, MNIST-FD features)"),
    Recipe("cifar10_classifier", "classifier", steps=3000, batch_size=128, lr=2e-3, width=32, data="cifar10",
           description="evaluation classifier for CIFAR-10 (class accuracy and FD features of the CIFAR recipes)"),
    Recipe("mnist_noisy_classifier", "noisy_classifier", steps=2000, batch_size=128, lr=2e-3,
           description="time-conditioned classifier of x_t on the linear path, for classifier guidance"),
    Recipe("mnist_cfm_unet", "cfm_unet", steps=3000, batch_size=128, lr=2e-3, ema_decay=0.999,
           description="class-conditional U-Net, rectified-flow loss, 10% label dropout (CFG)"),
):
    register_recipe(_recipe)
