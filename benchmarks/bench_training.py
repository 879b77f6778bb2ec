"""Training beyond one CPU process: steps per second on 1 and 2 processes, and recipes on a GPU.

Usage (COURSE_OFFLINE=1 for the offline MNIST digits):
    python benchmarks/bench_training.py --cpu-processes            # mnist_cfm_unet, 60 steps, 3 ways (~3 min)
    python benchmarks/bench_training.py --gpu [NAME ...]           # shipped recipes on CUDA (needs a GPU)

--cpu-processes: ``course train NAME --steps N`` in one process, the same under ``torchrun
--nproc_per_node=2`` (gloo, DDP, each process one thread of the machine's cores) and in one
process drawing the same two shards (``--shards 2``, the equivalent of the two processes); steps
per second from the manifest's training time (data loading and measuring excluded).

--gpu: each recipe trained in full with ``course train NAME --device cuda`` (bf16 autocast where
supported) into a scratch folder, in dependency order (the classifiers first, teachers before
students), so nothing but the code is needed; the table gives the training time on the GPU, the
shipped checkpoint's training time on the CPU (its manifest entry) and both runs' headline metric.
Recipes that do not finish within --budget minutes are left out and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "manifest.json"
GPU_ORDER = ("mnist_classifier", "mnist_cfm_unet", "mnist_autoencoder", "mnist_latent_cfm", "mnist_noisy_classifier",
             "mnist_dit", "mnist_add", "mnist_gan", "mnist_mar")
HEADLINE = ("held_out_accuracy", "held_out_accuracy_t0", "accuracy_on_reconstructions", "class_accuracy", "mnist_fd")


def _train(name: str, out: Path, *extra: str, processes: int = 1, timeout: float = 1800) -> tuple[dict, float]:
    """Run ``course train`` and return its manifest entry and the command's wall time."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "course.cli", "train", name, "--out", str(out), *extra]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "course.cli", "train", name, "--out", str(out), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    return json.loads((out / "manifest.json").read_text())[name], wall


def _headline(metrics: dict) -> str:
    if isinstance(metrics.get("1_step"), dict):  # a one-step student: its 1-step row
        metrics = metrics["1_step"]
    parts = [f"{key} {metrics[key]:.4g}" for key in HEADLINE if isinstance(metrics.get(key), (int, float))]
    return ", ".join(parts) or "-"


def cpu_processes(name: str, steps: int) -> None:
    import torch

    print(f"{name}, {steps} steps, {os.cpu_count()} CPU cores, torch {torch.__version__}, {platform.machine()}")
    print("| run | processes | shards | threads per process | steps / s | training s | command s |")
    print("|---|---|---|---|---|---|---|")
    rows = (("one process", 1, ()), ("torchrun, 2 processes (gloo)", 2, ()), ("one process, 2 shards", 1, ("--shards", "2")))
    for label, processes, extra in rows:
        with tempfile.TemporaryDirectory() as tmp:
            entry, wall = _train(name, Path(tmp), "--device", "cpu", "--fast", "--steps", str(steps), *extra,
                                 processes=processes)
        threads = entry["machine"].split(", ")[1]
        print(f"| {label} | {processes} | {2 if extra or processes == 2 else 1} | {threads} | "
              f"{entry['steps'] / entry['train_seconds']:.2f} | {entry['train_seconds']:.1f} | {wall:.1f} |")


def gpu(names: list[str], budget_minutes: float, table: Path | None) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU; this PyTorch sees none")
    shipped = json.loads(SHIPPED.read_text())
    lines = [f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {os.cpu_count()} CPU cores (metrics on "
             "the CPU); the CPU column is the shipped checkpoint's manifest (2 CPU cores)",
             "| recipe | steps | GPU training s | steps / s | precision | CPU training s (shipped) | speed-up | "
             "metric, GPU run | metric, shipped |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if time.perf_counter() - start > 60 * budget_minutes:
                lines.append(f"| {name} | not run: the {budget_minutes:g}-minute budget was spent | | | | | | | |")
            else:
                try:
                    entry, _ = _train(name, Path(tmp), "--device", "cuda")
                    cpu = shipped.get(name, {})
                    cpu_s = cpu.get("train_seconds")
                    speed = f"{cpu_s / entry['train_seconds']:.1f}x" if cpu_s else "-"
                    lines.append(
                        f"| {name} | {entry['steps']} | {entry['train_seconds']:.1f} | "
                        f"{entry['steps'] / entry['train_seconds']:.1f} | {entry.get('training', {}).get('precision')} | "
                        f"{cpu_s if cpu_s is not None else '-'} | {speed} | "
                        f"{_headline(entry['metrics'])} | {_headline(cpu.get('metrics', {}))} |")
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    lines.append(f"| {name} | failed: {str(exc)[-400:]!r} | | | | | | | |")
            print(lines[-1], flush=True)
            if table is not None:
                table.write_text("\n".join(lines) + "\n")
        if table is not None and (Path(tmp) / "manifest.json").exists():
            shutil.copy(Path(tmp) / "manifest.json", table.with_suffix(".manifest.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-processes", action="store_true")
    parser.add_argument("--recipe", default="mnist_cfm_unet")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--gpu", nargs="*", default=None, metavar="NAME")
    parser.add_argument("--budget", type=float, default=6.5, help="minutes after which --gpu starts no recipe")
    parser.add_argument("--table", type=Path, default=None, help="--gpu: also write the table here as it grows")
    args = parser.parse_args()
    if args.cpu_processes:
        cpu_processes(args.recipe, args.steps)
    if args.gpu is not None:
        gpu(args.gpu or list(GPU_ORDER), args.budget, args.table)
    if not args.cpu_processes and args.gpu is None:
        parser.print_help()


if __name__ == "__main__":
    main()
