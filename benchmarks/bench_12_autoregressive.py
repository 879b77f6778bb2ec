"""Chapter 12 benchmark: the diffusion head, MAR against raster autoregression and latent diffusion,
and Diffusion Forcing against teacher forcing.

Usage (COURSE_OFFLINE=1 for the offline MNIST digits):
    python benchmarks/bench_12_autoregressive.py --head                # the head on 2-D data (~2 min)
    python benchmarks/bench_12_autoregressive.py --mar 6               # 3 models, 6 CPU-minutes each (~25 min)
    python benchmarks/bench_12_autoregressive.py --mar-sweep           # shipped mnist_mar: tau and steps (~6 min)
    python benchmarks/bench_12_autoregressive.py --df                  # shipped pendulum models (~3 min)
    python benchmarks/bench_12_autoregressive.py --df-noise 6000       # training levels: sorted share 0 vs 0.5 (~12 min)

--head trains a DiffusionHead (the MAR head, its z a learned embedding of the class) on the two-class
eight-Gaussians mixture and samples each class with the head's stochastic sampler at several
step counts: MMD and sliced W2 to the exact class conditional, each beside its noise floor (the
same distance between two exact sample sets of that size).

--mar M trains random-order MAR (``mnist_mar``'s settings), raster-order causal MAR
(``mnist_mar_raster``) and the plain latent diffusion model (``mnist_latent_cfm``) from scratch for
M CPU-minutes each on the shipped autoencoder's latents (the number of steps set from the measured
step time so that the cosine schedule ends with the budget) and reports class accuracy, MNIST-FD
beside its floor, diversity, and tokens (latent positions) per second at each model's sampling
settings (MAR 16 steps, raster 49, latent diffusion 20 Euler steps; w = 1).

--mar-sweep samples the shipped ``mnist_mar`` across the temperature tau (FD and diversity per tau)
and the number of autoregressive steps.

--df rolls the shipped ``pendulum_df`` and ``pendulum_tf`` out from 4 observed tokens to 64 (4x the
16-token training horizon) over the 200 held-out sequences, with the sampling settings of their
recipes and the alternatives, and reports the energy error in the horizon and in the last quarter
(and their ratio), the distance from the circle and from the true positions; then guidance: from
ONE observed token (the direction of the swing unknown) the goal "the bob is right of x = 0.3
eight tokens later" is reached by what fraction of guided and unguided rollouts, and whether the
guided ones still conserve energy.

--df-noise STEPS trains ``pendulum_df`` from scratch for STEPS steps with its independent levels as
drawn (``monotone_share`` 0, the paper's training) and with half of the sequences' levels sorted
(0.5, the recipe), and reports the same rollout metrics at the recipe's sampling settings.
"""

from __future__ import annotations

import argparse
import time

import torch

from course.autoregressive import DiffusionHead, diffusion_loss, sample_head
from course.autoregressive_recipes import (
    PENDULUM_DT,
    df_settings,
    mar_settings,
    pendulum_data,
    rollout_metrics,
)
from course.datasets import load_mnist
from course.diffusion_forcing import pendulum_energy, sample_diffusion_forcing, simulate_pendulum
from course.image_metrics import evaluate_class_conditional
from course.metrics import make_reference, sample_quality
from course.paths import LinearPath
from course.pretrained import load
from course.recipe_registry import KINDS
from course.recipes import build_model, get_recipe, recipe_loss, sample_classes
from course.toy_data import two_class_mixture
from course.training import TrainConfig, train

PATH = LinearPath()


