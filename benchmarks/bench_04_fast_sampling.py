"""Chapters 03-04 benchmark: likelihood cost, and sample quality against NFE for every sampler.

Usage:  python benchmarks/bench_04_fast_sampling.py [--n 10000] [--repeats 3]

1. Time of the exact-divergence log-likelihood of 1 000 2-D points (8-mode mixture, VP SDE),
   with the exact score and with a score network trained for 20 s, and the error against the
   closed form (exact score) or the NLL gap to the true density (network).
2. Quality (MMD with bandwidth 0.1 over its exact noise floor, mean ± standard error over
   --repeats independent sets of --n samples) against NFE for reverse EM, PC, DDPM, Euler, Heun,
   DDIM, DPM-Solver-2 and DPM-Solver++(2M) with the exact score on the quadratic grid (and
   DPM-Solver++(2M) on the power-2.5 grid), beside 1000-step reverse EM; the fewest NFE that comes
   within 1.2x of that reference, and the speedup factor 1000 / NFE.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from course.conversions import as_score_fn
from course.fast_samplers import (
    sample_ddim,
    sample_ddpm,
    sample_dpm_solver_2,
    sample_dpm_solver_pp_2m,
    sampling_grid,
)
from course.losses import dsm_loss
from course.metrics import mmd_floor, mmd_rbf
from course.nets import TimeMLP
from course.ode import log_likelihood, sample_ode_euler, sample_ode_heun
from course.samplers import CountingScore, sample_pc
from course.sde import VPSDE
from course.toy_data import eight_gaussians, oracle_score
from course.training import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    sde, data = VPSDE(), eight_gaussians()
    score = oracle_score(data, sde)

    x = data.sample(1000, generator=gen).double()
    truth = data.perturbed_log_prob(x, 1e-3, sde)
    start = time.perf_counter()
    res = log_likelihood(score, x, sde=sde, t_min=1e-3)
    print(f"likelihood of 1000 points, exact score, exact divergence: {time.perf_counter() - start:.1f} s, "
          f"{res.nfe} NFE, max |error| vs closed form {(res.log_prob - truth).abs().max():.1e} nats")
    torch.manual_seed(0)
    net = TimeMLP()
    trained = train(net, lambda m, b, g: dsm_loss(m, b, sde, generator=g), data.sample,
                    TrainConfig(steps=100_000, ema_decay=0.995, time_limit=20.0), generator=gen)
    learned = as_score_fn(trained.ema_model.double(), sde)
    start = time.perf_counter()
    with torch.no_grad():
        res = log_likelihood(learned, x, sde=sde, t_min=1e-3, rtol=1e-5, atol=1e-5)
    gap = truth - res.log_prob
    print(f"likelihood of 1000 points, network ({trained.steps} steps, {trained.seconds:.0f} s of training): "
          f"{time.perf_counter() - start:.1f} s, {res.nfe} NFE, NLL gap {gap.mean():.3f} ± "
          f"{gap.std() / math.sqrt(1000):.3f} nats\n")

    n, r = args.n, args.repeats
    refs = [data.sample(n, generator=gen) for _ in range(r)]
    floor = mmd_floor(data, n)

    def run(name, nfe, x_init):
        counter = CountingScore(score)
        grid = lambda k: sampling_grid(k, path=sde, kind="quadratic")  # noqa: E731
        if name == "reverse EM":
            out = sample_pc(counter, x_init, grid(nfe), sde=sde, predictor="euler_maruyama",
                            corrector_steps=0, generator=gen)
        elif name == "PC (EM + Langevin)":
            out = sample_pc(counter, x_init, grid(max(nfe // 2, 1)), sde=sde, predictor="euler_maruyama",
                            corrector_steps=1, snr=0.1, generator=gen)
        elif name == "DDPM (ancestral)":
            out = sample_ddpm(counter, x_init, grid(nfe), path=sde, generator=gen)
        elif name == "Euler (ODE)":
            out = sample_ode_euler(counter, x_init, grid(nfe), sde=sde)
        elif name == "Heun (ODE)":
            out = sample_ode_heun(counter, x_init, grid(max(nfe // 2, 1)), sde=sde)
        elif name == "DDIM":
            out = sample_ddim(counter, x_init, grid(nfe), path=sde)
        elif name == "DPM-Solver-2":
            out = sample_dpm_solver_2(counter, x_init, grid(max(nfe // 2, 1)), path=sde)
        elif name == "DPM-Solver++(2M)":
            out = sample_dpm_solver_pp_2m(counter, x_init, grid(nfe), path=sde)
        else:  # DPM-Solver++(2M) on the power-2.5 grid
            out = sample_dpm_solver_pp_2m(counter, x_init, sampling_grid(nfe, path=sde, kind="power", power=2.5),
                                          path=sde)
        ratios = torch.tensor([mmd_rbf(a, b) / floor for a, b in zip(out.split(n), refs, strict=True)])
        return counter.calls, ratios.mean().item(), ratios.std().item() / math.sqrt(r)

    x_init = torch.randn(n * r, 2, generator=gen)
    ref_nfe, ref_q, ref_se = run("reverse EM", 1000, x_init)
    print(f"reference: reverse EM, {ref_nfe} NFE: MMD / floor {ref_q:.2f} ± {ref_se:.2f} "
          f"(n = {n} per set, {r} sets, quadratic grid, t_min = 1e-3)")
    print("Cells: MMD / floor, mean ± SE; the NFE actually used is given in brackets where a sampler's "
          "step costs two evaluations and the column's NFE is odd.\n")
    nfes = [5, 10, 20, 50, 100, 1000]
    names = ["reverse EM", "PC (EM + Langevin)", "DDPM (ancestral)", "Euler (ODE)", "Heun (ODE)", "DDIM",
             "DPM-Solver-2", "DPM-Solver++(2M)", "DPM-Solver++(2M), power-2.5 grid"]
    print("| sampler                          | " + " | ".join(f"NFE {k:<13}" for k in nfes)
          + " | fewest NFE within 1.2x EM-1000 | speedup |")
    print("|" + "-" * 34 + "|" + "|".join("-" * 19 for _ in nfes) + "|" + "-" * 32 + "|" + "-" * 9 + "|")
    for name in names:
        cells, first = [], None
        for k in nfes:
            calls, q, se = run(name, k, x_init)
            cells.append(f"{q:6.2f} ± {se:4.2f}" + (f" ({calls})" if calls != k else "").ljust(5))
            if first is None and q <= 1.2 * ref_q:
                first = calls
        verdict = (f"{first:>30} | {ref_nfe / first:6.0f}x" if first else f"{'not reached':>30} | {'-':>7}")
        print(f"| {name:<32} | " + " | ".join(cells) + f" | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
