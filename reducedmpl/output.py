"""Console helpers shared by the stages."""
from __future__ import annotations

from typing import Any


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
