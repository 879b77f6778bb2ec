"""Chapter 10 benchmark: the DiT scaling grid, SDXL's micro-conditioning and refiner, ControlNet's
strength, and inpainting by diffusion against PatchMatch.

Usage (COURSE_OFFLINE=1 for the offline MNIST digits):
    python benchmarks/bench_10_scaling_control.py --scaling      # trains 6 DiTs + the U-Net, 1 500 steps each (~20 min)
    python benchmarks/bench_10_scaling_control.py --micro        # shipped micro-conditioned and plain DiT (~2 min)
    python benchmarks/bench_10_scaling_control.py --refiner      # shipped base + refiner, 3 seeds, 10 and 20 steps (~2 min)
    python benchmarks/bench_10_scaling_control.py --controlnet   # shipped ControlNet, strength sweep (~2 min)
    python benchmarks/bench_10_scaling_control.py --inpainting   # 3 holes x 8 methods on 500 held-out digits (~6 min)

--scaling: the recipes mnist_dit_{xs,s,m}_p{7,4} and mnist_unet_grid trained from scratch for the
same number of steps (batch 128), each measured like every generator (w = 1, 20 Euler steps, 100
samples per class, MNIST-FD on 50 per class beside its floor) with the forward GFLOPs per sample
(torch.utils.flop_counter) and the training ms per step on this machine.

--micro: mnist_unet_micro asked for original sizes 8..28 and crops (0, 0)..(6, 6), beside
mnist_unet_degraded (the same data, no conditions) and the held-out digits: the variance of the
Laplacian (sharpness) and the distance of the ink's centre of mass from (14, 14) (centring).

--refiner: mnist_cfm_unet alone against mnist_cfm_unet for t >= 0.3 and mnist_refiner below, at
the same number of steps, over 3 sampling seeds.

--controlnet: mnist_controlnet at strengths 0 (the base) to 1.5: edge IoU with the control (edge
maps of 500 held-out digits) and the class accuracy for the labels of those digits.

--inpainting: 500 held-out digits (50 per class) with the centre, the bottom half or the right
half unknown, completed by the naive paste (free sample, known pixels pasted at the end), replacement
(the known-pixel replacement, 20 steps) with 1, 4 and 10 resamplings after every step, 10 resamplings of stretches
of 10 steps (RePaint's jump length 10), the mask-conditioned U-Net mnist_inpaint_unet (trained on
holes, 20 steps), and PatchMatch (5 x 5 patches); the unconditional mnist_cfm_unet (null label)
generates for the paste and the replacements. The completions' class accuracy,
their MNIST-FD against the other 50 per class beside the floor (the originals against them), the
mean squared error on the hole, and the time per image.
"""

from __future__ import annotations

import argparse
import time

import torch

from course.controlnet import edge_map
from course.guidance import classifier_free_guidance
from course.image_metrics import (
    class_accuracy,
    classifier_features,
    feature_fd,
    laplacian_sharpness,
)
from course.image_recipes import eval_labels, sample_classes, sample_metrics
from course.inpainting import (
    HOLES,
    hole_mask,
    inpaint_conditioned,
    inpaint_paste,
    inpaint_replace,
    patchmatch_inpaint,
)
from course.pretrained import load
from course.recipe_registry import get_recipe, load_data, run_recipe
from course.scaling_recipes import GRID, centring_offset, edge_iou, micro_conditions, sample_refined


def _held_out():
    return load_data(get_recipe("mnist_cfm_unet"), "test", verbose=False)


