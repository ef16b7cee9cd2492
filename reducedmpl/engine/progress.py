"""What a run shows while it works: rank 0's console, progress bars and throughput."""
from __future__ import annotations

import time
from typing import Any


def rank_output(dist: Any, console: Any, quiet: bool) -> tuple[Any, bool]:
    """The console and ``quiet`` a stage uses: the given ones (stderr by default) on rank 0, silence elsewhere."""
    from rich.console import Console

    if not dist.is_main:
        return Console(quiet=True), True
    return console or Console(stderr=True), quiet


class Throughput:
    def __init__(self):
        self.t0, self.n = time.perf_counter(), 0

    def add(self, n: int) -> float:
        self.n += n
        return self.n / max(time.perf_counter() - self.t0, 1e-9)


def progress(disable: bool = False):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=disable, transient=True)


class HeldConsole:
    """A console whose ``print`` calls are held until :meth:`release`: a stage's notes appear only once its checks
    have passed, so a refused run prints its one error line and nothing else."""

    def __init__(self, console: Any):
        self.console, self._held = console, []

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._held is None:
            self.console.print(*args, **kwargs)
        else:
            self._held.append((args, kwargs))

    def release(self) -> None:
        """Print what was held, in order; later calls print at once."""
        held, self._held = self._held or [], None
        for args, kwargs in held:
            self.console.print(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)
