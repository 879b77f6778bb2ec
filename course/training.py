"""One small training loop for the whole course, and atomic checkpoints.

``train`` runs Adam on ``loss_fn(model, batch, generator)`` over batches drawn from ``data``
(a sampler ``data(n, generator)``, a tensor dataset or a tuple of tensors such as images and
labels), with gradient clipping, a cosine learning-rate decay, an exponential moving average
(EMA) of the weights, a periodic evaluation callback, an optional wall-clock limit and a tqdm
progress bar. Seeds and the device come from arguments.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from .utils import check_positive, check_positive_int

__all__ = ["TrainConfig", "TrainResult", "train", "save_checkpoint", "load_checkpoint",
           "CheckpointError"]


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
    if isinstance(data, tuple) and data and all(isinstance(d, Tensor) for d in data):
        n = data[0].shape[0]
        if n < 1 or any(d.shape[0] != n for d in data):
            raise ValueError(f"expected a tuple of non-empty tensors with one first dimension; got shapes "
                             f"{[tuple(d.shape) for d in data]}")

        def from_tuple():
            idx = torch.randint(n, (batch_size,), generator=generator)
            return tuple(d[idx].to(device) for d in data)

        return from_tuple
    if isinstance(data, Tensor):
        if data.shape[0] < 1:
            raise ValueError("expected a non-empty dataset tensor")

        def from_tensor():
            idx = torch.randint(data.shape[0], (batch_size,), generator=generator)
            return data[idx].to(device)

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


def train(model: nn.Module, loss_fn: Callable, data, config: TrainConfig, *,
          generator: torch.Generator | None = None, device: torch.device | str | None = None,
          eval_fn: Callable[[nn.Module, int], object] | None = None,
          progress: bool = False) -> TrainResult:
    """Train ``model`` in place and return it with its EMA copy, the losses and the evaluations.

    Args:
        loss_fn: ``loss_fn(model, batch, generator) -> scalar``.
        data: a sampler ``data(n, generator=...)`` returning a batch ``(n, ...)`` or a tuple of
            batches (e.g. points and labels); a ``(N, ...)`` tensor to draw batches from; or a
            tuple of such tensors (e.g. images and labels) drawn at the same indices.
        eval_fn: called as ``eval_fn(ema_model, step)`` every ``config.eval_every`` steps and at the end.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    ema = AveragedModel(model, multi_avg_fn=ema_update(config.ema_decay, warmup=config.ema_warmup),
                        use_buffers=True)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=tuple(config.betas))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps) if config.cosine_decay else None
    next_batch = _batches(data, config.batch_size, generator, device)
    result = TrainResult(model=model, ema_model=ema.module)
    start = time.perf_counter()
    bar = tqdm(range(config.steps), disable=not progress, desc="training")
    for step in bar:
        loss = loss_fn(model, next_batch(), generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} at step {step}; lower lr?")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        ema.update_parameters(model)
        result.losses.append(loss.item())
        result.steps = step + 1
        if progress and step % 50 == 0:
            bar.set_postfix(loss=f"{sum(result.losses[-50:]) / len(result.losses[-50:]):.4f}")
        if config.eval_every and eval_fn is not None and (step + 1) % config.eval_every == 0:
            result.evals.append((step + 1, eval_fn(ema.module, step + 1)))
        if config.time_limit is not None and time.perf_counter() - start > config.time_limit:
            break
    bar.close()
    result.seconds = time.perf_counter() - start
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
    payload = {"state_dict": copy.deepcopy(model.state_dict()), "meta": dict(meta or {})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
