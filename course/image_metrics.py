"""Sample quality for images, measured with the course's own MNIST evaluation classifier.

- **Class accuracy**: the share of class-conditional samples that the evaluation classifier
  assigns to the class they were asked for.
- **MNIST-FD**: the Fréchet distance between Gaussians fitted to the classifier's 128-d
  features of two image sets, |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)). It is *not*
  the FID of the literature: that uses Inception-v3 features of ImageNet, 50 000 samples and
  299x299 inputs, which would need a download and an hour of CPU. This one is computed in a
  space trained on MNIST digits, from a few hundred samples, so its values are only comparable
  to each other and to its **noise floor**: the same distance between two disjoint held-out
  sets of real digits of the same size (FD is biased upwards at small n, the floor shows by how
  much).
- **Diversity**: per class, the mean pairwise feature distance of the samples over that of real
  held-out digits of the class (1: as varied as real digits; near 0: one digit repeated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .utils import check_positive_int

__all__ = ["laplacian_sharpness", "centre_of_mass", "gaussian_stats", "frechet_distance", "feature_fd", "classifier_features", "class_accuracy",
           "class_diversity", "ImageQuality", "evaluate_class_conditional"]


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased) of ``(N, D)`` features, in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features of shape (N >= 2, D); got {tuple(features.shape)}")
    f = features.detach().double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    tr((S_a S_b)^(1/2)) is computed as tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), a symmetric PSD
    square root, in float64.
    """
    mu_a, mu_b, cov_a, cov_b = (v.double() for v in (mu_a, mu_b, cov_a, cov_b))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mu_a.numel(), mu_a.numel()):
        raise ValueError(f"expected means (D,) and covariances (D, D) of one D; got {tuple(mu_a.shape)}, "
                         f"{tuple(cov_a.shape)}, {tuple(mu_b.shape)}, {tuple(cov_b.shape)}")
    root_a = _sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


def feature_fd(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two ``(N, D)`` feature sets."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


@torch.no_grad()
def classifier_features(classifier: nn.Module, images: Tensor, *, batch: int = 500) -> Tensor:
    """The evaluation classifier's ``(N, D)`` features of ``images``, in eval mode, by batches."""
    classifier.eval()
    return torch.cat([classifier.features(x) for x in images.split(batch)])


@torch.no_grad()
def class_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, *, batch: int = 500) -> float:
    """Share of ``images`` the classifier assigns to ``labels``."""
    if labels.shape != (images.shape[0],):
        raise ValueError(f"expected labels of shape ({images.shape[0]},); got {tuple(labels.shape)}")
    classifier.eval()
    pred = torch.cat([classifier(x).argmax(1) for x in images.split(batch)])
    return float((pred == labels).double().mean())


def _mean_pairwise(f: Tensor) -> float:
    n = f.shape[0]
    if n < 2:
        raise ValueError("expected at least 2 samples per class for diversity")
    return float(torch.cdist(f.double(), f.double()).sum() / (n * (n - 1)))


def class_diversity(features: Tensor, labels: Tensor, ref_features: Tensor, ref_labels: Tensor) -> Tensor:
    """Per class: mean pairwise feature distance of the samples / that of the reference."""
    classes = sorted(set(labels.tolist()))
    return torch.tensor([_mean_pairwise(features[labels == c]) / _mean_pairwise(ref_features[ref_labels == c])
                         for c in classes], dtype=torch.float64)


@dataclass(frozen=True)
class ImageQuality:
    accuracy: float  # class accuracy of all samples
    fd: float  # MNIST-FD of n_fd samples against held-out set B
    fd_floor: float  # MNIST-FD of held-out set A against held-out set B (same sizes)
    diversity: float  # mean over classes of the diversity ratio
    n_fd: int

    def __str__(self) -> str:
        return (f"class accuracy {100 * self.accuracy:.1f}%, MNIST-FD {self.fd:.2f} (floor {self.fd_floor:.2f}, "
                f"n = {self.n_fd}), diversity {self.diversity:.2f}")

    def as_dict(self) -> dict[str, float]:
        return {"class_accuracy": self.accuracy, "mnist_fd": self.fd, "mnist_fd_floor": self.fd_floor,
                "diversity": self.diversity, "fd_samples": self.n_fd}


