"""Chapter 08 benchmark: latent diffusion against the pixel model on this CPU.

Usage (COURSE_OFFLINE=1 for the 4 000 offline training digits):
    python benchmarks/bench_08_latent.py --speed                  # ms per training step, images / s
    python benchmarks/bench_08_latent.py --rate-distortion 1000 --seeds 2 --latent-steps 800   # c and beta (~45 min)
    python benchmarks/bench_08_latent.py --variants 150            # latent denoisers, 150 s of training each
    python benchmarks/bench_08_latent.py --head-to-head 2 4        # pixel vs latent at equal minutes (~16 min)
    python benchmarks/bench_08_latent.py --cascade 4               # cascade with and without augmentation (~22 min)
    python benchmarks/bench_08_latent.py --guidance                # shipped models across w and steps (~6 min)

--speed times forward + backward + Adam of the two recipes' losses (batch 128; the latent model's
batch is a posterior sample of encoded digits) and the images per second of ``sample_classes`` at
w = 1 and 10 Euler steps (20 NFE), decoding included, for 500 digits.

--rate-distortion STEPS trains ``KLAutoencoder`` for latent channels c in {1, 2, 4, 8} at beta = 1e-3
and for beta in {1e-4, 1e-3, 1e-2, 1e-1} at c = 4 (STEPS steps each, default 600; the
``mnist_autoencoder`` settings otherwise) and reports, on the 1 000 held-out digits: the rate (KL in
nats per image), the distortion (reconstruction MSE), the evaluation classifier's accuracy on the
reconstructions, the FD of the reconstructions beside the floor, and the latent scale, as mean ± sd
over --seeds training seeds, and says whether distortion falls step by step as rate rises. With
--latent-steps N it also trains the ``mnist_latent_cfm`` denoiser for N steps on each c = 4 latent
(seed 0) and reports the generated digits' MNIST-FD: how hard each latent is to model.

--variants and --head-to-head train from scratch for a fixed wall time: the number of steps is
set from the measured step time so that the cosine schedule ends with the budget. Quality is
measured at w = 1 with 20 Euler steps (40 NFE), 100 samples per class: class accuracy, MNIST-FD
on 50 per class against held-out digits beside its floor. Training minutes exclude evaluation;
the latent model's exclude the autoencoder (trained once, the shipped ``mnist_autoencoder``) but
include encoding the training digits.

--cascade trains the single-stage pixel model and the ``mnist_sr_cascade`` recipe with and without
noise-conditioning augmentation (max_aug 0.5 and 0) for the same minutes. Both SR stages then
super-resolve the same low-res inputs (the augmented cascade's base samples at 20 and 5 Euler steps,
and downsampled real digits) at several augmentation levels, over --seeds evaluation seeds: the gap
between base-sample and real inputs is what the base model's artefacts cost, and augmentation is
meant to shrink it.

--guidance samples the shipped ``mnist_latent_cfm`` and ``mnist_cfm_unet`` at several guidance
weights and Euler step counts (--seeds evaluation seeds, default 3): the trade-off between class
accuracy and FD that guidance controls.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from course.autoencoder import KLAutoencoder, autoencoder_loss, fit_latent_scale, gaussian_kl
from course.datasets import load_mnist
from course.image_metrics import classifier_features, evaluate_class_conditional, feature_fd
from course.latent import latent_moments
from course.pretrained import load
from course.recipes import build_model, get_recipe, recipe_loss, sample_classes
from course.training import TrainConfig, train


def _step_ms(model, loss, batch, n: int = 15) -> float:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
    g = torch.Generator().manual_seed(0)
    for i in range(n + 5):
        if i == 5:
            start = time.perf_counter()
        value = loss(model, batch, g)
        opt.zero_grad()
        value.backward()
        opt.step()
    return 1000 * (time.perf_counter() - start) / n


@torch.no_grad()
def _images_per_second(model, nfe: int = 10, n: int = 500) -> float:
    labels = torch.arange(10).repeat_interleave(n // 10)
    sample_classes(model, labels[:20], nfe=2)
    start = time.perf_counter()
    sample_classes(model, labels, nfe=nfe, generator=torch.Generator().manual_seed(0))
    return n / (time.perf_counter() - start)


def _data(recipe, train_data, autoencoder):
    if recipe.kind == "latent_cfm":
        start = time.perf_counter()
        moments = latent_moments(autoencoder, train_data.images)
        return (moments, train_data.labels), time.perf_counter() - start
    return (train_data.images, train_data.labels), 0.0


def _model(recipe, autoencoder):
    torch.manual_seed(recipe.seed)
    model = build_model(recipe)
    if recipe.kind == "latent_cfm":
        model.autoencoder.load_state_dict(autoencoder.state_dict())
    return model


def speed() -> None:
    train_data = load_mnist("train", verbose=False)
    ae = load("mnist_autoencoder")
    idx = torch.randint(0, len(train_data), (128,), generator=torch.Generator().manual_seed(0))
    print("2 threads; training: forward + backward + Adam, batch 128; sampling: w = 1, 10 Euler steps "
          "(20 NFE), 500 digits, decoding included\n")
    print("| model | parameters (trained) | ms / step | images / s |")
    print("|-------|----------------------|-----------|------------|")
    for name in ("mnist_cfm_unet", "mnist_latent_cfm"):
        recipe = get_recipe(name)
        model = _model(recipe, ae)
        (a, b), _ = _data(recipe, train_data, ae)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ms = _step_ms(model, recipe_loss(recipe), (a[idx], b[idx]))
        print(f"| {name} {recipe.channels} | {params:,} | {ms:.0f} | {_images_per_second(model):.0f} |", flush=True)


def rate_distortion(steps: int, latent_steps: int = 0, seeds: int = 1) -> None:
    base = get_recipe("mnist_autoencoder")
    train_data, held_out = load_mnist("train"), load_mnist("test", verbose=False)
    classifier = load("mnist_classifier")
    x, y = held_out.images, held_out.labels
    half = held_out.per_class(100, generator=torch.Generator().manual_seed(1))
    idx = torch.arange(len(half)).reshape(10, 100)
    a, b = half.images[idx[:, :50].flatten()], half.images[idx[:, 50:].flatten()]
    f_a, f_b = classifier_features(classifier, a), classifier_features(classifier, b)
    print(f"KLAutoencoder widths {base.option('ae_channels')}, {steps} Adam steps of batch {base.batch_size} at lr "
          f"{base.lr}; mean ± sd over training seeds 0..{seeds - 1} (initialisation and batches); held-out digits: "
          f"{len(x)}; evaluation classifier accuracy on the originals "
          f"{100 * float((classifier(x).argmax(1) == y).double().mean()):.1f} %, FD floor {feature_fd(f_a, f_b):.2f}\n")
    if latent_steps:
        print(f"Latent model: the mnist_latent_cfm recipe trained for {latent_steps} steps on each c = 4 latent of "
              "seed 0, sampled at w = 1 with 20 Euler steps, 100 per class (MNIST-FD on 50 per class)\n")
    print("| c | latent / pixels | beta | rate: KL (nats / image) | distortion: MSE | accuracy on reconstructions "
          "| FD of reconstructions | latent scale | train s | latent model: FD (floor) |")
    print("|---|-----------------|------|-------------------------|-----------------|----------------------------"
          "|-----------------------|--------------|---------|--------------------------|")
    configs = [(c, 1e-3) for c in (1, 2, 4, 8)] + [(4, beta) for beta in (1e-4, 1e-2, 1e-1)]
    rows = {}
    for c, beta in sorted(configs, key=lambda cb: (cb[1] != 1e-3, cb)):
        runs = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            ae = KLAutoencoder(1, 28, latent_channels=c, channels=tuple(base.option("ae_channels")))
            res = train(ae, lambda m, batch, g, beta=beta: autoencoder_loss(m, batch[0], beta=beta, generator=g),
                        (train_data.images, train_data.labels),
                        TrainConfig(steps=steps, batch_size=base.batch_size, lr=base.lr, ema_decay=base.ema_decay),
                        generator=torch.Generator().manual_seed(seed))
            model = res.ema_model.eval()
            with torch.no_grad():
                recon = model(x)
                mean, logvar = model.posterior(x)
                runs.append({"rate": float(gaussian_kl(mean, logvar).mean()),
                             "mse": float((recon - x).pow(2).mean()),
                             "acc": 100 * float((classifier(recon).argmax(1) == y).double().mean()),
                             "fd": feature_fd(classifier_features(classifier, model(a)), f_b),
                             "scale": fit_latent_scale(model, train_data.images), "seconds": res.seconds})
            if seed == 0:
                first = model
        stats = {k: [r[k] for r in runs] for k in runs[0]}
        rows[c, beta] = stats
        generated = ""
        if latent_steps and c == 4:
            recipe = dataclasses.replace(get_recipe("mnist_latent_cfm"), steps=latent_steps)
            q = _steps_run(recipe, train_data, held_out, classifier, first)
            generated = f"{q.fd:.2f} ({q.fd_floor:.2f})"
        t = {k: torch.tensor(v, dtype=torch.float64) for k, v in stats.items()}

        def sd(k, f, t=t):
            return f" ± {float(t[k].std()):{f}}" if seeds > 1 else ""
        print(f"| {c} | 1/{784 // (c * 49)} | {beta:g} | {float(t['rate'].mean()):.0f}{sd('rate', '.0f')} | "
              f"{float(t['mse'].mean()):.4f}{sd('mse', '.4f')} | {float(t['acc'].mean()):.1f}{sd('acc', '.1f')} % | "
              f"{float(t['fd'].mean()):.2f}{sd('fd', '.2f')} | {float(t['scale'].mean()):.3f} | "
              f"{float(t['seconds'].mean()):.0f} | {generated} |", flush=True)
    _monotone_report(rows)


def _monotone_report(rows: dict) -> None:
    """Whether distortion falls as rate rises along each sweep, step by step, with the seed spread."""
    print()
    for name, keys in (("latent channels c at beta = 1e-3", sorted(k for k in rows if k[1] == 1e-3)),
                       ("KL weight beta at c = 4", sorted((k for k in rows if k[0] == 4), key=lambda k: -k[1]))):
        rates = [sum(rows[k]["rate"]) / len(rows[k]["rate"]) for k in keys]
        mses = [sum(rows[k]["mse"]) / len(rows[k]["mse"]) for k in keys]
        rate_up = all(r2 > r1 for r1, r2 in zip(rates, rates[1:], strict=False))
        steps = []
        for k1, k2, m1, m2 in zip(keys, keys[1:], mses, mses[1:], strict=False):
            spread = max(max(rows[k]["mse"]) - min(rows[k]["mse"]) for k in (k1, k2))
            verdict = "falls" if m2 < m1 else ("rises within the seed spread" if m2 - m1 <= spread else "rises")
            label = (lambda k: f"c = {k[0]}") if name.startswith("latent") else (lambda k: f"beta = {k[1]:g}")
            steps.append(f"{label(k1)} -> {label(k2)}: {m1:.4f} -> {m2:.4f} {verdict}")
        print(f"{name}: rate {'rises' if rate_up else 'does not rise'} at every step; distortion " + "; ".join(steps))


def _steps_run(recipe, train_data, held_out, classifier, ae):
    """Train ``recipe`` (a latent recipe) from scratch for its steps on ``ae``'s latents and measure it."""
    model = _model(recipe, ae)
    data, _ = _data(recipe, train_data, ae)
    config = TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, ema_decay=recipe.ema_decay)
    ema = train(model, recipe_loss(recipe), data, config, generator=torch.Generator().manual_seed(recipe.seed)).ema_model
    labels = torch.arange(10).repeat_interleave(100)
    samples = sample_classes(ema.eval(), labels, w=1.0, nfe=20, generator=torch.Generator().manual_seed(1))
    return evaluate_class_conditional(classifier, samples, labels, held_out, per_class_fd=50,
                                      generator=torch.Generator().manual_seed(1))