def scaling_table() -> None:
    print("| model | patch | tokens | parameters | GFLOPs / forward | ms / step | class accuracy | MNIST-FD | floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    from course.dit import forward_gflops

    for name in (*GRID, "mnist_unet_grid"):
        result = run_recipe(name, save=False, progress=False)
        recipe, m = get_recipe(name), result.metrics
        model = result.model
        if "gflops_per_forward" in m:
            gflops, patch, tokens = m["gflops_per_forward"], recipe.patch, (28 // recipe.patch) ** 2
        else:
            gflops = forward_gflops(model, torch.zeros(1, 1, 28, 28), torch.full((1,), 0.5),
                                    y=torch.zeros(1, dtype=torch.long))
            patch, tokens = recipe.patch, "-"
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {patch} | {tokens} | {params:,} | {gflops:.4f} | {1000 * result.seconds / recipe.steps:.0f} | "
              f"{m['class_accuracy']:.1%} | {m['mnist_fd']:.2f} | {m['mnist_fd_floor']:.2f} |", flush=True)


@torch.no_grad()
def micro_table() -> None:
    held_out, classifier = _held_out(), load("mnist_classifier")
    labels = eval_labels(False)[::2]  # 50 per class
    print("| model | requested size | requested crop | sharpness | centre offset (px) | class accuracy |")
    print("|---|---|---|---|---|---|")
    print(f"| held-out digits | - | - | {float(laplacian_sharpness(held_out.images).mean()):.3f} | "
          f"{float(centring_offset(held_out.images).mean()):.2f} | - |")
    plain = load("mnist_unet_degraded")
    samples = sample_classes(plain, labels, w=1.0, nfe=20, generator=torch.Generator().manual_seed(1))
    print(f"| mnist_unet_degraded | (none) | (none) | {float(laplacian_sharpness(samples).mean()):.3f} | "
          f"{float(centring_offset(samples.clamp(-1, 1)).mean()):.2f} | {class_accuracy(classifier, samples, labels):.1%} |")
    micro = load("mnist_unet_micro")
    for size, crop in [(s, (0, 0)) for s in (8, 12, 16, 20, 24, 28)] + [(28, (c, c)) for c in (2, 4, 6)]:
        samples = sample_classes(micro, labels, w=1.0, nfe=20, generator=torch.Generator().manual_seed(1),
                                 **micro_conditions(len(labels), size, crop))
        print(f"| mnist_unet_micro | {size} | {crop} | {float(laplacian_sharpness(samples).mean()):.3f} | "
              f"{float(centring_offset(samples.clamp(-1, 1)).mean()):.2f} | "
              f"{class_accuracy(classifier, samples, labels):.1%} |", flush=True)


@torch.no_grad()
def refiner_table(seeds=(1, 2, 3)) -> None:
    held_out, classifier = _held_out(), load("mnist_classifier")
    base, refiner = load("mnist_cfm_unet"), load("mnist_refiner")
    t_switch = float(get_recipe("mnist_refiner").option("t_switch"))
    labels = eval_labels(False)
    print(f"t_switch = {t_switch}; w = 1; 100 samples per class; mean ± sd over sampling seeds {seeds}")
    print("| sampler | Euler steps | class accuracy | MNIST-FD | floor | sharpness | FD change, same seed |")
    print("|---|---|---|---|---|---|---|")
    for nfe in (10, 20):
        fds = {}
        for name, ref in (("base alone", None), ("base + refiner", refiner)):
            rows = []
            for seed in seeds:
                gen = torch.Generator().manual_seed(seed)
                start = time.perf_counter()
                samples = sample_refined(base, ref, labels, t_switch=t_switch, nfe=nfe, generator=gen)
                m = sample_metrics(classifier, samples, labels, held_out, time.perf_counter() - start, 2 * nfe,
                                   generator=gen)
                rows.append([m["class_accuracy"], m["mnist_fd"], m["mnist_fd_floor"],
                             float(laplacian_sharpness(samples).mean())])
            r = torch.tensor(rows, dtype=torch.float64)
            fds[name] = r[:, 1]
            mean, sd = r.mean(0), r.std(0)
            d = r[:, 1] - fds["base alone"]  # paired: the same seeds, the same initial noise
            change = "-" if ref is None else f"{d.mean():+.2f} ± {d.std():.2f}"
            print(f"| {name} | {nfe} | {mean[0]:.1%} ± {sd[0]:.1%} | {mean[1]:.2f} ± {sd[1]:.2f} | {mean[2]:.2f} | "
                  f"{mean[3]:.3f} ± {sd[3]:.3f} | {change} |", flush=True)


@torch.no_grad()
def controlnet_table(strengths=(0.0, 0.25, 0.5, 0.75, 1.0, 1.5)) -> None:
    held_out, classifier = _held_out(), load("mnist_classifier")
    net = load("mnist_controlnet")
    chosen = held_out.per_class(50, generator=torch.Generator().manual_seed(2))
    labels, control = chosen.labels, edge_map(chosen.images)
    print("w = 1, 20 Euler steps; controls: edge maps of 500 held-out digits (50 per class), labels theirs")
    print("| strength | edge IoU | class accuracy |")
    print("|---|---|---|")
    for s in strengths:
        samples = sample_classes(net, labels, w=1.0, nfe=20, generator=torch.Generator().manual_seed(1),
                                 control=control, strength=s)
        print(f"| {s:g} | {float(edge_iou(samples.clamp(-1, 1), control).mean()):.3f} | "
              f"{class_accuracy(classifier, samples, labels):.1%} |", flush=True)


@torch.no_grad()
def inpainting_table() -> None:
    held_out, classifier = _held_out(), load("mnist_classifier")
    both = held_out.per_class(100, generator=torch.Generator().manual_seed(3))
    idx = torch.arange(1000).reshape(10, 100)
    a, b = both.images[idx[:, :50].flatten()], both.images[idx[:, 50:].flatten()]
    labels = both.labels[idx[:, :50].flatten()]
    ref = classifier_features(classifier, b)
    floor = feature_fd(classifier_features(classifier, a), ref)
    field = classifier_free_guidance(load("mnist_cfm_unet"), 0.0, null_label=10)
    print(f"500 held-out digits; MNIST-FD against 500 others (floor: the originals, {floor:.2f}); the classifier on "
          f"the originals: {class_accuracy(classifier, a, labels):.1%}")
    print("| hole | method | class accuracy | MNIST-FD | MSE on the hole | ms / image |")
    print("|---|---|---|---|---|---|")
    for hole in HOLES:
        known = hole_mask(len(a), hole)
        for name in INPAINTERS:
            gen = torch.Generator().manual_seed(4)
            start = time.perf_counter()
            out = complete(name, field, a, known, gen)
            ms = 1000 * (time.perf_counter() - start) / len(a)
            mse = float((out - a)[~known].pow(2).mean())
            fd = feature_fd(classifier_features(classifier, out), ref)
            print(f"| {hole} | {name} | {class_accuracy(classifier, out, labels):.1%} | {fd:.2f} | {mse:.3f} | "
                  f"{ms:.1f} |", flush=True)


INPAINTERS = ("hole left blank", "naive paste", "replacement", "replacement, 4 resamplings",
              "replacement, 10 resamplings", "replacement, 10 resamplings, jump 10", "mask-conditioned U-Net",
              "PatchMatch")


def complete(name: str, field, images, known, gen):
    """``images`` with the pixels where ``known`` is False filled by inpainter ``name``."""
    null = torch.full((len(images),), 10)
    if name == "hole left blank":
        return torch.where(known, images, -1.0)
    if name == "naive paste":
        return inpaint_paste(field, images, known, nfe=20, generator=gen, y=null)
    if name.startswith("replacement"):
        resample = int(name.split()[1]) if "resamplings" in name else 1
        jump = int(name.split()[-1]) if "jump" in name else 1
        return inpaint_replace(field, images, known, nfe=20, resample=resample, jump=jump, generator=gen, y=null)
    if name == "mask-conditioned U-Net":
        return inpaint_conditioned(load("mnist_inpaint_unet"), images, known, nfe=20, generator=gen)
    return torch.stack([patchmatch_inpaint(img, k, generator=gen) for img, k in zip(images, known, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = ("scaling", "micro", "refiner", "controlnet", "inpainting")
    for mode in modes:
        parser.add_argument(f"--{mode}", action="store_true")
    args = parser.parse_args()
    if not any(getattr(args, m) for m in modes):
        parser.error("choose at least one of " + ", ".join(f"--{m}" for m in modes))
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads")
    for mode, table in zip(modes, (scaling_table, micro_table, refiner_table, controlnet_table, inpainting_table),
                           strict=True):
        if getattr(args, mode):
            table()


if __name__ == "__main__":
    main()
