"""Image-track benchmark: network speed on this CPU, and the class-conditional MNIST generator's
time-to-quality curve.

Usage:
    python benchmarks/bench_06_image_track.py --speed          # ms per training step of each variant
    python benchmarks/bench_06_image_track.py --classifiers    # both classifier recipes: time, accuracy
    python benchmarks/bench_06_image_track.py [--steps 3000]   # generator curve (about 10 min)

--speed times forward + backward + Adam for batches of 128 on the U-Net and classifier variants
(GroupNorm or none, channels-last, 2x2 patches) and prints a table.

The generator run trains the ``mnist_cfm_unet`` recipe from scratch (rectified-flow loss, 10 %
label dropout, Adam with cosine decay, EMA) on the MNIST training split (the offline subset
when COURSE_OFFLINE=1) and, at four points of the run, samples 50 per class at w = 1 with 20 Euler
steps to report class accuracy and MNIST-FD against training minutes (evaluation time excluded). At the end
it samples 100 per class for w in {0, 0.5, 1, 2} and reports class accuracy, MNIST-FD (50 per class
against held-out digits) beside its noise floor, diversity, NFE and samples per second. The
evaluation classifier is the shipped ``mnist_classifier`` checkpoint.
"""

from __future__ import annotations

import argparse
import time

import torch

from course.classifiers import ConvClassifier
from course.datasets import load_mnist
from course.image_metrics import evaluate_class_conditional
from course.pretrained import load
from course.recipes import build_model, get_recipe, recipe_loss, sample_classes
from course.training import TrainConfig, train
from course.unet import UNet


def step_ms(model, call, n: int = 10, batch: int = 128) -> float:
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for i in range(n + 3):
        if i == 3:
            start = time.perf_counter()
        loss = call(model, batch).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 1000 * (time.perf_counter() - start) / n


def speed() -> None:
    x, t, y = torch.randn(128, 1, 28, 28), torch.rand(128), torch.randint(0, 10, (128,))
    rows = []
    for ch, groups, patch, cl in [((32, 64, 64), 8, 1, False), ((32, 64, 64), 0, 1, False),
                                  ((32, 64, 64), 8, 1, True), ((16, 32, 64), 8, 1, False),
                                  ((32, 64, 64), 8, 2, False), ((32, 64, 64), 0, 2, False),
                                  ((48, 96, 96), 8, 2, False)]:
        model = UNet(1, ch, num_classes=10, groups=groups, patch=patch)
        xx = x
        if cl:
            model, xx = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        ms = step_ms(model, lambda m, b, xx=xx: m(xx[:b], t[:b], y=y[:b]))
        rows.append((f"U-Net {ch}, GroupNorm {groups or 'none'}, patch {patch}{', channels-last' if cl else ''}",
                     sum(p.numel() for p in model.parameters()), ms))
    for width, tc in [(32, False), (16, False), (16, True)]:
        model = ConvClassifier(width=width, time_conditional=tc)
        ms = step_ms(model, lambda m, b, tc=tc: m(x[:b], t[:b]) if tc else m(x[:b]))
        rows.append((f"classifier width {width}{', time-conditional' if tc else ''}",
                     sum(p.numel() for p in model.parameters()), ms))
    chosen = lambda: UNet(1, (32, 64, 64), num_classes=10, patch=2)  # noqa: E731
    for batch in (64, 256):
        ms = step_ms(chosen(), lambda m, b: m(torch.cat([x, x])[:b], torch.cat([t, t])[:b], y=torch.cat([y, y])[:b]),
                     batch=batch)
        rows.append((f"U-Net (32, 64, 64), patch 2, batch {batch} (x {128 / batch:g} for 128)", 0, ms * 128 / batch))
    torch.set_num_threads(1)
    rows.append(("U-Net (32, 64, 64), patch 2, 1 thread", 0, step_ms(chosen(), lambda m, b: m(x[:b], t[:b], y=y[:b]))))
    torch.set_num_threads(2)
    try:
        compiled = torch.compile(chosen())
        start = time.perf_counter()
        step_ms(compiled, lambda m, b: m(x[:b], t[:b], y=y[:b]), n=1)
        first = time.perf_counter() - start
        rows.append((f"U-Net (32, 64, 64), patch 2, torch.compile (first steps: {first:.0f} s)", 0,
                     step_ms(compiled, lambda m, b: m(x[:b], t[:b], y=y[:b]))))
    except Exception as exc:  # noqa: BLE001 - no compiler toolchain: say so in the table
        rows.append((f"torch.compile failed: {type(exc).__name__}", 0, float("nan")))
    print("forward + backward + Adam at 28x28, 2 threads, batch 128 unless said (ms normalised to 128)\n")
    print(f"| {'network':<60} | parameters | ms / step |")
    print(f"|{'-' * 62}|------------|-----------|")
    for name, n, ms in rows:
        print(f"| {name:<60} | {f'{n:,d}' if n else '':>10} | {ms:9.1f} |", flush=True)