def _budget_train(recipe, budget_s: float, train_data, ae):
    """Train ``recipe`` from scratch for ``budget_s`` seconds of wall time (encoding included): the
    steps are set from the measured step time so that the cosine schedule ends with the budget."""
    model = _model(recipe, ae)
    data, encode_s = _data(recipe, train_data, ae)
    loss = recipe_loss(recipe)
    idx = torch.randint(0, len(data[0]), (recipe.batch_size,), generator=torch.Generator().manual_seed(0))
    ms = _step_ms(_model(recipe, ae), loss, tuple(d[idx] for d in data), n=8)
    steps = max(10, int((budget_s - encode_s) / (ms / 1000) * 0.97))
    config = TrainConfig(steps=steps, batch_size=recipe.batch_size, lr=recipe.lr, ema_decay=recipe.ema_decay,
                         time_limit=budget_s - encode_s)
    res = train(model, loss, data, config, generator=torch.Generator().manual_seed(recipe.seed))
    return res.ema_model.eval(), res.steps


def _budget_run(recipe, budget_s: float, train_data, held_out, classifier, ae, label: str | None):
    ema, steps = _budget_train(recipe, budget_s, train_data, ae)
    labels = torch.arange(10).repeat_interleave(100)
    start = time.perf_counter()
    samples = sample_classes(ema, labels, w=1.0, nfe=20, generator=torch.Generator().manual_seed(1))
    per_s = len(labels) / (time.perf_counter() - start)
    q = evaluate_class_conditional(classifier, samples, labels, held_out, per_class_fd=50,
                                   generator=torch.Generator().manual_seed(1))
    if label is None:
        return q, steps, per_s
    print(f"| {label} | {budget_s / 60:.1f} | {steps} | {budget_s / 60:.2f} | {100 * q.accuracy:.1f} % | {q.fd:.2f} | "
          f"{q.fd_floor:.2f} | {q.fd / q.fd_floor:.2f} | {per_s:.0f} |", flush=True)
    return q, steps, per_s


