"""The skeleton that ``train-large`` and ``distill`` share: set up, resume, loop, checkpoint, finish.

A stage builds a :class:`StageRun` for its output folder, reads ``run.state`` to resume, calls
:meth:`~StageRun.start`, trains inside ``with run.loop() as (stop, bar)`` (Ctrl-C becomes ``stop.requested``;
:meth:`~StageRun.save_last` writes ``last.pt``), keeps the best weights on validation with
:meth:`~StageRun.track_best`, picks the weights to report with :meth:`~StageRun.final_model` and ends with
:meth:`~StageRun.finish`. Every rank takes part in each call; only rank 0 writes.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console
from torch import nn

from .. import distributed
from ..files import save_torch, write_json
from .device import resolve_device
from .interrupt import StopRequest, graceful_stop
from .progress import progress, rank_output
from .runs import MetricsLog, prepare_run, write_config


def setup(device: str, console: Console | None, quiet: bool,
          batch_sizes: dict[str, int]) -> tuple[Any, distributed.Dist, Console, bool]:
    """The device, the process group (torchrun), rank 0's console; global batch sizes must split over ranks."""
    dev = resolve_device(device)
    dist = distributed.setup(dev)
    console, quiet = rank_output(dist, console, quiet)
    for name, size in batch_sizes.items():
        distributed.check_divisible(name, size, dist)
    return dev, dist, console, quiet


class StageRun:
    """One stage's run folder, seen the same way by every rank."""

    def __init__(self, out: str | Path, artifact: str, config: dict, dist: distributed.Dist, console: Console, *,
                 resume: bool, overwrite: bool, ignore: tuple[str, ...] = (), inputs: dict[str, Any] | None = None):
        self.out, self.state = prepare_run(out, artifact, resume, overwrite, config, dist, ignore, inputs)
        self.artifact, self.config, self.dist, self.console = artifact, config, dist, console
        self.last_path = self.out / "last.pt"
        self.best_path = self.out / "best.pt"
        self.metrics: MetricsLog | None = None
        self.best: dict = {}

    @property
    def main(self) -> bool:
        return self.dist.is_main

    def start(self, position: tuple[str, int], best: dict) -> MetricsLog:
        """Open ``metrics.jsonl`` (on resume, rows past ``position`` — the checkpoint's — are dropped), write
        ``config.yaml`` and set the best-so-far record (``best`` unless the checkpoint has one)."""
        self.metrics = MetricsLog(self.out / "metrics.jsonl", keep_until=position if self.state else None,
                                  enabled=self.main)
        if self.main:
            write_config(self.out, self.config)
        self.best = self.state["best"] if self.state else best
        return self.metrics

    @contextlib.contextmanager
    def loop(self, quiet: bool) -> Iterator[tuple[StopRequest, Any]]:
        """Ctrl-C handling agreed over the ranks, and a progress bar (hidden when ``quiet``)."""
        with graceful_stop(self.dist.any) as stop, progress(disable=quiet) as bar:
            yield stop, bar

    def save_last(self, state: dict) -> None:
        """``last.pt``: ``state`` plus the best-so-far record and the config (the resume check reads it)."""
        if self.main:
            save_torch({**state, "best": self.best, "config": self.config}, self.last_path)

    def track_best(self, val_acc: float | None, where: dict, weights: Callable[[], dict], save: bool = True) -> None:
        """Remember ``where`` (e.g. the epoch) when ``val_acc`` is the best so far; with ``save``, write its
        ``weights()`` to ``best.pt``."""
        if val_acc is None or not val_acc > self.best["val_acc"]:  # NaN (no val split) never counts
            return
        self.best = {"val_acc": val_acc, **where}
        if save and self.main:
            save_torch({"state_dict": weights(), **self.best}, self.best_path)

    def final_model(self, model: nn.Module, select: str) -> nn.Module:
        """``model`` as trained (``select: last``) or with the best weights on validation (``best``)."""
        from ..models import safe_load

        self.dist.barrier()  # best.pt is written
        if select == "best" and self.best_path.exists():
            model.load_state_dict(safe_load(self.best_path)["state_dict"])
        return model

    def finish(self, artifact: dict, result: dict, extra: dict[str, Any] | None = None) -> None:
        """Write the artifact, the ``extra`` files (``.pt`` by torch, the rest as JSON) and the final metrics
        row; then drop ``last.pt``: a run is finished once its artifact is there and ``last.pt`` is not."""
        if self.main:
            save_torch(artifact, self.out / self.artifact)
            for name, obj in (extra or {}).items():
                if name.endswith(".pt"):
                    save_torch(obj, self.out / name)
                else:
                    write_json(self.out / name, obj)
            self.metrics.write(final=True, **result)
            self.last_path.unlink(missing_ok=True)
        self.dist.barrier()  # the artifacts are written before any rank goes on to use them