def classifiers() -> None:
    from course.recipes import run_recipe

    print("| recipe | steps | training time | held-out accuracy |")
    print("|--------|-------|---------------|-------------------|")
    for name in ("mnist_classifier", "mnist_noisy_classifier"):
        res = run_recipe(name, fast=False, progress=False, save=False)
        acc = ", ".join(f"{k.replace('held_out_accuracy_t', 't = ').replace('held_out_accuracy', 'clean')}: "
                        f"{100 * v:.1f}%" for k, v in res.metrics.items())
        print(f"| {name} | {get_recipe(name).steps} | {res.seconds:.1f} s | {acc} |", flush=True)


def generator(steps: int | None) -> None:
    recipe = get_recipe("mnist_cfm_unet")
    steps = steps or recipe.steps
    train_data, held_out = load_mnist("train"), load_mnist("test", verbose=False)
    classifier = load("mnist_classifier")
    gen = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe)
    eval_seconds = [0.0]
    curve = []

    def evaluate(ema, step):
        start = time.perf_counter()
        labels = torch.arange(10).repeat_interleave(50)
        samples = sample_classes(ema, labels, w=1.0, nfe=20, generator=torch.Generator().manual_seed(1))
        q = evaluate_class_conditional(classifier, samples, labels, held_out, per_class_fd=50,
                                       generator=torch.Generator().manual_seed(3))
        eval_seconds[0] += time.perf_counter() - start
        curve.append((step, time.perf_counter() - t0[0] - eval_seconds[0], q))
        return q.accuracy

    config = TrainConfig(steps=steps, batch_size=recipe.batch_size, lr=recipe.lr, ema_decay=recipe.ema_decay,
                         eval_every=steps // 4)
    t0 = [time.perf_counter()]
    res = train(model, recipe_loss(recipe), (train_data.images, train_data.labels), config, generator=gen, eval_fn=evaluate)
    train_minutes = (res.seconds - eval_seconds[0]) / 60
    print(f"{recipe.name}: U-Net {recipe.channels} patch {recipe.patch}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, {res.steps} steps of batch {recipe.batch_size}: {train_minutes:.1f} min of training "
          f"(evaluation excluded)\n")
    print("At w = 1, 20 Euler steps (40 NFE), 50 samples per class:\n")
    print("| step | training minutes | class accuracy | MNIST-FD | FD floor |")
    print("|------|------------------|----------------|----------|----------|")
    for step, seconds, q in curve:
        print(f"| {step:4d} | {seconds / 60:16.1f} | {100 * q.accuracy:13.1f}% | {q.fd:8.2f} | {q.fd_floor:8.2f} |")
    print()
    ema = res.ema_model.eval()
    print("| w   | NFE | class accuracy | MNIST-FD | FD floor | diversity | samples / s |")
    print("|-----|-----|----------------|----------|----------|-----------|-------------|")
    labels = torch.arange(10).repeat_interleave(100)
    for w in (0.0, 0.5, 1.0, 2.0):
        start = time.perf_counter()
        samples = sample_classes(ema, labels, w=w, nfe=20, generator=torch.Generator().manual_seed(2))
        rate = len(labels) / (time.perf_counter() - start)
        q = evaluate_class_conditional(classifier, samples, labels, held_out, per_class_fd=50,
                                       generator=torch.Generator().manual_seed(3))
        print(f"| {w:3g} | {20 * (2 if w else 1):3d} | {100 * q.accuracy:13.1f}% | {q.fd:8.2f} | {q.fd_floor:8.2f} | "
              f"{q.diversity:9.2f} | {rate:11.1f} |", flush=True)
    print("\nNFE counts network evaluations per sample: with w > 0 each Euler step evaluates the conditional and "
          "the unconditional prediction (one batch of 2B).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", action="store_true", help="time the network variants only")
    parser.add_argument("--classifiers", action="store_true", help="train and measure the two classifier recipes")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.speed:
        speed()
    elif args.classifiers:
        classifiers()
    else:
        generator(args.steps)


if __name__ == "__main__":
    main()
