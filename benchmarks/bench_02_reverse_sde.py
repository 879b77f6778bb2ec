"""Chapter 02 benchmark: sample quality, NFE and time of reverse-time samplers on the 8-mode mixture.

Usage:  python benchmarks/bench_02_reverse_sde.py [--n 10000] [--repeats 10] [--train-seconds 60]

Prints one table: every row is a sampler with either the exact (oracle) score or a score network
trained here for at most --train-seconds on this machine. Each sampler draws --repeats
independent sets of --n samples; set j is compared with an independent true set j by

- MMD^2 with a Gaussian kernel of bandwidth 0.1 (the width of each mode), whose noise floor,
  the expected MMD between two independent true sets, is exact for the mixture; and
- sliced W2 (512 directions), whose floor is estimated on --repeats pairs of true sets.

Ratios to the floor come with standard errors over the sets. (Sliced W2, like the energy
distance, is dominated by the random number of samples per mode, so its floor varies by ~30%
between draws; the local MMD varies by ~17% and sees a 4% blur of the modes.) Also the
mode-weight error (mean over sets), the NFE and the wall time.

Targets (issue "Chapter 02"): oracle PC sampler within 1.1x the floor, a score network trained
for at most 60 s within 1.5x, mode-weight error <= 0.02.
"""

from __future__ import annotations

import argparse
import time

import torch

from course.conversions import as_score_fn
from course.losses import dsm_loss
from course.metrics import make_reference, sample_quality
from course.nets import TimeMLP
from course.samplers import CountingScore, sample_pc, sample_vp_pc_algorithm3, time_grid
from course.sde import VPSDE
from course.toy_data import eight_gaussians, oracle_score
from course.training import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(args.seed)
    data, sde = eight_gaussians(), VPSDE()
    ref = make_reference(data, args.n, repeats=args.repeats, generator=gen)
    print(f"8-mode mixture, n = {args.n} per set, {args.repeats} sets, VP SDE; noise floors: "
          f"MMD {ref.mmd_floor.mean:.3g} (exact), SW2 {ref.sw_floor}")

    torch.manual_seed(args.seed)
    net = TimeMLP(hidden=128, depth=3)
    cfg = TrainConfig(steps=40_000, batch_size=512, lr=2e-3, ema_decay=0.999,
                      time_limit=args.train_seconds)
    result = train(net, lambda m, x, g: dsm_loss(m, x, sde, generator=g), data.sample, cfg,
                   generator=gen)
    print(f"score network: TimeMLP 128x3, {sum(p.numel() for p in net.parameters())} parameters, "
          f"trained {result.steps} steps in {result.seconds:.1f} s (limit {args.train_seconds:g} s)")
    learned = as_score_fn(result.ema_model, sde, "eps")
    oracle = oracle_score(data, sde)

    rows = [
        ("oracle", "reverse EM, 1000 steps", lambda s, x: sample_pc(s, x, time_grid(1000), sde=sde,
                                                         predictor="euler_maruyama", corrector_steps=0, generator=gen)),
        ("oracle", "PC (RD + 1 Langevin, snr .1), 500", lambda s, x: sample_pc(
            s, x, time_grid(500), sde=sde, corrector_steps=1, snr=0.1, generator=gen)),
        ("oracle", "Algorithm 3 (N=500, M=1)", lambda s, x: sample_vp_pc_algorithm3(
            s, x, 500, sde=sde, corrector_steps=1, snr=0.1, generator=gen)),
        ("oracle", "reverse EM, 100 steps", lambda s, x: sample_pc(s, x, time_grid(100), sde=sde,
                                                                   predictor="euler_maruyama", corrector_steps=0, generator=gen)),
        ("learned", "reverse EM, 500 steps", lambda s, x: sample_pc(s, x, time_grid(500), sde=sde,
                                                                    predictor="euler_maruyama", corrector_steps=0, generator=gen)),
        ("learned", "PC (RD + 1 Langevin, snr .1), 250", lambda s, x: sample_pc(
            s, x, time_grid(250), sde=sde, corrector_steps=1, snr=0.1, generator=gen)),
        ("learned", "reverse EM, 100 steps", lambda s, x: sample_pc(s, x, time_grid(100), sde=sde,
                                                                    predictor="euler_maruyama", corrector_steps=0, generator=gen)),
    ]
    header = ("| score   | sampler                            |  NFE |  MMD / floor | SW2 / floor "
              "| mode err | time s |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for score_name, name, run in rows:
        counter = CountingScore(oracle if score_name == "oracle" else learned)
        x_init = sde.prior_sample((args.n * args.repeats, 2), generator=gen)
        start = time.perf_counter()
        with torch.no_grad():
            x = run(counter, x_init)  # all sets in one batch: NFE counts calls, not samples
        seconds = time.perf_counter() - start
        q = sample_quality(x, ref)
        print(f"| {score_name:<7} | {name:<34} | {counter.calls:>4} | "
              f"{q.mmd_ratio:4.2f} ± {q.mmd_ratio_se:4.2f}  | {q.sw_ratio:4.2f} ± {q.sw_ratio_se:4.2f} "
              f"| {q.mode_error:.4f}   | {seconds:6.1f} |", flush=True)


if __name__ == "__main__":
    main()
