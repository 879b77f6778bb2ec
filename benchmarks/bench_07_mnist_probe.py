"""Chapter 07 probe on MNIST: what a short consistency tuning of the shipped chapter-06 teacher reaches
at 1 and 2 NFE, beside the teacher itself at 1, 2, 4, 8 and 20 Euler steps.

Usage:  python benchmarks/bench_07_mnist_probe.py [--minutes 3] [--per-class 50] [--solver euler]

Teacher: ``mnist_cfm_unet`` (rectified flow, linear path) with classifier-free guidance w = 1, so
each teacher step costs 2 U-Net evaluations (one batch of 2B); the student has the guidance baked
in and costs 1 evaluation per step. Student: ``ConsistencyFunction`` with the "ddim"
parameterisation f = x - (t - t_min) F(x, t, y), F initialised from the teacher's weights (so the
student starts as the teacher's one-step Euler jump), trained by consistency distillation on the
18-time rho = 7 grid with one teacher ODE step (``--solver``), EMA target mu = 0.95, squared L2,
Adam lr 1e-4, batch 128, for ``--minutes`` of wall time. Quality: class accuracy under the
evaluation classifier, MNIST-FD of 50 per class beside its floor, diversity.

This is a measurement for planning the chapter's recipes, not a shipped recipe.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from course.consistency import (
    ConsistencyFunction,
    EMATarget,
    consistency_distillation_loss,
    consistency_grid,
    sample_consistency,
)
from course.datasets import load_mnist
from course.guidance import classifier_free_guidance
from course.image_metrics import evaluate_class_conditional
from course.pretrained import load
from course.recipes import PATH, sample_classes
from course.training import TrainConfig, train

T_MIN = 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--solver", default="euler", choices=["euler", "heun"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    train_data, held = load_mnist("train"), load_mnist("test", verbose=False)
    teacher, evaluator = load("mnist_cfm_unet"), load("mnist_classifier")
    teacher.requires_grad_(False)
    labels = torch.arange(10).repeat_interleave(args.per_class)

    def report(name, nfe, samples, seconds):
        q = evaluate_class_conditional(evaluator, samples, labels, held, per_class_fd=min(args.per_class, 50),
                                       generator=torch.Generator().manual_seed(1))
        print(f"| {name:<34} | {nfe:>3} | {100 * q.accuracy:5.1f} % | {q.fd:6.2f} | {q.fd_floor:5.2f} | "
              f"{q.diversity:4.2f} | {seconds:6.1f} |", flush=True)

    print("| model                              | NFE | accuracy | MNIST-FD | floor | diversity | seconds |")
    print("|---|---|---|---|---|---|---|")
    for steps in (1, 2, 4, 8, 20):
        start = time.perf_counter()
        x = sample_classes(teacher, labels, w=1.0, nfe=steps, generator=torch.Generator().manual_seed(2))
        report(f"teacher, Euler {steps} steps, w = 1", 2 * steps, x, time.perf_counter() - start)

    guided = classifier_free_guidance(teacher, 1.0, null_label=teacher.num_classes)
    student = ConsistencyFunction(copy.deepcopy(teacher).requires_grad_(True), PATH, t_min=T_MIN,
                                  parameterisation="ddim", prediction="velocity")
    target = EMATarget(student, mu=0.95)
    grid = consistency_grid(18, t_min=T_MIN)

    def loss(model, batch, g):
        x, y = batch
        target.update(model)
        return consistency_distillation_loss(model, target, guided, x, grid, path=PATH, solver=args.solver,
                                             generator=g, y=y)

    res = train(student, loss, (train_data.images, train_data.labels),
                TrainConfig(steps=100_000, batch_size=128, lr=1e-4, ema_decay=0.999, cosine_decay=False,
                            time_limit=60 * args.minutes), generator=torch.Generator().manual_seed(0), progress=True)
    print(f"\nconsistency tuning: {res.steps} steps in {res.seconds:.0f} s\n")
    x1 = torch.randn((len(labels), 1, 28, 28), generator=torch.Generator().manual_seed(2))
    for name, model in (("EMA", res.ema_model), ("online", student)):
        model.eval()
        with torch.no_grad():
            for ts in ([1.0], [1.0, float(grid[13])], [1.0, float(grid[15])]):
                start = time.perf_counter()
                x = torch.cat([sample_consistency(model, a, torch.tensor(ts), path=PATH, t_min=T_MIN,
                                                  generator=torch.Generator().manual_seed(3), y=b)
                               for a, b in zip(x1.split(250), labels.split(250), strict=True)])
                report(f"CD-tuned ({name}) ts={[round(v, 3) for v in ts]}", len(ts), x,
                       time.perf_counter() - start)


if __name__ == "__main__":
    main()