def _table_head() -> None:
    print("w = 1, 20 Euler steps (40 NFE); 100 samples per class, MNIST-FD on 50 per class\n")
    print("| model | budget (min) | steps | training minutes | class accuracy | MNIST-FD | FD floor | FD / floor "
          "| images / s |")
    print("|-------|--------------|-------|------------------|----------------|----------|----------|------------"
          "|------------|")


def variants(seconds: float) -> None:
    base = get_recipe("mnist_latent_cfm")
    train_data, held_out = load_mnist("train"), load_mnist("test", verbose=False)
    classifier, ae = load("mnist_classifier"), load("mnist_autoencoder")
    _table_head()
    for changes in ({}, {"channels": (64, 64, 128)}, {"channels": (48, 96, 96)}, {"lr": 4e-3},
                    {"batch_size": 256, "lr": 3e-3}):
        recipe = dataclasses.replace(base, **changes)
        label = ", ".join(f"{k} {v}" for k, v in changes.items()) or f"recipe {base.channels}"
        _budget_run(recipe, seconds, train_data, held_out, classifier, ae, label)


def head_to_head(minutes: list[float]) -> None:
    train_data, held_out = load_mnist("train"), load_mnist("test", verbose=False)
    classifier, ae = load("mnist_classifier"), load("mnist_autoencoder")
    _table_head()
    for budget in minutes:
        for name in ("mnist_cfm_unet", "mnist_latent_cfm"):
            recipe = get_recipe(name)
            _budget_run(recipe, 60 * budget, train_data, held_out, classifier, ae, f"{name} {recipe.channels}")