# ---- the head on 2-D data ------------------------------------------------------------------------
class _ClassHead(torch.nn.Module):
    """The head with z = a learned embedding of the class: p(x | class) by the diffusion loss."""

    def __init__(self, classes: int, dim: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(classes, dim)
        self.head = DiffusionHead(2, dim, hidden=128, depth=3)
        self.token_dim = 2


def bench_head(steps: int = 4000) -> None:
    data = two_class_mixture()
    gen = torch.Generator().manual_seed(0)
    x, y = data.sample_labelled(20000, generator=gen)
    model = _ClassHead(data.num_classes)

    def loss(m, batch, g):
        xb, yb = batch
        return diffusion_loss(m.head, xb.float(), m.embed(yb), PATH, repeats=4, generator=g)

    start = time.perf_counter()
    res = train(model, loss, (x.float(), y), TrainConfig(steps=steps, batch_size=256, lr=2e-3),
                generator=torch.Generator().manual_seed(0), progress=False)
    print(f"head trained {steps} steps in {time.perf_counter() - start:.0f} s (final loss "
          f"{sum(res.losses[-200:]) / 200:.4f})")
    m = res.ema_model.eval()
    n = 2000
    print("| class | head steps | MMD / floor | sliced W2 / floor |")
    print("|-------|------------|-------------|-------------------|")
    for c in range(data.num_classes):
        ref = make_reference(data.condition(c), n, generator=torch.Generator().manual_seed(10 + c))
        for k in (20, 50, 100, 200, 400):
            with torch.no_grad():
                z = m.embed(torch.full((4 * n,), c))
                samples = sample_head(m.head, z, torch.linspace(1, 0, k + 1), path=PATH,
                                      generator=torch.Generator().manual_seed(c))
            q = sample_quality(samples.double(), ref)
            print(f"| {c} | {k} | {q.mmd_ratio:.2f} ± {q.mmd_ratio_se:.2f} | {q.sw_ratio:.2f} ± {q.sw_ratio_se:.2f} |",
                  flush=True)


# ---- MAR against raster AR and latent diffusion at equal minutes --------------------------------
def _train_for(name: str, minutes: float):
    """Recipe ``name`` trained from scratch for ``minutes`` of CPU time (encoding included)."""
    recipe = get_recipe(name)
    kind = KINDS[recipe.kind]
    data = load_mnist("train", verbose=False)

    def fresh():
        torch.manual_seed(recipe.seed)
        model = build_model(recipe)
        context = kind.prepare(recipe, model, None, False)
        return model, context, kind.dataset(recipe, data.images, data.labels, context)

    model, context, tensors = fresh()
    probe = train(model, recipe_loss(recipe, model, context), tensors, TrainConfig(steps=15, batch_size=128,
                  lr=recipe.lr), generator=torch.Generator().manual_seed(5), progress=False)
    model, context, tensors = fresh()
    steps = max(1, int((minutes * 60 - context.get("encode_seconds", 0.0)) / (probe.seconds / 15)))
    res = train(model, recipe_loss(recipe, model, context), tensors,
                TrainConfig(steps=steps, batch_size=128, lr=recipe.lr, ema_decay=recipe.ema_decay),
                generator=torch.Generator().manual_seed(recipe.seed), progress=False)
    return res.ema_model.eval(), steps, res.seconds + context.get("encode_seconds", 0.0)


def _quality(model, name, classifier, held_out) -> dict:
    labels = torch.arange(10).repeat_interleave(100)
    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    if name.startswith("mnist_mar"):
        samples = model.sample(labels, generator=gen, **mar_settings(get_recipe(name)))
    else:
        samples = sample_classes(model, labels, w=1.0, nfe=20, generator=gen)
    seconds = time.perf_counter() - start
    q = evaluate_class_conditional(classifier, samples, labels, held_out, per_class_fd=50,
                                   generator=torch.Generator().manual_seed(1)).as_dict()
    q["tokens_per_second"] = 1000 * 49 / seconds
    return q


def bench_mar(minutes: float) -> None:
    classifier, held_out = load("mnist_classifier"), load_mnist("test", verbose=False)
    print("| model | CPU minutes (steps) | sampling | class accuracy | MNIST-FD | FD floor | FD / floor | "
          "diversity | tokens / s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, how in (("mnist_mar", "16 AR steps, 20 head steps, w = 1"),
                      ("mnist_mar_raster", "49 AR steps, 20 head steps, w = 1"),
                      ("mnist_latent_cfm", "20 Euler steps, w = 1")):
        model, steps, seconds = _train_for(name, minutes)
        q = _quality(model, name, classifier, held_out)
        print(f"| {name} | {seconds / 60:.1f} ({steps}) | {how} | {q['class_accuracy']:.3f} | {q['mnist_fd']:.2f} | "
              f"{q['mnist_fd_floor']:.2f} | {q['mnist_fd'] / q['mnist_fd_floor']:.2f} | {q['diversity']:.3f} | "
              f"{q['tokens_per_second']:.0f} |", flush=True)


def bench_mar_sweep() -> None:
    model = load("mnist_mar")
    classifier, held_out = load("mnist_classifier"), load_mnist("test", verbose=False)
    labels = torch.arange(10).repeat_interleave(100)
    print("| AR steps | head steps | w | temperature | class accuracy | MNIST-FD | FD / floor | diversity | tokens / s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for steps, head, w, tau in ((16, 20, 1.0, 0.5), (16, 20, 1.0, 0.75), (16, 20, 1.0, 1.0), (16, 20, 1.0, 1.25),
                                (16, 20, 1.0, 1.5), (16, 50, 1.0, 1.0), (8, 20, 1.0, 1.0), (4, 20, 1.0, 1.0),
                                (32, 20, 1.0, 1.0), (16, 20, 0.0, 1.0), (16, 20, 0.5, 1.0), (16, 20, 2.0, 1.0)):
        gen = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        samples = model.sample(labels, steps=steps, guidance=w, temperature=tau, head_steps=head, generator=gen)
        seconds = time.perf_counter() - start
        q = evaluate_class_conditional(classifier, samples, labels, held_out, per_class_fd=50,
                                       generator=torch.Generator().manual_seed(1)).as_dict()
        print(f"| {steps} | {head} | {w:g} | {tau:g} | {q['class_accuracy']:.3f} | {q['mnist_fd']:.2f} | "
              f"{q['mnist_fd'] / q['mnist_fd_floor']:.2f} | {q['diversity']:.3f} | {1000 * 49 / seconds:.0f} |",
              flush=True)


# ---- Diffusion Forcing ---------------------------------------------------------------------------
def bench_df() -> None:
    held_out = pendulum_data("test", verbose=False)
    print("| model | schedule | chunk | stabilisation | energy error in horizon | last quarter | ratio | "
          "radius error (last quarter) | distance in horizon | last quarter |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    models = {name: load(name) for name in ("pendulum_df", "pendulum_tf")}
    for name, model in models.items():
        own = df_settings(get_recipe(name))
        variants = [own] + [dict(own, **v) for v in (
            {"schedule": "pyramid", "chunk": 8, "stabilization": 0.02},
            {"schedule": "autoregressive", "chunk": 1, "stabilization": 0.0},
            {"schedule": "autoregressive", "chunk": 1, "stabilization": 0.05},
            {"schedule": "full_sequence", "chunk": 8, "stabilization": 0.02}) if dict(own, **v) != own]
        for settings in variants:
            m = rollout_metrics(model, held_out, generator=torch.Generator().manual_seed(1), **settings)
            mark = " (recipe)" if settings == own else ""
            print(f"| {name}{mark} | {settings['schedule']} | {settings['chunk']} | {settings['stabilization']:g} | "
                  f"{m['energy_error_in_horizon']:.4f} | {m['energy_error_last_quarter']:.4f} | "
                  f"{m['energy_error_ratio']:.2f} | {m['radius_error_last_quarter']:.4f} | "
                  f"{m['distance_in_horizon']:.3f} | {m['distance_last_quarter']:.3f} |", flush=True)
    bench_goal(models["pendulum_df"])


def bench_goal(model, n: int = 200, ahead: int = 8, x_goal: float = 0.3, scale: float = 0.5) -> None:
    """From one observed token, reach x > x_goal ``ahead`` tokens later: the fraction of rollouts
    that do, with and without guidance, and the energy spread along them."""
    pos, _ = simulate_pendulum(n, 1, dt=PENDULUM_DT, max_energy=1.6, generator=torch.Generator().manual_seed(7))
    context = pos.float()

    def cost(window):  # hinge on the bob's x at the goal token
        return torch.relu(x_goal + 0.1 - window[:, ahead, 0]).pow(2)

    print()
    print(f"| guidance | rollouts reaching x > {x_goal} at token {ahead} | energy spread along the rollout (sd) |")
    print("|---|---|---|")
    for s in (0.0, scale):
        out = sample_diffusion_forcing(model, context, ahead + 4, path=PATH, steps=20, schedule="pyramid", chunk=8,
                                       stabilization=0.02, generator=torch.Generator().manual_seed(2),
                                       guidance=cost if s else None, guidance_scale=s)
        hit = (out[:, ahead, 0] > x_goal).double().mean().item()
        spread = pendulum_energy(out.double(), PENDULUM_DT).std(dim=1).mean().item()
        print(f"| {s:g} | {hit:.1%} | {spread:.4f} |", flush=True)


def bench_df_noise(steps: int) -> None:
    from dataclasses import replace

    from course.recipe_registry import RECIPES

    held_out = pendulum_data("test", verbose=False)
    train_data = pendulum_data("train", verbose=False)
    base = get_recipe("pendulum_df")
    print("| monotone share | steps | train s | energy error in horizon | last quarter | ratio | distance in horizon |")
    print("|---|---|---|---|---|---|---|")
    for share in (0.0, 0.5):
        options = tuple((k, share if k == "monotone_share" else v) for k, v in base.options)
        recipe = replace(base, name=f"pendulum_df_share_{share:g}", options=options)
        RECIPES[recipe.name] = recipe
        torch.manual_seed(recipe.seed)
        model = build_model(recipe)
        res = train(model, recipe_loss(recipe, model, {}), (train_data.images,),
                    TrainConfig(steps=steps, batch_size=recipe.batch_size, lr=recipe.lr),
                    generator=torch.Generator().manual_seed(recipe.seed), progress=False)
        m = rollout_metrics(res.ema_model.eval(), held_out, generator=torch.Generator().manual_seed(1),
                            **df_settings(recipe))
        print(f"| {share:g} | {steps} | {res.seconds:.0f} | {m['energy_error_in_horizon']:.4f} | "
              f"{m['energy_error_last_quarter']:.4f} | {m['energy_error_ratio']:.2f} | {m['distance_in_horizon']:.3f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", action="store_true")
    parser.add_argument("--mar", type=float, default=None, metavar="MINUTES")
    parser.add_argument("--mar-sweep", action="store_true")
    parser.add_argument("--df", action="store_true")
    parser.add_argument("--df-noise", type=int, default=None, metavar="STEPS")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.head:
        bench_head()
    if args.mar:
        bench_mar(args.mar)
    if args.mar_sweep:
        bench_mar_sweep()
    if args.df:
        bench_df()
    if args.df_noise:
        bench_df_noise(args.df_noise)


if __name__ == "__main__":
    main()
