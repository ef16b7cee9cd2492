"""The Python API: the stages as functions, for notebooks and scripts.

```python
from reducedmpl import train_large, precompute, distill, run

teacher = train_large({"model": "test_resnet", "epochs": 5, "data": {"source": "digits"}}, out="runs/nb/large")
targets = precompute({"data": {"labeled_per_class": 10}}, teacher=teacher.artifact)
student = distill({"student": "test_resnet", "mode": "kd", "steps": 100}, targets=targets.artifact)
student.metrics["test_acc"]
```

Each stage takes its settings as a config object (:class:`reducedmpl.config.TrainLargeConfig`, ...), a plain
dict with the keys of its YAML section (``data`` included), or the path of a pipeline YAML file, and returns a
:class:`StageResult`. ``run`` takes a pipeline file or a dict with the sections of one. Problems raise the tool's
own exceptions (:class:`reducedmpl.errors.UserError` and its subclasses, whose message names the fix); nothing
calls ``sys.exit``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .errors import ConfigError

__all__ = ["StageResult", "RunResult", "train_large", "precompute", "distill", "run"]


@dataclass
class StageResult:
    """What a stage wrote: its folder, its artifact (teacher.pt / targets.h5 / student.pt) and its metrics."""

    stage: str
    folder: Path
    artifact: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.metrics.items() if k in ("val_acc", "test_acc", "rows", "accuracy")}
        return f"StageResult({self.stage!r}, artifact={str(self.artifact)!r}, metrics={shown})"


@dataclass
class RunResult:
    """A pipeline run: its folder, the stages (label, status, folder), the comparison rows and the report."""

    run_dir: Path
    stages: list[tuple[str, str, str]]
    comparison: list[dict[str, Any]]
    teacher: dict[str, Any] | None
    report: Path

    def artifact(self, label: str) -> Path:
        """The artifact of one stage by its label: ``large``, ``targets``, ``distill-kd-0`` ..."""
        names = {"large": "teacher.pt", "targets": "targets.h5"}
        for name, _, folder in self.stages:
            if name == label:
                return Path(folder) / names.get(label, "student.pt")
        raise ConfigError(f"no stage {label!r} in this run", f"one of {', '.join(s[0] for s in self.stages)}")


def _config(section: str, config: Any, base: dict | None = None) -> Any:
    from .config import SECTIONS, merged, stage_config, to_dict

    cls = SECTIONS[section]
    if config is None:
        return stage_config(section, base=base)
    if isinstance(config, cls):
        return stage_config(section, base=merged(base or {}, to_dict(config)))
    if isinstance(config, (str, Path)):
        return stage_config(section, config, base=base)
    if isinstance(config, Mapping):
        return stage_config(section, base=merged(base or {}, dict(config)))
    raise ConfigError(f"{section} settings must be a {cls.__name__}, a dict or a YAML path, not "
                      f"{type(config).__name__}", "pass e.g. {'data': {'source': 'digits'}}")


def _console(quiet: bool):
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


@contextlib.contextmanager
def _session(log: Sequence[str] = ()) -> Iterator[None]:
    """Log to ``log`` (e.g. ``["tensorboard"]``) besides metrics.jsonl; leave the process group of a torchrun
    launch after each call, as the command line does."""
    from . import distributed
    from .logsinks import logging_to

    try:
        with logging_to(log):
            yield
    finally:
        distributed.shutdown()


def train_large(config: Any = None, *, out: str | Path = "runs/large", resume: bool = False,
                overwrite: bool = False, quiet: bool = False, log: Sequence[str] = ()) -> StageResult:
    """Train (or, with ``epochs: 0``, load and evaluate) the large teacher; writes ``out/teacher.pt``."""
    from .stages import train_large as stage

    cfg = _config("train_large", config)
    with _session(log):
        metrics = stage.run(cfg, out, resume=resume, overwrite=overwrite, console=_console(quiet), quiet=quiet)
    out = Path(out)
    return StageResult("train_large", out, out / stage.ARTIFACT, dict(metrics or {}))


def precompute(config: Any = None, *, teacher: str | Path | None = None, model: str | None = None,
               checkpoint: str | Path | None = None, out: str | Path | None = None, overwrite: bool = False,
               quiet: bool = False, log: Sequence[str] = ()) -> StageResult:
    """Store the teacher's logits over the data (``teacher`` a teacher.pt, or ``model`` with ``checkpoint``);
    writes ``out`` (default: targets.h5 beside the teacher). The teacher's recorded data is the default, so
    ``{"data": {"labeled_per_class": 10}}`` changes one setting of it."""
    from .stages import precompute as stage

    source = stage.open_teacher(teacher, model, checkpoint)
    cfg = _config("precompute", config, base=stage.config_base(source))
    path = stage.resolve_out(out, source)
    with _session(log):
        result = stage.run(cfg, source, path, overwrite=overwrite, console=_console(quiet), quiet=quiet)
    return StageResult("precompute", path.parent, path, dict(result))


def distill(config: Any = None, *, targets: str | Path, out: str | Path = "runs/distill", resume: bool = False,
            overwrite: bool = False, quiet: bool = False, log: Sequence[str] = ()) -> StageResult:
    """Distill a student from a targets store (``reducedmpl``, ``kd`` or ``supervised`` mode); writes
    ``out/student.pt``."""
    from .stages import distill as stage

    cfg = _config("distill", config)
    with _session(log):
        result = stage.run(cfg, targets, out, resume=resume, overwrite=overwrite, console=_console(quiet),
                           quiet=quiet)
    out = Path(out)
    return StageResult("distill", out, out / stage.ARTIFACT, dict(result or {}))


def run(pipeline: str | Path | Mapping[str, Any], *, out_root: str | Path = "runs", overrides: Sequence[str] = (),
        force: Sequence[str] = (), quiet: bool = False, log: Sequence[str] = ()) -> RunResult:
    """Every stage of a pipeline (a YAML file, or a dict with its sections), cached by key as ``reducedmpl run``
    does, then the comparison and the report. ``overrides`` are ``--set`` items (``"distill.steps=50"``); ``log=["tensorboard"]`` also writes TensorBoard
    events beside every metrics.jsonl."""
    from .pipeline import run_pipeline

    with _session(log):
        console = _console(quiet)
        done = run_pipeline(pipeline if isinstance(pipeline, (str, Path)) else dict(pipeline), overrides,
                            force=force, out_root=out_root, console=console, stage_console=console, quiet=quiet)
    teacher = done.get("teacher")
    rows = [{"run": s.run, "mode": s.mode, "seeds": list(s.seeds), "test_acc": list(s.test), "val_acc": list(s.val),
             "test_acc_mean": s.test_stats[0], "test_acc_std": s.test_stats[1], "cost": s.cost}
            for s in done["summaries"]]
    return RunResult(Path(done["run_dir"]), [tuple(s) for s in done["stages"]], rows,
                     None if teacher is None else {"arch": teacher.arch, "test_acc": teacher.test,
                                                   "val_acc": teacher.val, "cost": teacher.cost},
                     Path(done["run_dir"]) / "report" / "report.md")
