"""One small training loop for the whole course, and atomic checkpoints.

``train`` runs Adam on ``loss_fn(model, batch, generator)`` over batches drawn from ``data``
(a sampler ``data(n, generator)``, a tensor dataset or a tuple of tensors such as images and
labels), with gradient clipping, a cosine learning-rate decay, an exponential moving average
(EMA) of the weights, a periodic evaluation callback, an optional wall-clock limit and a tqdm
progress bar. Seeds and the device come from arguments.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from . import distributed
from .distributed import Distributed
from .utils import check_positive, check_positive_int

__all__ = ["TrainConfig", "TrainResult", "train", "save_checkpoint", "load_checkpoint",
           "CheckpointError", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`."""

    steps: int
    batch_size: int = 512
    lr: float = 2e-3
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    grad_clip: float | None = 1.0
    cosine_decay: bool = True
    eval_every: int = 0  # 0: never call eval_fn during training
    time_limit: float | None = None  # seconds; stop early when reached
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's; GANs use a smaller first one

    def __post_init__(self):
        check_positive_int(self.steps, "steps")
        check_positive_int(self.batch_size, "batch_size")
        check_positive(self.lr, "lr")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"expected 0 <= ema_decay < 1; got {self.ema_decay}")
        check_positive_int(self.eval_every, "eval_every", allow_zero=True)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"expected Adam betas as two numbers in [0, 1); got {self.betas}")


@dataclass
class TrainResult:
    model: nn.Module  # the trained weights
    ema_model: nn.Module  # the EMA weights: use these for sampling
    losses: list[float] = field(default_factory=list)  # one per step
    evals: list[tuple[int, object]] = field(default_factory=list)  # (step, eval_fn result)
    seconds: float = 0.0
    steps: int = 0  # steps actually taken (fewer than configured if time_limit hit)


def _batches(data, batch_size: int, generator, device) -> Callable[[], Tensor]:
    """A function drawing one batch of ``batch_size`` from ``data`` with ``generator``. Tensor
    data must already be on the training device (:func:`train` moves it there once); a sampler's
    batches are moved to ``device``."""
    index_device = generator.device if generator is not None else torch.device("cpu")
    if isinstance(data, tuple) and data and all(isinstance(d, Tensor) for d in data):
        n = data[0].shape[0]
        if n < 1 or any(d.shape[0] != n for d in data):
            raise ValueError(f"expected a tuple of non-empty tensors with one first dimension; got shapes "
                             f"{[tuple(d.shape) for d in data]}")

        def from_tuple():
            idx = torch.randint(n, (batch_size,), generator=generator, device=index_device)
            return tuple(d[idx] for d in data)

        return from_tuple
    if isinstance(data, Tensor):
        if data.shape[0] < 1:
            raise ValueError("expected a non-empty dataset tensor")

        def from_tensor():
            idx = torch.randint(data.shape[0], (batch_size,), generator=generator, device=index_device)
            return data[idx]

        return from_tensor
    if callable(data):
        def from_sampler():
            batch = data(batch_size, generator=generator)
            return tuple(d.to(device) for d in batch) if isinstance(batch, tuple) else batch.to(device)

        return from_sampler
    raise ValueError(f"expected data to be a tensor dataset or a sampler data(n, generator); "
                     f"got {type(data).__name__}")


def ema_update(decay: float, *, warmup: bool = True) -> Callable:
    """The in-place EMA update for ``AveragedModel(multi_avg_fn=...)``: avg <- d avg + (1 - d) p.

    With ``warmup`` the decay after n updates is min(decay, (1 + n) / (10 + n)), as in common
    diffusion training code, so that a short run's average is not dominated by the random
    initial weights (with d = 0.999 and no warm-up, 1 000 steps leave them a weight of e^-1).
    """

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        torch._foreach_lerp_(averaged, current, 1 - d)

    return update


