"""Chapter 07 benchmark on MNIST with the shipped checkpoints: the chapter-06 teacher at 1-20 steps
against its distilled students at the same number of network evaluations.

Usage:  python benchmarks/bench_07_mnist.py [--per-class 50]

Teacher: ``mnist_cfm_unet`` with classifier-free guidance w = 1 (each step evaluates the conditional
and the unconditional half: 2 NFE), sampled by Euler on uniform steps and by DPM-Solver++(2M) on the
power-2.5 grid (started at t = 0.999: its data prediction divides by alpha, 0 at t = 1). Students
(guidance baked in, 1 NFE a step): ``mnist_cd_student`` (consistency tuning) at 1 and 2 steps and
the progressive-distillation ladder ``mnist_pd_16`` ... ``mnist_pd_1``, and the average-velocity
students ``mnist_meanflow_student`` and ``mnist_shortcut_student`` at 1 and 2 steps; the unguided
teacher's one Euler step is the 1-NFE baseline. Each row: class accuracy
under the evaluation classifier, MNIST-FD of 50 per class against held-out digits beside its
floor, diversity, seconds for the samples, and the training minutes from the manifest.
"""

from __future__ import annotations

import argparse
import time

import torch

from course.consistency import consistency_grid, sample_consistency
from course.conversions import as_prediction_fn
from course.datasets import load_mnist
from course.distillation_recipes import CD_GRID_SIZE, CD_SECOND_INDEX, T_MIN
from course.fast_samplers import sample_dpm_solver_pp_2m, sampling_grid
from course.guidance import classifier_free_guidance
from course.image_metrics import evaluate_class_conditional
from course.meanflow import sample_meanflow
from course.pretrained import load, manifest
from course.recipes import PATH, sample_classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(2)
    held, evaluator, info = load_mnist("test", verbose=False), load("mnist_classifier"), manifest()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    x1 = torch.randn((len(labels), 1, 28, 28), generator=torch.Generator().manual_seed(2))

    def report(name, nfe, sample, minutes=""):
        start = time.perf_counter()
        with torch.no_grad():
            x = sample()
        seconds = time.perf_counter() - start
        q = evaluate_class_conditional(evaluator, x, labels, held, per_class_fd=min(args.per_class, 50),
                                       generator=torch.Generator().manual_seed(1))
        print(f"| {name:<40} | {nfe:>3} | {100 * q.accuracy:5.1f} % | {q.fd:6.2f} | {q.fd_floor:5.2f} | "
              f"{q.diversity:4.2f} | {seconds:6.1f} | {minutes} |", flush=True)

    def train_minutes(name):
        m = info[name]["metrics"]
        return f"{info[name]['train_seconds'] / 60:.1f}" + (
            f" (ladder {m['ladder_train_seconds'] / 60:.1f})" if "ladder_train_seconds" in m else "")

    print(f"{len(labels)} samples per row, initial noise from seed 2\n")
    print("| model | NFE | class accuracy | MNIST-FD | FD floor | diversity | sampling s | training min |")
    print("|---|---|---|---|---|---|---|---|")
    teacher = load("mnist_cfm_unet")
    guided = classifier_free_guidance(teacher, 1.0, null_label=teacher.num_classes)
    score = as_prediction_fn(guided, PATH, "velocity", "score")
    report("teacher Euler, 1 step, no guidance", 1,
           lambda: sample_classes(teacher, labels, w=0.0, nfe=1, generator=torch.Generator().manual_seed(2)))
    for steps in (1, 2, 4, 8, 20):
        report(f"teacher Euler, {steps} step{'s' if steps > 1 else ''}, w = 1", 2 * steps,
               lambda steps=steps: sample_classes(teacher, labels, w=1.0, nfe=steps,
                                                  generator=torch.Generator().manual_seed(2)))
    for steps in (2, 4, 8, 20):
        grid = sampling_grid(steps, kind="power", power=2.5, t_max=0.999, t_min=1e-3)
        report(f"teacher DPM-Solver++(2M), {steps} steps", 2 * steps,
               lambda grid=grid: torch.cat([sample_dpm_solver_pp_2m(score, a, grid, path=PATH, y=b)
                                            for a, b in zip(x1.split(250), labels.split(250), strict=True)]))
    cd = load("mnist_cd_student")
    second = float(consistency_grid(CD_GRID_SIZE, t_min=T_MIN)[CD_SECOND_INDEX])
    for ts in ([1.0], [1.0, second]):
        report(f"consistency tuning, {len(ts)} step(s)", len(ts),
               lambda ts=ts: torch.cat([sample_consistency(cd, a, torch.tensor(ts), path=PATH, t_min=T_MIN,
                                                           generator=torch.Generator().manual_seed(3), y=b)
                                        for a, b in zip(x1.split(250), labels.split(250), strict=True)]),
               train_minutes("mnist_cd_student"))
    for n in (16, 8, 4, 2, 1):
        student = load(f"mnist_pd_{n}")
        report(f"progressive distillation, {n} step(s)", n,
               lambda student=student, n=n: sample_classes(student, labels, w=0.0, nfe=n,
                                                           generator=torch.Generator().manual_seed(2)),
               train_minutes(f"mnist_pd_{n}"))
    for name, label in (("mnist_meanflow_student", "MeanFlow"), ("mnist_shortcut_student", "shortcut model")):
        model = load(name)
        for ts in ([1.0, 0.0], [1.0, 0.5, 0.0]):
            report(f"{label}, {len(ts) - 1} step(s)", len(ts) - 1,
                   lambda model=model, ts=ts: torch.cat([sample_meanflow(model, a, torch.tensor(ts), y=b)
                                                         for a, b in zip(x1.split(250), labels.split(250),
                                                                         strict=True)]),
                   train_minutes(name))


if __name__ == "__main__":
    main()
