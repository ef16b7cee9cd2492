"""Ctrl-C and SIGTERM as a request to stop at the next step boundary, after a checkpoint."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Callable, Iterator, NoReturn

from ..errors import Interrupted

REPEAT_WINDOW_S = 5.0
CHECKPOINT_NOTICE = "stopping after this step to write a checkpoint (Ctrl-C again to stop at once)"
_ACTIVE: list["StopRequest"] = []  # the requests of the graceful_stop blocks now open (innermost last)

class StopRequest:
    """Whether Ctrl-C asked the run to stop; the training loops look at :attr:`requested` between steps.

    The first Ctrl-C (SIGINT) inside :func:`graceful_stop` only sets :attr:`local`; the loop then writes its
    checkpoint and calls :meth:`stop`. ``agree`` turns the local flag into the decision: the identity for one
    process, e.g. ``Dist.any`` under torchrun so that every rank stops at the same step. Once true it stays true
    (and ``agree`` is no longer called)."""

    def __init__(self, agree: Callable[[bool], bool] | None = None):
        self.local = False
        self.agree = agree or bool
        self._decided = False

    @property
    def requested(self) -> bool:
        if not self._decided:
            self._decided = bool(self.agree(self.local))
        return self._decided

    def stop(self, where: str, checkpoint: Path) -> NoReturn:
        """Raise :class:`~reducedmpl.errors.Interrupted` (exit code 130 in the CLI) after the checkpoint is written."""
        raise Interrupted(f"interrupted at {where}; the checkpoint {checkpoint} is kept — continue with --resume")


def stop_point() -> None:
    """Raise KeyboardInterrupt here, at a point where the caller's cleanup is sound, when a Ctrl-C was asked for
    inside the innermost :func:`graceful_stop` block (precompute's batches: a finished shard is kept, the one in
    work is removed). A Ctrl-C is then never raised at a random bytecode, e.g. inside a weakref callback or a
    ``__del__``, where Python could only print it as "Exception ignored" and go on."""
    if _ACTIVE and _ACTIVE[-1].local:
        raise KeyboardInterrupt


@contextlib.contextmanager
def graceful_stop(agree: Callable[[bool], bool] | None = None, notice: str = CHECKPOINT_NOTICE
                  ) -> Iterator[StopRequest]:
    """Within the block, the first Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption, or torchrun passing
    a stop on) sets ``requested`` instead of ending the process; a second one acts at once (Python's default).
    Under torchrun a Ctrl-C reaches a worker twice, from the terminal and from torchrun, so there repeats
    within :data:`REPEAT_WINDOW_S` count as one. The previous handlers are restored on leaving. Outside the main
    thread nothing is installed (``requested`` then stays false unless ``agree`` says otherwise)."""
    import signal
    import sys
    import threading

    request = StopRequest(agree)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    signals = [sig for sig in (signal.SIGINT, signal.SIGTERM)
               if signal.getsignal(sig) not in (None, signal.SIG_IGN)]
    previous = {sig: signal.getsignal(sig) for sig in signals}
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    first: dict[str, float] = {}

    def on_signal(signum, frame):
        now = time.monotonic()
        if "t" in first:
            if under_torchrun and now - first["t"] < REPEAT_WINDOW_S:
                return  # the same stop, delivered twice
            for sig, handler in previous.items():  # a second request: act at once
                signal.signal(sig, handler)
            signal.raise_signal(signum)
            return
        first["t"] = now
        request.local = True
        if not under_torchrun:  # one process: a second signal should not wait
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if os.environ.get("RANK", "0") == "0":  # once, not once per rank
            print(notice, file=sys.stderr, flush=True)

    for sig in signals:
        signal.signal(sig, on_signal)
    _ACTIVE.append(request)
    try:
        yield request
    finally:
        _ACTIVE.remove(request)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