class _StepLoss(nn.Module):
    """One shard's loss as a module: DDP runs this forward, so its gradient hooks are armed whatever
    the loss calls on the model (``model(x, t)``, ``model.encode``, ...)."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch, generator):
        return self.loss_fn(self.model, batch, generator)


def _rng_state(generators: dict, device: torch.device) -> dict:
    state = {"shards": {s: g.get_state() for s, g in generators.items() if g is not None},
             "torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, generators: dict, device: torch.device) -> None:
    for s, g in generators.items():
        if g is not None:
            g.set_state(state["shards"][s])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _atomic_save(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def train(model: nn.Module, loss_fn: Callable, data, config: TrainConfig, *,
          generator: torch.Generator | Sequence[torch.Generator] | None = None,
          device: torch.device | str | None = None,
          eval_fn: Callable[[nn.Module, int], object] | None = None,
          progress: bool = False, precision: str = "fp32", state_path: str | Path | None = None,
          state_every: int = 0, resume: bool = False, extra_state: tuple[Callable, Callable] | None = None,
          dist_info: Distributed | None = None) -> TrainResult:
    """Train ``model`` in place and return it with its EMA copy, the losses and the evaluations.

    Args:
        loss_fn: ``loss_fn(model, batch, generator) -> scalar``.
        data: a sampler ``data(n, generator=...)`` returning a batch ``(n, ...)`` or a tuple of
            batches (e.g. points and labels); a ``(N, ...)`` tensor to draw batches from; or a
            tuple of such tensors (e.g. images and labels) drawn at the same indices. Tensors are
            moved to ``device`` once.
        generator: one generator, or one per shard: each step then draws ``batch_size / S`` from
            each of the S generators and averages the S losses (:mod:`course.distributed`). Under
            DDP (``dist_info.world_size`` = S > 1) rank r draws shard r only and DDP averages.
        eval_fn: called as ``eval_fn(ema_model, step)`` every ``config.eval_every`` steps and at the end.
        precision: ``"fp32"``, or ``"bf16"`` to run the loss under ``torch.autocast`` in bfloat16
            (the weights, the optimiser and the EMA stay in float32).
        state_path, state_every: every ``state_every`` steps write the whole training state there
            atomically (model, EMA, optimiser, schedule, step, losses, every RNG state and
            ``extra_state[0]()``); ``resume`` continues from that file, and on the CPU ends at the
            weights an uninterrupted run reaches, bit for bit.
        extra_state: ``(get, set)``: state of the caller's own (a recipe's discriminator, logs)
            saved and restored with the training state.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if precision not in PRECISIONS:
        raise ValueError(f"expected precision to be one of {', '.join(PRECISIONS)}; got {precision!r}")
    check_positive_int(state_every, "state_every", allow_zero=True)
    info = dist_info if dist_info is not None else distributed.current()
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    shards = len(gens)
    if shards < 1:
        raise ValueError("expected at least one generator")
    if config.batch_size % shards:
        raise ValueError(f"expected batch_size {config.batch_size} to be divisible by the {shards} shards")
    if info.active and shards != info.world_size:
        raise ValueError(f"expected one generator per process ({info.world_size}); got {shards}")
    mine = [info.rank] if info.active else list(range(shards))
    model.to(device).train()
    ema = AveragedModel(model, multi_avg_fn=ema_update(config.ema_decay, warmup=config.ema_warmup),
                        use_buffers=True)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=tuple(config.betas))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps) if config.cosine_decay else None
    if isinstance(data, tuple) and all(isinstance(d, Tensor) for d in data):
        data = tuple(d.to(device) for d in data)
    elif isinstance(data, Tensor):
        data = data.to(device)
    draws = {s: _batches(data, config.batch_size // shards, gens[s], device) for s in mine}
    ddp = None
    if info.active:
        from torch.nn.parallel import DistributedDataParallel

        # single-channel convolutions' weights have ambiguous strides; DDP's notice about it is harmless
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        ddp = DistributedDataParallel(_StepLoss(model, loss_fn),
                                      device_ids=[device.index] if device.type == "cuda" else None)
    result = TrainResult(model=model, ema_model=ema.module)
    start_step, seconds_before = 0, 0.0
    state_path = Path(state_path) if state_path is not None else None
    identity = {"config": asdict(config), "shards": shards, "world_size": info.world_size, "precision": precision}
    if resume:
        if state_path is None or not state_path.is_file():
            raise FileNotFoundError(f"no training state to resume from at {state_path}; start without resume")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        for key, value in identity.items():
            if state["identity"].get(key) != value:
                raise ValueError(f"the training state at {state_path} was written with {key} = "
                                 f"{state['identity'].get(key)!r}, this run has {value!r}; resume with the same "
                                 f"settings or start again without resume")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        if sched is not None:
            sched.load_state_dict(state["sched"])
        start_step, seconds_before = state["step"], state["seconds"]
        result.losses, result.evals, result.steps = list(state["losses"]), list(state["evals"]), start_step
        _set_rng_state(state["rng"][info.rank], {s: gens[s] for s in mine}, device)
        if extra_state is not None:
            extra_state[1](state["extra"])

    def save_state(step: int, seconds: float) -> None:
        rng = _rng_state({s: gens[s] for s in mine}, device)
        ranks = [rng]
        if info.active:
            ranks = [None] * info.world_size
            torch.distributed.all_gather_object(ranks, rng)
        if info.is_main:
            _atomic_save({"identity": identity, "step": step, "seconds": seconds, "model": model.state_dict(),
                          "ema": ema.state_dict(), "opt": opt.state_dict(),
                          "sched": sched.state_dict() if sched is not None else None,
                          "losses": result.losses, "evals": result.evals, "rng": ranks,
                          "extra": extra_state[0]() if extra_state is not None else None}, state_path)
        if info.active:
            torch.distributed.barrier()

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    sync_every = 1 if device.type == "cpu" else 50  # loss values cross to the host in blocks
    pending: list[Tensor] = []

    def flush(upto: int) -> None:
        values = torch.stack(pending).tolist()
        first = upto - len(values)
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise FloatingPointError(f"the loss became {v} at step {first + i}; lower lr?")
        result.losses.extend(values)
        pending.clear()

    start = time.perf_counter()
    bar = tqdm(range(start_step, config.steps), disable=not progress, desc="training", initial=start_step,
               total=config.steps)
    for step in bar:
        with autocast():
            if ddp is not None:
                loss = ddp(draws[info.rank](), gens[info.rank])
            elif shards == 1:
                loss = loss_fn(model, draws[0](), gens[0])
            else:
                loss = sum(loss_fn(model, draws[s](), gens[s]) for s in mine) / shards
        loss = loss.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        ema.update_parameters(model)
        logged = loss.detach()
        if info.active:
            logged = logged.clone()
            torch.distributed.all_reduce(logged)
            logged = logged / info.world_size
        pending.append(logged)
        result.steps = step + 1
        last = step + 1 == config.steps
        stop = config.time_limit is not None and seconds_before + time.perf_counter() - start > config.time_limit
        if info.active and config.time_limit is not None:  # every process stops at the same step
            flag = torch.tensor(float(stop), device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if len(pending) >= sync_every or last or stop or (progress and step % 50 == 0):
            flush(step + 1)
        if progress and step % 50 == 0:
            bar.set_postfix(loss=f"{sum(result.losses[-50:]) / len(result.losses[-50:]):.4f}")
        if config.eval_every and eval_fn is not None and (step + 1) % config.eval_every == 0:
            result.evals.append((step + 1, eval_fn(ema.module, step + 1)))
        if state_path is not None and state_every and (step + 1) % state_every == 0 and not last and not stop:
            if pending:
                flush(step + 1)
            save_state(step + 1, seconds_before + time.perf_counter() - start)
        if stop:
            break
    bar.close()
    if pending:
        flush(result.steps)
    result.seconds = seconds_before + time.perf_counter() - start
    if eval_fn is not None and (not result.evals or result.evals[-1][0] != result.steps):
        result.evals.append((result.steps, eval_fn(ema.module, result.steps)))
    ema.module.eval()
    model.eval()
    return result


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict | None = None) -> Path:
    """Save ``model``'s weights and a JSON-like ``meta`` dict atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save({"state_dict": copy.deepcopy(model.state_dict()), "meta": dict(meta or {})}, path)
    return path


def load_checkpoint(path: str | Path, model: nn.Module, *, rebuild: str = "") -> dict:
    """Load weights saved by :func:`save_checkpoint` into ``model`` (``weights_only=True``) and
    return the metadata. Raises :class:`CheckpointError` naming ``rebuild`` (the command that
    recreates the file) when it is missing, corrupted or does not fit the model."""
    path = Path(path)
    hint = f"; rebuild it with `{rebuild}`" if rebuild else ""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is missing{hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["state_dict"])
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable file
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path} could not be loaded "
                              f"({type(exc).__name__}: {first_line}){hint}") from exc
    return payload.get("meta", {})
