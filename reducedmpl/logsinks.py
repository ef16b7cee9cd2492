"""Where metric rows go besides ``metrics.jsonl``: ``--log tensorboard`` (when the ``tensorboard`` package is
installed) writes every numeric value of every row as a TensorBoard scalar, into ``OUT/tensorboard/``.

The command line (or the Python API) chooses the sinks once per process with :func:`configure`;
``engine.runs.MetricsLog`` asks :func:`sinks_for` for them and forwards each row it writes. On ``--resume`` the events
past the checkpoint are purged, as the rows of ``metrics.jsonl`` are.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import ConfigError

LOG_KINDS = ("tensorboard",)
TENSORBOARD_DIR = "tensorboard"
_chosen: list[str] = []


def configure(kinds: Sequence[str] = ()) -> None:
    """Choose the extra sinks of this process (``[]``: metrics.jsonl only); unknown or missing ones are errors."""
    kinds = list(dict.fromkeys(kinds))
    for kind in kinds:
        if kind not in LOG_KINDS:
            raise ConfigError(f"unknown --log {kind!r}", f"choose one of {', '.join(LOG_KINDS)}")
    if "tensorboard" in kinds:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - needs the tensorboard package
        except ImportError:
            raise ConfigError("--log tensorboard needs the tensorboard package, which is not installed",
                              "pip install tensorboard (or: pip install -e '.[tensorboard]')") from None
    _chosen[:] = kinds


@contextlib.contextmanager
def logging_to(kinds: Sequence[str] = ()) -> Iterator[None]:
    """:func:`configure` for the duration of a block."""
    before = list(_chosen)
    configure(kinds)
    try:
        yield
    finally:
        _chosen[:] = before


def sinks_for(metrics_path: Path, keep_until: tuple[str, float] | None = None) -> list[Any]:
    """The sinks chosen for this process, writing beside ``metrics_path``; ``keep_until`` as for MetricsLog."""
    if "tensorboard" not in _chosen:
        return []
    return [TensorBoardWriter(Path(metrics_path).parent / TENSORBOARD_DIR, keep_until)]


class TensorBoardWriter:
    """Every numeric value of a row as a scalar at the row's ``epoch`` (train-large) or ``step`` (distill), the
    key ``MetricsLog`` resumes by; the final summary row at the last one seen, under ``final/``."""

    def __init__(self, folder: Path, keep_until: tuple[str, float] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        if keep_until is None:  # a fresh run: no events of an earlier one
            for old in folder.glob("events.out.tfevents.*"):
                old.unlink()
        purge = int(keep_until[1]) + 1 if keep_until is not None else None
        self.folder, self.last_step = folder, int(keep_until[1]) if keep_until is not None else 0
        self.writer = SummaryWriter(str(folder), purge_step=purge, flush_secs=30)

    def write(self, row: dict[str, Any]) -> None:
        step = row.get("epoch", row.get("step"))  # train-large's rows are per epoch (and count steps too)
        prefix = ""
        if isinstance(step, (int, float)) and not isinstance(step, bool):
            self.last_step = int(step)
        else:
            prefix = "final/" if row.get("final") else ""
        for key, value in row.items():
            if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(prefix + key, value, self.last_step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
