"""What a stage leaves in its run folder when it refuses to go on."""
from __future__ import annotations

from pathlib import Path

from .engine import RUN_FILES


def drop_run(out: str | Path, artifact: str) -> None:
    """Remove the run files of a run that can never finish as configured (its loss became NaN: a --resume would
    reach the same step again), so that a plain rerun with other settings starts there without --resume or
    --overwrite. Files that are not a run's are left alone."""
    out = Path(out)
    for name in (artifact, *RUN_FILES):
        (out / name).unlink(missing_ok=True)
        (out / f".{name}.tmp").unlink(missing_ok=True)
