"""Training on one device or on several processes: device choice, PyTorch's DDP, per-shard seeds.

``course train NAME`` runs in one process on :func:`resolve_device` (CUDA, then MPS, then the
CPU, or ``--device``). Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``)::

    torchrun --standalone --nproc_per_node=N -m course.cli train NAME

every process joins one process group (:func:`init`; NCCL on GPUs, gloo on the CPU) and
:func:`course.training.train` wraps the loss in ``torch.nn.parallel.DistributedDataParallel``,
which all-reduces (averages) the gradients. Nothing of the reduction is ours.

**Shards.** A global batch of B is drawn as S shards of B / S, shard s from its own generator
seeded with :func:`shard_seed` (``seed`` itself when S = 1, so one-process runs are unchanged).
Under DDP, S is the number of processes and rank r draws shard r. One process can draw the same S
shards itself (``course train NAME --shards S``) and average their losses: the gradient is then
the one DDP averages, so a one-process run with S shards and an S-process run give the same
model up to the order of float additions. (A run with a different number of shards draws
different random numbers: the same recipe, statistically the same model, not the same weights.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Distributed", "init", "current", "shutdown", "resolve_device", "backend_for", "shard_seed",
           "is_main", "barrier", "SINGLE"]


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Distributed()


def resolve_device(device: str | torch.device | None = None, *, local_rank: int = 0) -> torch.device:
    """``None`` or ``"auto"``: CUDA (GPU ``local_rank`` of this machine), else MPS, else the CPU;
    otherwise ``device`` itself, checked to exist here."""
    from .utils import default_device

    if device is None or str(device) == "auto":
        device = default_device()
        return torch.device("cuda", local_rank) if device.type == "cuda" else device
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"expected a device such as 'cpu', 'cuda', 'cuda:1', 'mps' or 'auto'; got {device!r}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device cuda:{index} was asked for; this machine has {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' was asked for, but MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"expected a cpu, cuda or mps device; got {device}")
    return device


def backend_for(device: torch.device) -> str:
    """The collective backend for ``device``: NCCL for CUDA GPUs, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError as exc:
        raise ValueError(f"expected the environment variable {name} to be an integer; got {value!r}") from exc


_STATE = {"info": SINGLE}


def init(device: str | torch.device | None = None) -> tuple[Distributed, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (a no-op for one
    process) and return this process's place and device. The backend follows the device."""
    world, rank, local = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"expected 0 <= RANK < WORLD_SIZE; got RANK={rank}, WORLD_SIZE={world}")
    device = resolve_device(device, local_rank=local)
    info = Distributed(rank=rank, world_size=world, local_rank=local)
    if info.active and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device), device_id=device if device.type == "cuda" else None)
    _STATE["info"] = info
    return info, device


def current() -> Distributed:
    """This process's place (the single process unless :func:`init` joined a group)."""
    if _STATE["info"].active and not dist.is_initialized():
        return SINGLE
    return _STATE["info"]


def is_main() -> bool:
    return current().is_main


def barrier() -> None:
    """Wait for every process (nothing to wait for in one process)."""
    if current().active:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE["info"] = SINGLE


def shard_seed(seed: int, shard: int, shards: int) -> int:
    """The seed of shard ``shard`` of ``shards``: ``seed`` for one shard, else a distinct value."""
    if shards < 1 or not 0 <= shard < shards:
        raise ValueError(f"expected 0 <= shard < shards; got shard={shard}, shards={shards}")
    return seed if shards == 1 else seed * 1_000_003 + 7_919 * (shard + 1)
