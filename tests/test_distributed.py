"""Training beyond one process: device choice, shards, DDP over gloo, bf16 autocast, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import course.recipes  # noqa: F401  (registers the recipes)
from course import distributed
from course.distributed import Distributed, backend_for, resolve_device, shard_seed
from course.gan import AdaptiveT
from course.recipe_registry import _context_state, _restore_context, run_recipe, state_path_for
from course.training import TrainConfig, train

ENV = {**os.environ, "COURSE_OFFLINE": "1", "COURSE_FAST": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _noisy_regression():
    """y = 3 x + noise: the loss draws from the generator, the global torch RNG and Python's random,
    so a resumed run only matches if every one of them is restored."""
    import random

    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))

    def loss_fn(m, batch, generator):
        x, y = batch
        jitter = 0.01 * torch.randn(x.shape, generator=generator) + 0.01 * torch.randn(x.shape) + 0.01 * random.random()
        return (m(x + jitter) - y).pow(2).mean()

    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 1, generator=g)
    return model, loss_fn, (x, 3 * x)


def _fresh(seed=0):
    import random

    torch.manual_seed(seed)
    random.seed(seed)
    return _noisy_regression()


# ---- devices, backends, seeds ------------------------------------------------------------------------
def test_resolve_device_and_backend():
    assert resolve_device("cpu") == torch.device("cpu")
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    with pytest.raises(ValueError, match="expected a device"):
        resolve_device("gpu please")
    with pytest.raises(ValueError, match="expected a cpu, cuda or mps device"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU; use --device cpu"):
            resolve_device("cuda")


def test_shard_seeds_keep_one_shard_unchanged_and_differ_otherwise():
    assert shard_seed(7, 0, 1) == 7
    seeds = [shard_seed(7, s, 4) for s in range(4)]
    assert len(set(seeds)) == 4 and 7 not in seeds
    with pytest.raises(ValueError, match="0 <= shard < shards"):
        shard_seed(7, 2, 2)


def test_init_without_torchrun_is_one_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info, device = distributed.init("cpu")
    assert info == distributed.SINGLE and device == torch.device("cpu") and distributed.is_main()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK < WORLD_SIZE"):
        distributed.init("cpu")


# ---- shards in one process ---------------------------------------------------------------------------
def test_shards_average_the_shard_losses():
    """One step with two shards of 8 moves the weights as the mean of the two shards' gradients."""
    model, loss_fn, data = _fresh()
    reference = [p.detach().clone() for p in model.parameters()]
    gens = [torch.Generator().manual_seed(shard_seed(0, s, 2)) for s in range(2)]
    cfg = TrainConfig(steps=1, batch_size=16, lr=0.1, grad_clip=None, cosine_decay=False)
    # by hand: Adam's first step moves each weight by lr * sign-like g / (|g| + eps); compare gradients
    probe = _noisy_regression()[0]
    probe.load_state_dict(model.state_dict())
    draw = [torch.Generator().manual_seed(shard_seed(0, s, 2)) for s in range(2)]
    import random

    torch.manual_seed(1)
    random.seed(1)
    losses = []
    for g in draw:
        idx = torch.randint(256, (8,), generator=g)
        losses.append(loss_fn(probe, (data[0][idx], data[1][idx]), g))
    (sum(losses) / 2).backward()
    expected = [p - 0.1 * p.grad / (p.grad.abs() + 1e-8) for p in probe.parameters()]
    torch.manual_seed(1)
    random.seed(1)
    res = train(model, loss_fn, data, cfg, generator=gens)
    for p, e, r in zip(model.parameters(), expected, reference, strict=True):
        torch.testing.assert_close(p.detach(), e.detach(), atol=1e-6, rtol=0)
        assert not torch.equal(p.detach(), r)
    assert res.losses[0] == pytest.approx((sum(losses) / 2).item(), rel=1e-6)


