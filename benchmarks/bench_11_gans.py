"""Chapter 11 benchmark: the plain GAN against Diffusion-GAN over seeds, the 2AFC agreement of
perceptual distances, and the one-step table.

Usage (COURSE_OFFLINE=1 for the offline MNIST digits):
    python benchmarks/bench_11_gans.py --diffusion-gan   # mnist_gan and mnist_diffusion_gan, seeds 1-2 trained (~25 min)
    python benchmarks/bench_11_gans.py --perceptual      # 2AFC agreement of 14 distances (~6 min)
    python benchmarks/bench_11_gans.py --one-step        # every shipped one-step model, one evaluation (~3 min)
    python benchmarks/bench_11_gans.py --d2g-seeds       # mnist_d2g against its no-GAN ablation, seeds 1-2 trained (~16 min)

--diffusion-gan: both recipes with seeds 0, 1, 2 for the same steps, seed 0 the shipped
checkpoint's run (its manifest entry) and seeds 1 and 2 trained from scratch here (the
augmentation costs no network call, so equal steps are equal CPU minutes, printed): MNIST-FD of
500 samples against 500 balanced held-out digits beside the floor, the share of samples the
evaluation classifier gives each class (the smallest, and how many classes have >= 5 %), diversity,
and the raw generator's FD during training (10 snapshots).

--perceptual: triplets (a held-out digit, two random distortions of it) judged by the chamfer
distance between the ink (course.perceptual); 2 000 triplets of the first 500 held-out digits
calibrate, three sets of 1 000 triplets of the other 500 (seeds 2, 3, 4) are scored, each set and
their mean. Distances: pixel L2, 1 - SSIM, LPIPS on the four convolutions of a randomly
initialised classifier, of the noisy classifier (t = 0) and of the evaluation classifier, on the
image alone and at two scales (the image and its 2 x 2 block averages, course.perceptual.multiscale),
each raw (all weights 1) and calibrated (3 000 Adam steps).

--one-step (three sampling seeds; MNIST-FD as mean +- sd): the teacher mnist_cfm_unet at 1, 2, 4
and 20 Euler steps (w = 1), the chapter-07
consistency student, ADD (1, 2, 4 steps) and its distillation-only ablation, LADD, Diffusion2GAN
and its no-GAN ablation, and the two unconditional GANs, all on one evaluation: 100 samples per
class (the GANs: 1 000 unconditional samples), MNIST-FD on 50 per class against the same 500
held-out digits, class accuracy, diversity, images per second, training CPU-minutes (manifest; for
Diffusion2GAN with the time the pairs took).

--d2g-seeds: mnist_d2g and its ablation mnist_d2g_no_gan with training seeds 0, 1, 2 (seed 0: the
shipped checkpoints; the students start from the teacher's weights, and a seed fixes the
discriminator's initialisation, the batches, the teacher's pairs and the perceptual calibration, so
the two recipes of one seed regress onto the same pairs), each sampled at 1 NFE with the three
sampling seeds of --one-step on the same evaluation; the paired differences per training seed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from course.classifiers import ConvClassifier
from course.gan import sample_generator
from course.gan_recipes import noisy_feature_maps, sample_one_step
from course.image_metrics import evaluate_unconditional
from course.image_recipes import eval_labels, sample_classes, sample_metrics
from course.perceptual import (
    PerceptualDistance,
    calibrate,
    make_triplets,
    multiscale,
    pixel_l2,
    ssim_distance,
    two_afc_agreement,
)
from course.pretrained import load, manifest
from course.recipe_registry import RECIPES, get_recipe, load_data, run_recipe

SEEDS = (0, 1, 2)


def _held_out():
    return load_data(get_recipe("mnist_cfm_unet"), "test", verbose=False)


def diffusion_gan_table() -> None:
    print("| recipe | seed | train s | MNIST-FD | floor | smallest class share | classes >= 5 % | diversity | "
          "final t_max | raw-generator FD during training |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    summary, shipped = {}, manifest()
    for name in ("mnist_gan", "mnist_diffusion_gan"):
        for seed in SEEDS:
            recipe = get_recipe(name)
            entry = shipped.get(name, {})
            if seed == recipe.seed and entry and not entry["fast"] and entry["steps"] == recipe.steps:
                m, seconds, label = entry["metrics"], entry["train_seconds"], f"{seed} (shipped run)"
            else:
                variant = f"{name}_seed{seed}"
                RECIPES.setdefault(variant, replace(recipe, name=variant, seed=seed))
                result = run_recipe(variant, save=False, progress=False)
                m, seconds, label = result.metrics, result.seconds, str(seed)
            summary.setdefault(name, []).append(m["mnist_fd"])
            curve = " ".join(f"{fd:.0f}" for _, fd, _ in m["fd_curve_raw_generator"])
            print(f"| {name} | {label} | {seconds:.0f} | {m['mnist_fd']:.2f} | {m['mnist_fd_floor']:.2f} | "
                  f"{m['min_class_share']:.1%} | {m['classes_at_least_5_percent']} | {m['diversity']:.2f} | "
                  f"{m.get('final_t_max', 0.0):.3f} | {curve} |", flush=True)
    for name, fds in summary.items():
        print(f"{name}: MNIST-FD mean {statistics.mean(fds):.2f}, spread (sd) {statistics.stdev(fds):.2f} over "
              f"seeds {SEEDS}")


def perceptual_table() -> None:
    held_out = _held_out()
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(held_out), generator=gen)
    fit_digits, test_digits = held_out.images[order[:500]], held_out.images[order[500:]]
    start = time.perf_counter()
    fit = make_triplets(fit_digits, 2000, generator=torch.Generator().manual_seed(1))
    tests = [make_triplets(test_digits, 1000, generator=torch.Generator().manual_seed(s)) for s in (2, 3, 4)]
    print(f"2AFC triplets: 2 000 to calibrate, three sets of 1 000 held out (other digits), judged by the chamfer "
          f"distance, margin 25 % ({time.perf_counter() - start:.0f} s); share where the judge prefers x1: "
          + " / ".join(f"{float(t.judge.mean()):.1%}" for t in tests))
    torch.manual_seed(0)
    random_net = ConvClassifier(1, 10, width=16).eval()
    noisy, evaluation = load("mnist_noisy_classifier"), load("mnist_classifier")
    nets = {"random network": lambda x: random_net.feature_maps(x, every_conv=True),
            "noisy classifier (t = 0)": noisy_feature_maps(noisy, every_conv=True),
            "evaluation classifier": lambda x: evaluation.feature_maps(x, every_conv=True)}
    print("| distance | scales | calibrated | 2AFC agreement, held-out sets 1 / 2 / 3 | mean | minus pixel L2 |")
    print("|---|---|---|---|---|---|")
    l2 = statistics.mean(two_afc_agreement(pixel_l2, t) for t in tests)

    def row(name, scales, calibrated, distance):
        scores = [two_afc_agreement(distance, t) for t in tests]
        mean = statistics.mean(scores)
        print(f"| {name} | {scales} | {calibrated} | {' / '.join(f'{s:.1%}' for s in scores)} | {mean:.1%} | "
              f"{100 * (mean - l2):+.1f} points |", flush=True)

    row("pixel L2", "-", "-", pixel_l2)
    row("1 - SSIM", "-", "-", ssim_distance)
    for name, feats in nets.items():
        for scales, read in (("1", feats), ("1, 1/2", multiscale(feats, (1, 2)))):
            with torch.no_grad():
                channels = [m.shape[1] for m in read(fit.ref[:1])]
            dist = PerceptualDistance(read, channels)
            row(f"LPIPS, {name}", scales, "raw", dist)
            calibrate(dist, fit, steps=3000)
            row(f"LPIPS, {name}", scales, "yes", dist)


ONE_STEP = [("teacher mnist_cfm_unet", "mnist_cfm_unet", n) for n in (1, 2, 4, 20)] + [
    ("consistency (ch. 07)", "mnist_cd_student", 1), ("consistency (ch. 07)", "mnist_cd_student", 2),
    ("ADD", "mnist_add", 1), ("ADD", "mnist_add", 2), ("ADD", "mnist_add", 4),
    ("ADD, distillation only", "mnist_add_distill_only", 1), ("LADD", "mnist_ladd", 1), ("LADD", "mnist_ladd", 4),
    ("Diffusion2GAN", "mnist_d2g", 1), ("Diffusion2GAN, no GAN loss", "mnist_d2g_no_gan", 1),
    ("GAN (unconditional)", "mnist_gan", 1), ("Diffusion-GAN (unconditional)", "mnist_diffusion_gan", 1)]


SAMPLING_SEEDS = (1, 2, 3)


def _draw(name: str, model, nfe: int, labels, gen) -> tuple[torch.Tensor, int]:
    """Samples of shipped model ``name`` at ``nfe`` steps and the network calls per sample."""
    from course.consistency import consistency_grid, sample_consistency
    from course.distillation_recipes import CD_SECOND_INDEX, T_MIN
    from course.image_recipes import PATH

    if get_recipe(name).kind == "gan":
        return sample_generator(model, 1000, rng=gen), 1
    if name == "mnist_cfm_unet":
        return sample_classes(model, labels, w=1.0, nfe=nfe, generator=gen), 2 * nfe
    if name == "mnist_cd_student":
        grid = consistency_grid(18, t_min=T_MIN)
        ts = torch.tensor([1.0] if nfe == 1 else [1.0, float(grid[CD_SECOND_INDEX])])
        x1 = torch.randn((len(labels), 1, 28, 28), generator=gen)
        return torch.cat([sample_consistency(model, a, ts, path=PATH, t_min=T_MIN, generator=gen, y=b)
                          for a, b in zip(x1.split(500), labels.split(500), strict=True)]), nfe
    return sample_one_step(model, labels, steps=nfe, generator=gen), nfe


@torch.no_grad()
def one_step_table() -> None:
    held_out, classifier, entries = _held_out(), load("mnist_classifier"), manifest()
    labels = eval_labels(False)
    print(f"MNIST-FD: mean +- sd over sampling seeds {SAMPLING_SEEDS}; the other columns: seed {SAMPLING_SEEDS[0]}")
    print("| method | recipe | NFE | class accuracy | MNIST-FD | floor | diversity | images / s | train CPU-min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for title, name, nfe in ONE_STEP:
        if name not in entries:
            print(f"| {title} | {name} | {nfe} | (not shipped) | | | | | |")
            continue
        model, fds, first = load(name), [], None
        for seed in SAMPLING_SEEDS:
            start = time.perf_counter()
            samples, calls = _draw(name, model, nfe, labels, torch.Generator().manual_seed(seed))
            seconds = time.perf_counter() - start
            evaluation = torch.Generator().manual_seed(1)  # the same held-out reference for every row
            if get_recipe(name).kind == "gan":
                q = evaluate_unconditional(classifier, samples, held_out, n_fd=500, generator=evaluation)
                row = (f"- ({q['classes_at_least_5_percent']} classes >= 5 %)", q["mnist_fd"], q["mnist_fd_floor"],
                       q["diversity"], len(samples) / seconds)
            else:
                m = sample_metrics(classifier, samples, labels, held_out, seconds, calls, generator=evaluation)
                row = (f"{m['class_accuracy']:.1%}", m["mnist_fd"], m["mnist_fd_floor"], m["diversity"],
                       m["samples_per_second"])
            fds.append(row[1])
            first = first or row
        minutes = (entries[name]["train_seconds"] + entries[name]["metrics"].get("pair_seconds", 0.0)) / 60
        print(f"| {title} | {name} | {calls} | {first[0]} | {statistics.mean(fds):.2f} +- {statistics.stdev(fds):.2f} | "
              f"{first[2]:.2f} | {first[3]:.2f} | {first[4]:.0f} | {minutes:.1f} |", flush=True)


def d2g_seeds_table() -> None:
    held_out, classifier = _held_out(), load("mnist_classifier")
    labels = eval_labels(False)
    print(f"MNIST-FD at 1 NFE, mean +- sd over sampling seeds {SAMPLING_SEEDS}, per training seed")
    print("| training seed | mnist_d2g (GAN weight "
          f"{get_recipe('mnist_d2g').option('gan_weight')}) | mnist_d2g_no_gan | difference |")
    print("|---|---|---|---|")
    diffs = []
    for seed in SEEDS:
        fds = {}
        for name in ("mnist_d2g", "mnist_d2g_no_gan"):
            recipe = get_recipe(name)
            if seed == recipe.seed:
                model = load(name)
            else:
                variant = f"{name}_seed{seed}"
                RECIPES.setdefault(variant, replace(recipe, name=variant, seed=seed))
                model = run_recipe(variant, save=False, progress=False).model
            fds[name] = []
            with torch.no_grad():
                for s in SAMPLING_SEEDS:
                    samples, calls = _draw(name, model, 1, labels, torch.Generator().manual_seed(s))
                    m = sample_metrics(classifier, samples, labels, held_out, 1.0, calls,
                                       generator=torch.Generator().manual_seed(1))  # the FD only: no timing
                    fds[name].append(m["mnist_fd"])
        a, b = fds["mnist_d2g"], fds["mnist_d2g_no_gan"]
        diffs.append(statistics.mean(a) - statistics.mean(b))
        shipped = " (shipped)" if seed == get_recipe("mnist_d2g").seed else ""
        print(f"| {seed}{shipped} | {statistics.mean(a):.2f} +- {statistics.stdev(a):.2f} | "
              f"{statistics.mean(b):.2f} +- {statistics.stdev(b):.2f} | {diffs[-1]:+.2f} (per sampling seed "
              + " / ".join(f"{x - y:+.2f}" for x, y in zip(a, b, strict=True)) + ") |", flush=True)
    print(f"GAN term minus ablation: mean {statistics.mean(diffs):+.2f}, sd {statistics.stdev(diffs):.2f} over "
          f"training seeds {SEEDS}; lower on {sum(d < 0 for d in diffs)} of {len(diffs)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = ("diffusion-gan", "perceptual", "one-step", "d2g-seeds")
    for mode in modes:
        parser.add_argument(f"--{mode}", action="store_true")
    args = parser.parse_args()
    chosen = [m for m in modes if getattr(args, m.replace("-", "_"))]
    if not chosen:
        parser.error("choose at least one of " + ", ".join(f"--{m}" for m in modes))
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads")
    tables = {"diffusion-gan": diffusion_gan_table, "perceptual": perceptual_table, "one-step": one_step_table,
              "d2g-seeds": d2g_seeds_table}
    for mode in chosen:
        tables[mode]()


if __name__ == "__main__":
    main()
