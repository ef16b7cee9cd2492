"""Run folders: refusing to mix two runs, resuming from ``last.pt``, the resolved config and ``metrics.jsonl``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..errors import UserError, writing
from ..files import check_writable, refuse_overwrite, write_text


# The files a run folder holds beside its artifact (cost.json: the artifact's measured cost, cached by the report).
RUN_FILES = ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "reduced_teacher.pt", "probes.json", "result.json",
             "cost.json")


def prepare_out_dir(out: str | Path, artifact: str, resume: bool, overwrite: bool,
                    inputs: dict[str, Any] | None = None) -> Path:
    """Make ``out`` ready for a run, refusing to mix two runs in one folder, and a folder whose run files
    include one of the run's ``inputs`` (``{what: path}``: the run would replace what it reads)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder", "choose another --out")
    refuse_overwrite(inputs or {}, [out / n for n in (artifact, *RUN_FILES)],
                     "choose another --out: the run would replace its own input")
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other", "pass only one of them")
    holds_run = out.is_dir() and any((out / n).exists() for n in (artifact, "last.pt", "config.yaml"))
    if holds_run and not (resume or overwrite):
        if (out / artifact).exists() and not (out / "last.pt").exists():
            raise UserError(f"output folder {out} already holds a run, a finished one",
                            "pass --overwrite to replace it, or choose another --out")
        raise UserError(f"output folder {out} already holds a run, an unfinished one",
                        "pass --resume to continue it, --overwrite to replace it, or choose another --out")
    if overwrite and holds_run:
        for name in (artifact, "last.pt", "best.pt", "config.yaml", "metrics.jsonl"):
            (out / name).unlink(missing_ok=True)
    if holds_run:  # temporary files of an interrupted write (they are never read)
        for name in (artifact, *RUN_FILES):
            (out / f".{name}.tmp").unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to output folder {out} ({e.strerror or e})",
                        "choose a writable --out or fix its permissions") from None
    check_writable(out / artifact)
    return out


def resume_state(out: Path, artifact: str, resume: bool, config: dict, ignore: tuple[str, ...] = ()) -> dict | None:
    """The ``last.pt`` state to continue from with ``--resume`` (None: start from the beginning).

    Refuses a folder with no run, a finished run, and a run started with other settings."""
    if not resume:
        return None
    from ..models import safe_load

    last = out / "last.pt"
    if not (out / "config.yaml").exists():
        raise UserError(f"there is no run to resume in {out}", "drop --resume to start a new run there")
    if (out / artifact).exists() and not last.exists():
        raise UserError(f"{out} holds a finished run", "pass --overwrite to run it again")
    if not last.exists():
        return None  # interrupted before its first checkpoint
    state = safe_load(last, what="resume checkpoint", fix="pass --overwrite to start the run again")
    saved = state.get("config") if isinstance(state, dict) else None
    check_history(out, saved, ignore)
    check_weights(state, last)
    if not isinstance(saved, dict) or _without(saved, ignore) != _without(config, ignore):
        differ = _differing_keys(saved if isinstance(saved, dict) else {}, config, ignore)
        raise UserError(f"the run in {out} was started with other settings ({', '.join(differ[:5])}"
                        f"{', ...' if len(differ) > 5 else ''} differ)",
                        "resume with the same settings, or pass --overwrite to start again")
    return state


def check_history(out: Path, saved: Any, ignore: tuple[str, ...]) -> None:
    """Refuse a ``last.pt`` that is not the checkpoint of the run recorded in the folder's ``config.yaml`` (a
    checkpoint copied in from another run, or a folder mixed by hand)."""
    from ..yamltext import bounded_safe_load

    try:
        recorded = bounded_safe_load((out / "config.yaml").read_text())
    except Exception:  # noqa: BLE001 - unreadable: the folder's history is unknown
        recorded = None
    if not isinstance(saved, dict) or not isinstance(recorded, dict):
        raise UserError(f"the run in {out} cannot be resumed: its config.yaml or last.pt records no settings",
                        "pass --overwrite to start again")
    saved = yaml.safe_load(yaml.safe_dump(saved, sort_keys=False))  # as config.yaml writes it
    if _without(saved, ignore) != _without(recorded, ignore):
        differ = _differing_keys(saved, recorded, ignore)
        raise UserError(f"last.pt in {out} belongs to another run than its config.yaml ({', '.join(differ[:3])} "
                        "differ)", "pass --overwrite to start again, or put back that run's own last.pt")


def check_weights(state: dict, path: Path) -> None:
    """Refuse a checkpoint whose model weights hold NaN or Inf (a resumed run would only give NaN)."""
    from ..models import check_finite

    for key in ("model", "student", "teacher", "ema"):
        if isinstance(state.get(key), dict):
            check_finite(state[key], path, "resume checkpoint")


def _differing_keys(a: dict, b: dict, ignore: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested settings dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differing_keys(x, y, (), f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out


def _without(config: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in config.items() if k not in keys}


def prepare_run(out: str | Path, artifact: str, resume: bool, overwrite: bool, config: dict,
                dist: Any, ignore: tuple[str, ...] = (), inputs: dict[str, Any] | None = None
                ) -> tuple[Path, dict | None]:
    """:func:`prepare_out_dir` and :func:`resume_state` on rank 0 (every rank gets their verdict); the other
    ranks then read the same ``last.pt`` themselves."""
    from ..models import safe_load

    state = None

    def check() -> tuple[Path, bool]:
        nonlocal state
        folder = prepare_out_dir(out, artifact, resume, overwrite, inputs)
        state = resume_state(folder, artifact, resume, config, ignore)
        return folder, state is not None

    folder, has_state = dist.on_main(check)
    if has_state and state is None:
        state = safe_load(folder / "last.pt", what="resume checkpoint")
    return folder, state


def write_config(out: Path, config: dict) -> None:
    write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, rows past the checkpoint are dropped first."""

    def __init__(self, path: Path, keep_until: tuple[str, float] | None = None, enabled: bool = True):
        from ..logsinks import sinks_for

        self.path, self.enabled, self.sinks = path, enabled, []
        if not enabled:  # not rank 0: writes nothing
            return
        if keep_until is not None and path.exists():
            key, last = keep_until  # rows without the key (the final row) come after every checkpoint
            rows = [r for r in read_jsonl(path) if key in r and r[key] <= last]
            write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        elif keep_until is None:
            write_text(path, "")
        self.sinks = sinks_for(path, keep_until)  # e.g. TensorBoard (--log), fed every row below

    def write(self, **row: Any) -> None:
        if not self.enabled:
            return
        with writing(self.path), open(self.path, "a") as f:  # a torn row is dropped on resume
            f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        for sink in self.sinks:
            sink.write({k: _jsonable(v) for k, v in row.items()})


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a crash
    return rows


def drop_run(out: str | Path, artifact: str) -> None:
    """Remove the run files of a run that can never finish as configured (its loss became NaN: a --resume would
    reach the same step again), so that a plain rerun with other settings starts there without --resume or
    --overwrite. Files that are not a run's are left alone."""
    out = Path(out)
    for name in (artifact, *RUN_FILES):
        (out / name).unlink(missing_ok=True)
        (out / f".{name}.tmp").unlink(missing_ok=True)