def test_shards_must_divide_the_batch():
    model, loss_fn, data = _fresh()
    with pytest.raises(ValueError, match="divisible by the 3 shards"):
        train(model, loss_fn, data, TrainConfig(steps=1, batch_size=16),
              generator=[torch.Generator() for _ in range(3)])


# ---- mixed precision on the CPU ----------------------------------------------------------------------
def test_bf16_autocast_runs_the_loss_in_bfloat16_and_still_converges():
    seen = []
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)

    def loss_fn(m, batch, generator):
        out = m(batch)
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return (out.float() - 3 * batch).pow(2).mean()

    cfg = TrainConfig(steps=300, batch_size=64, lr=0.05, grad_clip=None)
    res = train(model, loss_fn, lambda n, generator=None: torch.randn(n, 1, generator=generator), cfg,
                generator=torch.Generator().manual_seed(0), precision="bf16")
    assert seen[0] == (True, torch.bfloat16)
    assert model.weight.dtype == torch.float32 and abs(model.weight.item() - 3) < 0.05
    assert all(isinstance(v, float) for v in res.losses)
    with pytest.raises(ValueError, match="expected precision to be one of fp32, bf16"):
        train(model, loss_fn, torch.randn(8, 1), TrainConfig(steps=1, batch_size=4), precision="fp16")


# ---- kill and resume ---------------------------------------------------------------------------------
class _Killed(Exception):
    pass