def evaluate_class_conditional(classifier: nn.Module, samples: Tensor, labels: Tensor, held_out, *,
                               per_class_fd: int = 50, generator: torch.Generator | None = None) -> ImageQuality:
    """Accuracy on all samples; MNIST-FD and diversity on ``per_class_fd`` samples per class.

    ``held_out`` (an :class:`~course.datasets.ImageData`) is split into two disjoint balanced sets
    A and B of ``per_class_fd`` per class: FD(samples, B) is reported beside FD(A, B)."""
    per_class_fd = check_positive_int(per_class_fd, "per_class_fd")
    both = held_out.per_class(2 * per_class_fd, generator=generator)
    k = len(held_out.classes)
    idx = torch.arange(len(both)).reshape(k, 2 * per_class_fd)
    a, b = idx[:, :per_class_fd].flatten(), idx[:, per_class_fd:].flatten()
    pick = torch.cat([(labels == c).nonzero().squeeze(1)[:per_class_fd] for c in range(k)])
    if pick.numel() != k * per_class_fd:
        raise ValueError(f"expected at least {per_class_fd} samples of every class for MNIST-FD")
    f_ref = classifier_features(classifier, both.images)
    f_gen = classifier_features(classifier, samples[pick])
    return ImageQuality(
        accuracy=class_accuracy(classifier, samples, labels),
        fd=feature_fd(f_gen, f_ref[b]),
        fd_floor=feature_fd(f_ref[a], f_ref[b]),
        diversity=float(class_diversity(f_gen, labels[pick], f_ref[b], both.labels[b]).mean()),
        n_fd=int(pick.numel()),
    )


def _ink(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected grey images (N, 1, H, W) in [-1, 1]; got {tuple(getattr(images, 'shape', ()))}")
    return ((images.double() + 1) / 2).clamp(0, 1)[:, 0]


def laplacian_sharpness(images: Tensor) -> Tensor:
    """Per-image focus measure: the variance of the 4-neighbour Laplacian of the ink p = (x + 1) / 2
    (Pech-Pacheco et al. 2000). Blurring lowers it (held-out MNIST digits: 0.19 on average). Shape ``(N,)``."""
    p = _ink(images)
    lap = (p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] - 4 * p[:, 1:-1, 1:-1])
    return lap.flatten(1).var(dim=1)


def centre_of_mass(images: Tensor) -> Tensor:
    """Per-image centre of mass ``(N, 2)`` (row, column; pixel indices from 0) of the ink
    p = (x + 1) / 2. An image without ink has no centre: it raises."""
    p = _ink(images)
    mass = p.sum(dim=(1, 2))
    if bool((mass <= 0).any()):
        raise ValueError(f"{int((mass <= 0).sum())} image(s) have no ink: no centre of mass")
    rows = torch.arange(p.shape[1], dtype=p.dtype)
    cols = torch.arange(p.shape[2], dtype=p.dtype)
    return torch.stack([(p.sum(2) * rows).sum(1) / mass, (p.sum(1) * cols).sum(1) / mass], dim=1)


@torch.no_grad()
def evaluate_unconditional(classifier: nn.Module, samples: Tensor, held_out, *, n_fd: int = 500,
                           generator: torch.Generator | None = None) -> dict:
    """An unconditional generator's quality and coverage: MNIST-FD of the first ``n_fd`` samples
    against a balanced held-out set B of ``n_fd`` beside the floor FD(A, B) of a disjoint one; the
    share of all samples the classifier assigns to each class (mode collapse drops classes);
    the smallest share and the number of classes with at least 5 %; diversity, the mean pairwise
    feature distance of the samples over that of B."""
    k = len(held_out.classes)
    if n_fd % k or samples.shape[0] < n_fd:
        raise ValueError(f"expected n_fd divisible by {k} and at least n_fd = {n_fd} samples; got {samples.shape[0]}")
    both = held_out.per_class(2 * n_fd // k, generator=generator)
    idx = torch.arange(len(both)).reshape(k, 2 * n_fd // k)
    a, b = idx[:, :n_fd // k].flatten(), idx[:, n_fd // k:].flatten()
    f_ref, f_gen = classifier_features(classifier, both.images), classifier_features(classifier, samples)
    classifier.eval()
    pred = torch.cat([classifier(x).argmax(1) for x in samples.split(500)])
    shares = torch.bincount(pred, minlength=k).double() / len(pred)
    return {"mnist_fd": feature_fd(f_gen[:n_fd], f_ref[b]), "mnist_fd_floor": feature_fd(f_ref[a], f_ref[b]),
            "class_shares": [round(float(s), 4) for s in shares], "min_class_share": float(shares.min()),
            "classes_at_least_5_percent": int((shares >= 0.05).sum()),
            "diversity": _mean_pairwise(f_gen[:n_fd]) / _mean_pairwise(f_ref[b]), "fd_samples": n_fd}
