"""Several processes under ``torchrun``: the process group, and the few collectives the stages use.

Launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` in the
environment), every stage joins one process group (gloo on CPU, nccl on CUDA, each rank on ``cuda:LOCAL_RANK``).
Without those variables everything here is a no-op for one process, so single-process code pays nothing.

The conventions the stages keep:

* A global batch of ``batch_size`` rows is split evenly across the ranks (:func:`rank_slice`), so the same
  settings give the same optimisation whatever the number of processes.
* Only rank 0 writes logs, checkpoints, reports and progress bars (:attr:`Dist.is_main`).
* Checks that decide whether to go on run on rank 0 and their outcome reaches every rank (:meth:`Dist.on_main`),
  so a refused input stops all ranks with the same one-line error instead of leaving some waiting.
* The process group has a timeout (``REDUCEDMPL_DIST_TIMEOUT`` seconds, default 1800): a rank that dies is
  noticed by ``torchrun``, which stops the others; the timeout is the backstop for other launchers.
"""
from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as tdist

from .errors import ConfigError, UserError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number",
                          "launch with torchrun, which sets it") from None


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -------------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of ``values`` over the ranks (one all-reduce)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_coll_device())
        tdist.all_reduce(t)
        return t.tolist()

    def mean(self, values: Sequence[float]) -> list[float]:
        """The element-wise mean of ``values`` over the ranks (one all-reduce)."""
        return [v / self.world_size for v in self.sum(values)]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank."""
        return self.sum([float(flag)])[0] > 0

    def average_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in place (flattened into one all-reduce)."""
        if not self.enabled:
            return
        tensors = [t for t in tensors if t is not None]
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        tdist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite each tensor with rank 0's, in place."""
        if not self.enabled:
            return
        for t in tensors:
            tdist.broadcast(t.data, src=0)

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank; a :class:`UserError` it raises is raised
        on every rank (the others stay quiet about it, see :class:`RankZeroError`)."""
        if not self.enabled:
            return fn()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except UserError as e:
                outcome = ("error", e)
        status, value = self.broadcast(outcome)
        if status == "error":
            if self.is_main:
                raise value
            raise RankZeroError(str(value))
        return value


class RankZeroError(UserError):
    """A :class:`UserError` that rank 0 found and reports; the other ranks exit with it silently."""


def _coll_device() -> torch.device:
    """Where collective buffers live: the rank's GPU with nccl, the CPU with gloo."""
    if tdist.is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------ set-up
_current = Dist()


def current() -> Dist:
    """The process group this process is in (rank 0 of 1 before :func:`setup` or without torchrun)."""
    return _current


def setup(device: torch.device) -> Dist:
    """Join the process group torchrun describes (once per process); returns this rank's :class:`Dist`.

    ``device`` is the stage's resolved device: CUDA selects nccl (and the rank's GPU), the CPU gloo.
    """
    global _current
    world = env_world_size()
    if world <= 1:
        return _current
    if tdist.is_initialized():
        return _current
    missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set",
                          "launch with torchrun (e.g. torchrun --nproc_per_node 2 -m reducedmpl ...)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(os.environ.get("REDUCEDMPL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    extra = {}
    if device.type == "cuda" and "device_id" in inspect.signature(tdist.init_process_group).parameters:
        extra["device_id"] = device  # binds nccl to this rank's GPU at once (torch >= 2.3)
    tdist.init_process_group(backend, timeout=timeout, **extra)
    _current = Dist(rank, world, local_rank)
    return _current


def local_device(device: torch.device) -> torch.device:
    """Under torchrun a plain ``cuda`` means this rank's own GPU, ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shutdown() -> None:
    """Leave the process group (at the end of a command, or when it fails)."""
    global _current
    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving a broken group must not hide the real error
            pass
    _current = Dist()


# ------------------------------------------------------------------------------------------ sharding
def check_divisible(name: str, batch_size: int, dist: Dist) -> None:
    if batch_size % dist.world_size:
        raise ConfigError(f"{name}={batch_size} does not split evenly over {dist.world_size} processes",
                          f"use a multiple of {dist.world_size} (it is the global batch, split across processes)")


def rank_slice(positions: np.ndarray, dist: Dist) -> np.ndarray:
    """This rank's share of one global batch: every ``world_size``-th row, starting at ``rank``."""
    return positions[dist.rank::dist.world_size] if dist.enabled else positions