def test_resume_after_a_crash_equals_the_uninterrupted_run_bit_for_bit(tmp_path):
    cfg = TrainConfig(steps=30, batch_size=16, lr=0.02, ema_decay=0.9)
    model, loss_fn, data = _fresh()
    whole = train(model, loss_fn, data, cfg, generator=torch.Generator().manual_seed(3))

    model, loss_fn, data = _fresh()
    calls = {"n": 0}

    def crashing(m, batch, g):
        calls["n"] += 1
        if calls["n"] == 26:  # killed in step 26, after the state of step 20 was written
            raise _Killed
        return loss_fn(m, batch, g)

    path = tmp_path / "run.state.pt"
    with pytest.raises(_Killed):
        train(model, crashing, data, cfg, generator=torch.Generator().manual_seed(3), state_path=path,
              state_every=10)
    assert torch.load(path, weights_only=True)["step"] == 20

    model, loss_fn, data = _fresh(seed=99)  # a different start: everything must come from the file
    resumed = train(model, loss_fn, data, cfg, generator=torch.Generator().manual_seed(12345), state_path=path,
                    state_every=10, resume=True)
    assert resumed.steps == 30 and resumed.losses == whole.losses
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(whole.ema_model.state_dict().values(), resumed.ema_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_refuses_a_missing_or_foreign_state(tmp_path):
    model, loss_fn, data = _fresh()
    with pytest.raises(FileNotFoundError, match="no training state to resume"):
        train(model, loss_fn, data, TrainConfig(steps=4, batch_size=8), state_path=tmp_path / "none.pt", resume=True)
    path = tmp_path / "s.pt"
    train(model, loss_fn, data, TrainConfig(steps=4, batch_size=8), generator=torch.Generator(), state_path=path,
          state_every=2)
    with pytest.raises(ValueError, match="was written with config"):
        train(model, loss_fn, data, TrainConfig(steps=4, batch_size=16), generator=torch.Generator(),
              state_path=path, resume=True)


def test_context_state_round_trip():
    """A recipe's own state (discriminator, its optimiser, the adaptive t_max, logs) survives."""
    disc = nn.Linear(2, 1)
    opt = torch.optim.Adam(disc.parameters(), lr=0.1)
    disc(torch.ones(3, 2)).sum().backward()
    opt.step()
    control = AdaptiveT(hi=0.4)
    control.p, control.history = 0.3, [0.1, 0.12]
    log = {"step": [1, 26], "d_loss": [0.7, 0.6]}
    snapshots = [(5, {"w": torch.ones(2)})]
    context = {"disc": disc, "opt": opt, "control": control, "log": log, "snapshots": snapshots, "step": 26,
               "fn": lambda x: x}
    saved = _context_state(context)
    assert "fn" not in saved
    nn.init.zeros_(disc.weight)
    control.p, control.history[:] = 0.0, []
    log.clear()
    snapshots.clear()
    context["step"] = 0
    _restore_context(context, saved)
    assert disc.weight.abs().sum() > 0 and control.t_max == pytest.approx(0.12) and control.history == [0.1, 0.12]
    assert context["log"] is log and log["step"] == [1, 26] and snapshots[0][0] == 5 and context["step"] == 26
    assert opt.state_dict()["state"][0]["step"] == 1


def test_a_gan_recipe_resumes_with_its_discriminator_and_controller(tmp_path, monkeypatch):
    """mnist_diffusion_gan trains its discriminator and moves t_max inside the loss: a run killed
    after its state was written and resumed ends at the uninterrupted run's weights and log."""
    import course.gan_recipes as gr

    whole = run_recipe("mnist_diffusion_gan", folder=tmp_path / "a", fast=True, steps=12, progress=False)
    real_log = gr._log

    def killing_log(context, **values):
        real_log(context, **values)
        if context["step"] == 10:
            raise _Killed

    monkeypatch.setattr(gr, "_log", killing_log)
    with pytest.raises(_Killed):
        run_recipe("mnist_diffusion_gan", folder=tmp_path / "b", fast=True, steps=12, progress=False, state_every=4)
    assert state_path_for("mnist_diffusion_gan", tmp_path / "b").is_file()
    monkeypatch.setattr(gr, "_log", real_log)
    resumed = run_recipe("mnist_diffusion_gan", folder=tmp_path / "b", fast=True, steps=12, progress=False,
                         state_every=4, resume=True)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert whole.metrics["training_log"] == resumed.metrics["training_log"]
    assert not state_path_for("mnist_diffusion_gan", tmp_path / "b").exists()  # removed once the checkpoint is in
    entry = json.loads((tmp_path / "b" / "manifest.json").read_text())["mnist_diffusion_gan"]
    assert entry["training"]["resumed"] is True and entry["steps"] == 12


def test_a_second_network_trained_in_the_loss_cannot_be_sharded(tmp_path):
    with pytest.raises(ValueError, match="trains a second network"):
        run_recipe("mnist_gan", folder=tmp_path, fast=True, steps=2, progress=False, shards=2)


def test_data_full_reads_the_torchvision_layout_and_never_falls_back(tmp_path, monkeypatch):
    """--data full trains on the torchvision MNIST files (a tiny fake here, read without a network)."""
    import struct

    import numpy as np

    from course.recipes import get_recipe, load_data

    def _idx(path, array):  # MNIST's IDX format: magic 0x0000 08 NDIM, sizes, unsigned bytes
        with open(path, "wb") as f:
            f.write(struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
            f.write(array.astype(np.uint8).tobytes())

    recipe = get_recipe("mnist_classifier")
    monkeypatch.setenv("COURSE_DATA", str(tmp_path))
    with pytest.raises(RuntimeError, match="--data full needs the 70 000 torchvision MNIST digits"):
        load_data(recipe, "train", variant="full", verbose=False)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    assert len(load_data(recipe, "train", variant="full", verbose=False)) == 40
    assert len(load_data(recipe, "train", variant="subset", verbose=False)) == 4000
    run_recipe("mnist_classifier", folder=tmp_path / "out", fast=True, steps=2, data="full", progress=False)
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["mnist_classifier"]
    assert "torchvision (train: 40 digits" in entry["data"]


def test_time_limit_and_overrides_are_recorded(tmp_path):
    res = run_recipe("mnist_classifier", folder=tmp_path, fast=True, steps=500, minutes=1e-4, progress=False)
    entry = json.loads((tmp_path / "manifest.json").read_text())["mnist_classifier"]
    assert res.path is not None and entry["steps"] < 500
    assert entry["training"]["steps_asked"] == 500 and entry["training"]["minutes"] == 1e-4
    assert entry["training"]["device"] == "cpu" and entry["training"]["processes"] == 1


# ---- the command line: several processes, a real kill ------------------------------------------------
def _course(*args, **kw):
    return subprocess.run([sys.executable, "-m", "course.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=300, **kw)


def test_cli_errors_name_what_was_expected(tmp_path):
    out = _course("train", "mnist_classifier", "--fast", "--data", "full", "--out", str(tmp_path))
    assert out.returncode == 2 and "--data full needs the 70 000 torchvision MNIST digits" in out.stderr
    out = _course("train", "mnist_classifier", "--resume", "--out", str(tmp_path))
    assert out.returncode == 2 and "no training state to resume" in out.stderr
    if not torch.cuda.is_available():
        out = _course("train", "mnist_classifier", "--fast", "--device", "cuda", "--out", str(tmp_path))
        assert out.returncode == 2 and "sees no CUDA GPU" in out.stderr


SPY = textwrap.dedent("""
    import os, sys
    import course.recipe_registry as R
    import course.training as T
    from course.cli import main

    def spy(original):
        def wrapped(*args, **kw):
            print(f"WRITE rank={os.environ.get('RANK', '0')} {original.__name__} {args[-1] if args else ''}", flush=True)
            return original(*args, **kw)
        return wrapped

    T._atomic_save = spy(T._atomic_save)
    R._write_manifest = spy(R._write_manifest)
    sys.exit(main(sys.argv[1:]))
""")


def test_two_gloo_processes_match_one_process_with_two_shards(tmp_path):
    """torchrun with two CPU processes (gloo, DDP) trains mnist_classifier for its fast steps; one
    process drawing the same two shards reaches the same weights up to float reduction order, and
    only rank 0 wrote anything (the checkpoint, the manifest, the training states)."""
    script = tmp_path / "spy.py"
    script.write_text(SPY)
    args = ["train", "mnist_classifier", "--fast", "--device", "cpu", "--state-every", "5"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *args, "--out", str(tmp_path / "two")], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    writes = [line for line in two.stdout.splitlines() if line.startswith("WRITE")]
    assert writes and all(line.startswith("WRITE rank=0") for line in writes), writes
    assert sum("state.pt" in line for line in writes) == 3  # steps 5, 10, 15 of 20
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["manifest.json", "mnist_classifier.pt"]
    one = _course(*args, "--shards", "2", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    a = torch.load(tmp_path / "two" / "mnist_classifier.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "one" / "mnist_classifier.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    entry = json.loads((tmp_path / "two" / "manifest.json").read_text())["mnist_classifier"]
    assert entry["training"]["processes"] == 2 and entry["training"]["shards"] == 2


def test_a_killed_command_resumes_to_the_uninterrupted_weights(tmp_path):
    """`course train` killed with SIGKILL mid-run, then `--resume`: the checkpoint is bit for bit the
    one an uninterrupted run writes."""
    args = ["train", "mnist_classifier", "--device", "cpu", "--steps", "120", "--state-every", "10"]
    whole = _course(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    state = state_path_for("mnist_classifier", tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "course.cli", *args, "--out", str(tmp_path / "killed")], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert state.is_file() and not (tmp_path / "killed" / "mnist_classifier.pt").exists()
    resumed = _course(*args, "--resume", "--out", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "whole" / "mnist_classifier.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / "mnist_classifier.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distributed_info_properties():
    assert Distributed(rank=1, world_size=2).active and not Distributed(rank=1, world_size=2).is_main
    assert not distributed.SINGLE.active and distributed.SINGLE.is_main
