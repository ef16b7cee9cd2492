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
