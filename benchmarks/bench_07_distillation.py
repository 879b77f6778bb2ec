"""Chapter 07 benchmark on the 8-mode mixture: how much quality one- and few-step models keep
against the exact-score teacher at the same NFE.

Usage:  python benchmarks/bench_07_distillation.py [--steps 3000] [--n 2000] [--seed 0]

Everything uses the linear (rectified-flow) path and the exact marginal velocity of the mixture
(``oracle_velocity``) as the teacher, so the only error left in a student is its own.

1. Teacher rows: Euler (= DDIM on this path) on a power-2 grid ending at t = 0, and DPM-Solver++(2M)
   on the power-2.5 grid of chapter 04 (started at t = 0.999: its data prediction divides by alpha,
   which is 0 at t = 1), at 1, 2, 4, 8 and 20 NFE.
2. Consistency distillation (CD): ``ConsistencyFunction`` (EDM coefficients, sigma_data = data std) on
   a TimeMLP 256x4, teacher = one Heun step of the exact field on the 18-time rho = 7 grid, EMA target
   mu = 0.95, squared L2; --steps Adam steps of batch 512. Also the oracle check: the mean distance
   of f_theta(x_t, t) to the exact consistency function (an RK45 solve of the exact field), over
   x_t ~ p_t, at grid times, over the data's std.
3. Consistency training (CT, iCT): the same network, no teacher, pseudo-Huber, lognormal steps,
   1 / dt weights, stop-gradient target, doubling curriculum N = 11 -> 81 over the run.
4. Progressive distillation (PD): the exact x0 teacher on 32 power-2 steps, then students with
   16 -> 8 -> 4 -> 2 -> 1 steps (TimeMLP 256x4 velocity models, each initialised from the last;
   the first round takes 2x the steps of the others).
5. MeanFlow from scratch: TimeMLP 256x4 with an interval embedding, --steps steps.
6. Shortcut models from scratch (Frans et al. 2024): the same network and steps, flow matching on 3/4
   of each batch and the two-half-steps target on 1/4 (step sizes 1/2 .. 1/128); sampled in 1, 2, 4
   uniform steps like MeanFlow (the two learn the same average velocity by different identities).
Multistep consistency sampling uses a second time on the training grid (a CD/CT model is trained
only at grid times), chosen on a validation reference set, reported on an independent one.
Quality: MMD (bandwidth 0.1) and sliced W2 of --n samples, each over its noise floor.

Targets (issue "Chapter 07"): CD 1-step <= 3x the floor, 2-step <= 2x (MMD or sliced W2).
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
    consistency_training_loss,
    ct_num_steps,
    exact_consistency_function,
    lognormal_step_probs,
    sample_consistency,
)
from course.conversions import as_prediction_fn
from course.distillation import progressive_distillation_loss, sample_ddim_x0, student_grid
from course.fast_samplers import sample_dpm_solver_pp_2m, sampling_grid
from course.flow_matching import oracle_velocity
from course.meanflow import meanflow_loss, sample_meanflow
from course.metrics import make_reference, sample_quality
from course.nets import TimeMLP
from course.paths import LinearPath
from course.shortcut import shortcut_loss
from course.toy_data import eight_gaussians, oracle_score
from course.training import TrainConfig, train

T_MIN, BATCH, LR = 1e-3, 512, 2e-3
PATH, DATA = LinearPath(), eight_gaussians()


def mlp(interval: bool = False) -> TimeMLP:
    return TimeMLP(2, hidden=256, depth=4, interval=interval)


def fit(model, loss_fn, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    res = train(model, loss_fn, lambda n, generator: DATA.sample(n, generator=generator),
                TrainConfig(steps=steps, batch_size=BATCH, lr=LR), generator=gen)
    return res.ema_model, res.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    val_ref = make_reference(DATA, args.n, generator=torch.Generator().manual_seed(100 + args.seed))
    ref = make_reference(DATA, args.n, generator=torch.Generator().manual_seed(200 + args.seed))
    x1 = torch.randn(args.n, 2, generator=torch.Generator().manual_seed(300 + args.seed))
    velocity = oracle_velocity(DATA, PATH)
    rows = []

    def row(method, nfe, x, seconds=0.0, note=""):
        q = sample_quality(x, ref)
        rows.append((method, nfe, q.mmd_ratio, q.sw_ratio, seconds, note))
        print(f"{method:<34} {nfe:>3}  MMD {q.mmd_ratio:6.2f}x  SW2 {q.sw_ratio:5.2f}x  {seconds:6.1f} s  {note}",
              flush=True)

    # 1. the exact teacher at few NFE
    oracle_x0 = as_prediction_fn(velocity, PATH, "velocity", "x0")
    score = oracle_score(DATA, PATH)
    for nfe in (1, 2, 4, 8, 20):
        row("teacher Euler (exact field)", nfe,
            sample_ddim_x0(oracle_x0, x1, sampling_grid(nfe, kind="quadratic", t_min=0.0), path=PATH))
        grid = sampling_grid(nfe, kind="power", power=2.5, t_max=0.999)
        row("teacher DPM-Solver++(2M) (exact)", nfe, sample_dpm_solver_pp_2m(score, x1, grid, path=PATH))

    sigma_data = float(DATA.sample(20_000, generator=torch.Generator().manual_seed(1)).std())
    cd_grid = consistency_grid(18, t_min=T_MIN)

    def consistency_rows(name, f, seconds, grid):
        with torch.no_grad():
            row(name, 1, sample_consistency(f, x1, torch.tensor([1.0]), path=PATH, t_min=T_MIN), seconds)
            best = min(grid[1:-1].tolist(), key=lambda tau: sample_quality(sample_consistency(
                f, x1, torch.tensor([1.0, tau]), path=PATH, t_min=T_MIN, generator=torch.Generator().manual_seed(5)),
                val_ref).mmd_ratio)
            x = sample_consistency(f, x1, torch.tensor([1.0, best]), path=PATH, t_min=T_MIN,
                                   generator=torch.Generator().manual_seed(6))
            row(name, 2, x, seconds, f"second time {best:.3f}")

    # 2. consistency distillation with the exact teacher
    f = ConsistencyFunction(mlp(), PATH, t_min=T_MIN, sigma_data=sigma_data)
    target = EMATarget(f, mu=0.95)

    def cd_loss(model, batch, g):
        target.update(model)
        return consistency_distillation_loss(model, target, velocity, batch, cd_grid, path=PATH, solver="heun",
                                             generator=g)

    cd, seconds = fit(f, cd_loss, args.steps, args.seed)
    consistency_rows("consistency distillation", cd, seconds, cd_grid)
    x0 = DATA.sample(1000, generator=torch.Generator().manual_seed(7))
    print("oracle check (CD): mean |f_theta - f*| / data std at grid times:")
    for t in cd_grid[[6, 10, 13, 15, 17]].tolist():
        x_t = PATH.sample(x0, t, generator=torch.Generator().manual_seed(8)).x_t
        exact = exact_consistency_function(velocity, x_t, t, t_min=T_MIN, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            err = (cd(x_t, torch.full((1000,), t)) - exact).norm(dim=1).mean().item()
        print(f"  t = {t:.3f}: {err / sigma_data:.4f}")

    # 3. consistency training (improved techniques), no teacher
    f = ConsistencyFunction(mlp(), PATH, t_min=T_MIN, sigma_data=sigma_data)
    step = {"k": 0}

    def ct_loss(model, batch, g):
        n = ct_num_steps(step["k"], args.steps, s0=10, s1=80)
        step["k"] += 1
        grid = consistency_grid(n, t_min=T_MIN)
        return consistency_training_loss(model, batch, grid, path=PATH, step_probs=lognormal_step_probs(grid, PATH),
                                         generator=g)

    ct, seconds = fit(f, ct_loss, args.steps, args.seed)
    consistency_rows("consistency training (iCT)", ct, seconds, consistency_grid(81, t_min=T_MIN))

    # 4. progressive distillation ladder from the exact teacher
    teacher_x0, student, total = oracle_x0, mlp(), 0.0
    for k, n in enumerate((16, 8, 4, 2, 1)):
        grid = sampling_grid(2 * n, kind="quadratic", t_min=0.0)

        def pd_loss(model, batch, g, teacher_x0=teacher_x0, grid=grid):
            return progressive_distillation_loss(as_prediction_fn(model, PATH, "velocity", "x0"), teacher_x0, batch,
                                                 grid, path=PATH, generator=g)

        student, seconds = fit(student, pd_loss, args.steps // 2 * (2 if k == 0 else 1), args.seed + k)
        total += seconds
        teacher_x0 = as_prediction_fn(student, PATH, "velocity", "x0")  # the next round's teacher
        with torch.no_grad():
            row("progressive distillation", n, sample_ddim_x0(teacher_x0, x1, student_grid(grid), path=PATH), total,
                f"round {k + 1}")
        student = copy.deepcopy(student)  # the next student starts from its teacher

    # 5. MeanFlow from scratch
    mf, seconds = fit(mlp(interval=True), lambda m, b, g: meanflow_loss(m, b, PATH, generator=g), args.steps,
                      args.seed)
    for nfe in (1, 2, 4):
        row("MeanFlow", nfe, sample_meanflow(mf, x1, torch.linspace(1, 0, nfe + 1)), seconds)

    # 6. shortcut models from scratch: the same network and budget, the self-consistency target
    sc, seconds = fit(mlp(interval=True), lambda m, b, g: shortcut_loss(m, b, PATH, generator=g), args.steps,
                      args.seed)
    for nfe in (1, 2, 4):
        row("shortcut model", nfe, sample_meanflow(sc, x1, torch.linspace(1, 0, nfe + 1)), seconds)

    print("\nmethod                             NFE  MMD/floor  SW2/floor  train s")
    for method, nfe, mmd, sw, seconds, note in rows:
        print(f"{method:<34} {nfe:>3}  {mmd:9.2f}  {sw:9.2f}  {seconds:7.1f}  {note}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
