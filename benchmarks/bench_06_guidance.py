"""Guidance benchmark on MNIST with the shipped checkpoints: classifier-free guidance over w and
classifier guidance over s.

Usage:  python benchmarks/bench_06_guidance.py [--per-class 100]

CFG: the class-conditional ``mnist_cfm_unet`` at w in {0, 1, 2, 4}, 20 Euler steps (2 NFE per step
when w > 0: conditional and unconditional halves in one batch). Classifier guidance: the same
network asked for its unconditional (null-class) velocity, guided by the ``mnist_noisy_classifier``
gradient at s in {1, 3, 10} (20 Euler steps: 20 U-Net evaluations and 20 classifier forward and
backward passes per sample). Each row: class accuracy under the evaluation classifier, MNIST-FD
of 50 per class against held-out digits beside its floor, diversity, and time.
"""

from __future__ import annotations

import argparse
import time

import torch

from course.datasets import load_mnist
from course.guidance import classifier_guided_velocity
from course.image_metrics import evaluate_class_conditional
from course.ode import sample_flow_euler
from course.pretrained import load
from course.recipes import PATH, sample_classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(2)
    held = load_mnist("test")
    unet, noisy, evaluator = load("mnist_cfm_unet"), load("mnist_noisy_classifier"), load("mnist_classifier")
    labels = torch.arange(10).repeat_interleave(args.per_class)
    ts = torch.linspace(1.0, 0.0, 21)
    print(f"{len(labels)} samples per row, 20 Euler steps\n")
    print("| guidance               | NFE per sample          | class accuracy | MNIST-FD | FD floor | diversity | seconds |")
    print("|------------------------|-------------------------|----------------|----------|----------|-----------|---------|")

    def row(name, nfe, make):
        start = time.perf_counter()
        samples = make()
        sec = time.perf_counter() - start
        q = evaluate_class_conditional(evaluator, samples, labels, held, per_class_fd=min(50, args.per_class),
                                       generator=torch.Generator().manual_seed(3))
        print(f"| {name:<22} | {nfe:<23} | {100 * q.accuracy:13.1f}% | {q.fd:8.2f} | {q.fd_floor:8.2f} | "
              f"{q.diversity:9.2f} | {sec:7.1f} |", flush=True)

    for w in (0.0, 1.0, 2.0, 4.0):
        row(f"CFG w = {w:g}", "20" if w == 0 else "40 (2 per step)",
            lambda w=w: sample_classes(unet, labels, w=w, nfe=20, generator=torch.Generator().manual_seed(2)))

    def guided(scale):
        field = classifier_guided_velocity(unet, noisy, scale, PATH)
        gen = torch.Generator().manual_seed(2)
        out = []
        for y in labels.split(500):
            x1 = torch.randn((y.shape[0], 1, 28, 28), generator=gen)
            with torch.no_grad():
                out.append(sample_flow_euler(field, x1, ts, y=y))
        return torch.cat(out)

    row("unconditional (s = 0)", "20", lambda: guided(0.0))
    for s in (1.0, 3.0, 10.0):
        row(f"classifier s = {s:g}", "20 + 20 classifier", lambda s=s: guided(s))


if __name__ == "__main__":
    main()
