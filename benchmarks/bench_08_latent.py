"""Chapter 08 benchmark: latent diffusion against the pixel model on this CPU.

Usage (COURSE_OFFLINE=1 for the 4 000 offline training digits):
    python benchmarks/bench_08_latent.py --speed                  # ms per training step, images / s
    python benchmarks/bench_08_latent.py --rate-distortion 500 --latent-seconds 90   # c and beta (~20 min)
    python benchmarks/bench_08_latent.py --variants 150            # latent denoisers, 150 s of training each
    python benchmarks/bench_08_latent.py --head-to-head 2 4        # pixel vs latent at equal minutes (~16 min)
    python benchmarks/bench_08_latent.py --cascade 4               # cascade with and without augmentation (~14 min)

--speed times forward + backward + Adam of the two recipes' losses (batch 128; the latent model's
batch is a posterior sample of encoded digits) and the images per second of ``sample_classes`` at
w = 1 and 10 Euler steps (20 NFE), decoding included, for 500 digits.

--rate-distortion STEPS trains ``KLAutoencoder`` for latent channels c in {1, 2, 4, 8} at beta = 1e-3
and for beta in {1e-4, 1e-3, 1e-2, 1e-1} at c = 4 (STEPS steps each, default 600; the
``mnist_autoencoder`` settings otherwise) and reports, on the 1 000 held-out digits: the rate (KL in
nats per image), the distortion (reconstruction MSE), the evaluation classifier's accuracy on the
reconstructions, the FD of the reconstructions beside the floor, and the latent scale. With
--latent-seconds S it also trains the ``mnist_latent_cfm`` denoiser for S seconds on each c = 4
latent and reports the generated digits' MNIST-FD: how hard each latent is to model.

--variants and --head-to-head train from scratch for a fixed wall time: the number of steps is
set from the measured step time so that the cosine schedule ends with the budget. Quality is
measured at w = 1 with 20 Euler steps (40 NFE), 100 samples per class: class accuracy, MNIST-FD
on 50 per class against held-out digits beside its floor. Training minutes exclude evaluation;
the latent model's exclude the autoencoder (trained once, the shipped ``mnist_autoencoder``) but
include encoding the training digits.

--cascade trains the single-stage pixel model and the ``mnist_sr_cascade`` recipe with and without
noise-conditioning augmentation (max_aug 0.5 and 0) for the same minutes, and samples the cascades
at several augmentation levels.
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


def rate_distortion(steps: int, latent_seconds: float = 0.0) -> None:
    base = get_recipe("mnist_autoencoder")
    train_data, held_out = load_mnist("train"), load_mnist("test", verbose=False)
    classifier = load("mnist_classifier")
    x, y = held_out.images, held_out.labels
    half = held_out.per_class(100, generator=torch.Generator().manual_seed(1))
    idx = torch.arange(len(half)).reshape(10, 100)
    a, b = half.images[idx[:, :50].flatten()], half.images[idx[:, 50:].flatten()]
    f_a, f_b = classifier_features(classifier, a), classifier_features(classifier, b)
    print(f"KLAutoencoder widths {base.option('ae_channels')}, {steps} Adam steps of batch {base.batch_size} at lr "
          f"{base.lr}; held-out digits: {len(x)}; evaluation classifier accuracy on the originals "
          f"{100 * float((classifier(x).argmax(1) == y).double().mean()):.1f} %, FD floor {feature_fd(f_a, f_b):.2f}\n")
    if latent_seconds:
        print(f"Latent model: the mnist_latent_cfm recipe trained for {latent_seconds:.0f} s on each c = 4 latent, "
              "sampled at w = 1 with 20 Euler steps, 100 per class (MNIST-FD on 50 per class)\n")
    print("| c | latent / pixels | beta | rate: KL (nats / image) | distortion: MSE | accuracy on reconstructions "
          "| FD of reconstructions | latent scale | train s | latent model: FD (floor) |")
    print("|---|-----------------|------|-------------------------|-----------------|----------------------------"
          "|-----------------------|--------------|---------|--------------------------|")
    configs = [(c, 1e-3) for c in (1, 2, 4, 8)] + [(4, beta) for beta in (1e-4, 1e-2, 1e-1)]
    for c, beta in sorted(configs, key=lambda cb: (cb[1] != 1e-3, cb)):
        torch.manual_seed(0)
        ae = KLAutoencoder(1, 28, latent_channels=c, channels=tuple(base.option("ae_channels")))
        res = train(ae, lambda m, batch, g, beta=beta: autoencoder_loss(m, batch[0], beta=beta, generator=g),
                    (train_data.images, train_data.labels), TrainConfig(steps=steps, batch_size=base.batch_size,
                                                                        lr=base.lr, ema_decay=base.ema_decay),
                    generator=torch.Generator().manual_seed(0))
        model = res.ema_model.eval()
        with torch.no_grad():
            scale = fit_latent_scale(model, train_data.images)
            recon = model(x)
            mean, logvar = model.posterior(x)
            kl = float(gaussian_kl(mean, logvar).mean())
            acc = float((classifier(recon).argmax(1) == y).double().mean())
            fd = feature_fd(classifier_features(classifier, model(a)), f_b)
        generated = ""
        if latent_seconds and c == 4:
            recipe = get_recipe("mnist_latent_cfm")
            q, _, _ = _budget_run(recipe, latent_seconds, train_data, held_out, classifier, model, None)
            generated = f"{q.fd:.2f} ({q.fd_floor:.2f})"
        print(f"| {c} | 1/{784 // (c * 49)} | {beta:g} | {kl:.0f} | {float((recon - x).pow(2).mean()):.4f} | "
              f"{100 * acc:.1f} % | {fd:.2f} | {scale:.3f} | {res.seconds:.0f} | {generated} |", flush=True)


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


def cascade(minutes: float) -> None:
    """The cascade with and without noise-conditioning augmentation and the single-stage pixel model,
    each trained for the same minutes; the cascades sampled at several augmentation levels."""
    from course.cascade import sample_cascade

    train_data, held_out = load_mnist("train"), load_mnist("test", verbose=False)
    classifier = load("mnist_classifier")
    base = get_recipe("mnist_sr_cascade")
    no_aug = dataclasses.replace(base, options=tuple((k, 0.0 if k in ("max_aug", "sample_aug") else v)
                                                     for k, v in base.options))
    labels = torch.arange(10).repeat_interleave(100)
    print(f"{minutes:g} training minutes each; cascade: base U-Net {base.channels} on 14x14 (patch {base.patch}), "
          f"SR U-Net {base.option('sr_channels')} on 28x28 (patch 2); sampled with w = 1, 20 Euler steps for the "
          f"base (40 NFE) and {base.option('sr_nfe')} for the SR stage; 100 samples per class, MNIST-FD on 50 per "
          "class\n")
    print("| model | trained with max_aug | steps | sampled at aug | class accuracy | MNIST-FD | FD floor | "
          "images / s |")
    print("|-------|----------------------|-------|----------------|----------------|----------|----------|"
          "------------|")
    pixel = get_recipe("mnist_cfm_unet")
    q, steps, per_s = _budget_run(pixel, 60 * minutes, train_data, held_out, classifier, None, None)
    print(f"| single-stage {pixel.name} | - | {steps} | - | {100 * q.accuracy:.1f} % | {q.fd:.2f} | {q.fd_floor:.2f} | "
          f"{per_s:.0f} |", flush=True)
    for recipe in (base, no_aug):
        model, steps = _budget_train(recipe, 60 * minutes, train_data, None)
        levels = (0.0, 0.1, 0.2, 0.3) if recipe.option("max_aug") else (0.0,)
        for level in levels:
            start = time.perf_counter()
            samples = sample_cascade(model, labels, w=1.0, nfe_base=20, nfe_sr=int(recipe.option("sr_nfe")),
                                     aug_level=level, generator=torch.Generator().manual_seed(1))
            per_s = len(labels) / (time.perf_counter() - start)
            qc = evaluate_class_conditional(classifier, samples, labels, held_out, per_class_fd=50,
                                            generator=torch.Generator().manual_seed(1))
            print(f"| cascade | {recipe.option('max_aug'):g} | {steps} | {level:g} | {100 * qc.accuracy:.1f} % | "
                  f"{qc.fd:.2f} | {qc.fd_floor:.2f} | {per_s:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--rate-distortion", type=int, nargs="?", const=600, metavar="STEPS")
    parser.add_argument("--latent-seconds", type=float, default=0.0, metavar="SECONDS",
                        help="with --rate-distortion: train a latent model this long on each c = 4 latent")
    parser.add_argument("--variants", type=float, metavar="SECONDS")
    parser.add_argument("--head-to-head", type=float, nargs="+", metavar="MINUTES")
    parser.add_argument("--cascade", type=float, metavar="MINUTES")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.speed:
        speed()
    if args.rate_distortion:
        rate_distortion(args.rate_distortion, args.latent_seconds)
    if args.variants:
        variants(args.variants)
    if args.head_to_head:
        head_to_head(args.head_to_head)
    if args.cascade:
        cascade(args.cascade)


if __name__ == "__main__":
    main()
