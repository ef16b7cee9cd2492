"""``runs/NAME/index.json``: which stage folders make up a pipeline's run (written by ``run``, read by ``report``)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

INDEX_FILE = "index.json"


def read_index(run_dir: str | Path) -> dict:
    path = Path(run_dir) / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{run_dir} holds no {INDEX_FILE}",
                        "pass a run folder written by `reducedmpl run` (runs/NAME)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e.__class__.__name__})", "run the pipeline again") from None
    stages = index.get("stages") if isinstance(index, dict) else None
    if not isinstance(stages, list) or not all(
            isinstance(e, dict) and {"label", "stage", "key", "folder"} <= set(e)
            and (e["stage"] != "distill" or {"run", "mode", "seed"} <= set(e)) for e in stages):
        raise UserError(f"{path} is not an index written by `reducedmpl run`", "run the pipeline again")
    return index