def _mean_sd(values: list[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{float(t.mean()):.2f} ± {float(t.std()):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def _quality_over_seeds(classifier, held_out, draw, seeds) -> tuple[str, str, str, str]:
    """Class accuracy, MNIST-FD, its floor and FD / floor as mean ± sd over ``seeds``; ``draw(seed)``
    returns (samples, labels) and the seed also draws the held-out split of the FD."""
    acc, fd, floor, ratio = [], [], [], []
    for seed in seeds:
        samples, labels = draw(seed)
        q = evaluate_class_conditional(classifier, samples, labels, held_out, per_class_fd=50,
                                       generator=torch.Generator().manual_seed(seed))
        acc.append(100 * q.accuracy), fd.append(q.fd), floor.append(q.fd_floor), ratio.append(q.fd / q.fd_floor)
    return f"{_mean_sd(acc)} %", _mean_sd(fd), _mean_sd(floor), _mean_sd(ratio)


def guidance(seeds: int) -> None:
    """The shipped latent and pixel generators across guidance weights and Euler step counts."""
    held_out = load_mnist("test", verbose=False)
    classifier = load("mnist_classifier")
    labels = torch.arange(10).repeat_interleave(100)
    print(f"Shipped checkpoints; 100 samples per class, MNIST-FD on 50 per class; mean ± sd over seeds "
          f"1..{seeds} (the seed draws the noise and the held-out split of the FD)\n")
    print("| model | w | Euler steps | NFE | class accuracy | MNIST-FD | FD floor | FD / floor |")
    print("|-------|---|-------------|-----|----------------|----------|----------|------------|")
    grid = {"mnist_latent_cfm": [(w, n) for w in (0.0, 0.25, 0.5, 1.0, 2.0) for n in (20, 50)],
            "mnist_cfm_unet": [(w, 20) for w in (0.0, 0.5, 1.0)]}
    for name, settings in grid.items():
        model = load(name)
        for w, n in settings:
            def draw(seed, w=w, n=n, model=model):
                return sample_classes(model, labels, w=w, nfe=n, generator=torch.Generator().manual_seed(seed)), labels
            acc, fd, floor, ratio = _quality_over_seeds(classifier, held_out, draw, range(1, seeds + 1))
            print(f"| {name} | {w:g} | {n} | {n * (2 if w else 1)} | {acc} | {fd} | {floor} | {ratio} |", flush=True)


def cascade(minutes: float, seeds: int = 3) -> None:
    """The cascade with and without noise-conditioning augmentation and the single-stage pixel model,
    each trained for the same minutes. Both SR stages are then fed the same low-res inputs: the
    augmented cascade's base samples at 20 and at 5 Euler steps (an artefact-laden base), and
    downsampled real held-out digits (no base artefacts), at several augmentation levels."""
    from course.cascade import Cascade, downsample, sample_cascade

    train_data, held_out = load_mnist("train"), load_mnist("test", verbose=False)
    classifier = load("mnist_classifier")
    base = get_recipe("mnist_sr_cascade")
    no_aug = dataclasses.replace(base, options=tuple((k, 0.0 if k in ("max_aug", "sample_aug") else v)
                                                     for k, v in base.options))
    labels = torch.arange(10).repeat_interleave(100)
    sr_nfe = int(base.option("sr_nfe"))
    print(f"{minutes:g} training minutes each; cascade: base U-Net {base.channels} on 14x14 (patch {base.patch}), "
          f"SR U-Net {base.option('sr_channels')} on 28x28 (patch 2); base sampled with w = 1, SR stage with "
          f"{sr_nfe} Euler steps; 100 samples per class (50 for real low-res inputs), MNIST-FD on 50 per class; "
          f"mean ± sd over seeds 1..{seeds} (the seed draws the noise and the held-out split of the FD). Both SR "
          "stages super-resolve the same inputs: the max_aug 0.5 cascade's base samples, or held-out digits "
          "downsampled to 14x14 that the FD's reference set does not contain.\n")
    print("| model | trained with max_aug | steps | low-res input | sampled at aug | class accuracy | MNIST-FD | "
          "FD floor | FD / floor |")
    print("|-------|----------------------|-------|---------------|----------------|----------------|----------|"
          "----------|------------|")
    pixel = get_recipe("mnist_cfm_unet")
    ema, steps = _budget_train(pixel, 60 * minutes, train_data, None)

    def pixel_draw(seed):
        return sample_classes(ema, labels, w=1.0, nfe=20, generator=torch.Generator().manual_seed(seed)), labels

    acc, fd, floor, ratio = _quality_over_seeds(classifier, held_out, pixel_draw, range(1, seeds + 1))
    print(f"| single-stage {pixel.name} | - | {steps} | - | - | {acc} | {fd} | {floor} | {ratio} |", flush=True)
    trained = {recipe.option("max_aug"): _budget_train(recipe, 60 * minutes, train_data, None)
               for recipe in (base, no_aug)}
    shared_base = trained[base.option("max_aug")][0].base

    def real_low(seed):  # set A of the FD split drawn with this seed: disjoint from the reference set B
        both = held_out.per_class(100, generator=torch.Generator().manual_seed(seed))
        a = torch.arange(len(both)).reshape(10, 100)[:, :50].flatten()
        return downsample(both.images[a]), both.labels[a]

    inputs = {"base, 20 steps": 20, "base, 5 steps": 5, "real digits": None}
    for max_aug, (model, steps) in trained.items():
        cascade_model = Cascade(shared_base, model.sr, model.low_shape, model.image_shape)
        for input_name, nfe_base in inputs.items():
            for level in ((0.0, 0.1, 0.2, 0.3) if max_aug else (0.0,)):
                def draw(seed, nfe_base=nfe_base, level=level, cascade_model=cascade_model):
                    gen = torch.Generator().manual_seed(seed)
                    if nfe_base is None:
                        low, y = real_low(seed)
                        return sample_cascade(cascade_model, y, nfe_sr=sr_nfe, aug_level=level, low=low,
                                              generator=gen), y
                    return sample_cascade(cascade_model, labels, w=1.0, nfe_base=nfe_base, nfe_sr=sr_nfe,
                                          aug_level=level, generator=gen), labels
                acc, fd, floor, ratio = _quality_over_seeds(classifier, held_out, draw, range(1, seeds + 1))
                print(f"| cascade | {max_aug:g} | {steps} | {input_name} | {level:g} | {acc} | {fd} | {floor} | "
                      f"{ratio} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--rate-distortion", type=int, nargs="?", const=600, metavar="STEPS")
    parser.add_argument("--latent-steps", type=int, default=0, metavar="STEPS",
                        help="with --rate-distortion: train a latent model this many steps on each c = 4 latent")
    parser.add_argument("--variants", type=float, metavar="SECONDS")
    parser.add_argument("--head-to-head", type=float, nargs="+", metavar="MINUTES")
    parser.add_argument("--cascade", type=float, metavar="MINUTES")
    parser.add_argument("--guidance", action="store_true")
    parser.add_argument("--seeds", type=int, default=3, help="evaluation seeds of --guidance and --cascade, training seeds of --rate-distortion")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.speed:
        speed()
    if args.rate_distortion:
        rate_distortion(args.rate_distortion, args.latent_steps, args.seeds)
    if args.variants:
        variants(args.variants)
    if args.head_to_head:
        head_to_head(args.head_to_head)
    if args.guidance:
        guidance(args.seeds)
    if args.cascade:
        cascade(args.cascade, args.seeds)


if __name__ == "__main__":
    main()
