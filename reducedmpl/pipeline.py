"""``reducedmpl run``: every stage of a pipeline file in order, each cached under a key.

A pipeline file has the sections ``name``, ``data``, ``train_large``, ``precompute``, ``distill`` and
``compare`` (see :mod:`reducedmpl.config`). :func:`load_pipeline` resolves and validates all of them,
:func:`plan` turns them into stages, :func:`execute` runs the stages that are not up to date.

Keys and folders
----------------
Every stage's output folder is ``RUN_DIR/LABEL-KEY8`` (``large-1a2b3c4d``, ``targets-...``,
``distill-kd-0-...``), where the key is the sha256 of the stage's resolved config, the key of the stage it
reads (so a change upstream changes every key after it, without hashing a large artifact again), and the
tool version. Settings that only change speed (``num_workers``, ``memory_budget_mb``) are left out of the key.
A stage is

* ``cached`` when its folder holds the complete artifact under the same key and every stage before it is
  cached too (a stage whose input was recomputed in this run is recomputed as well);
* ``resume`` when its folder holds an interrupted run of the same key (``last.pt``, or finished shards of the
  targets store): the stage continues where it stopped;
* ``run`` otherwise (also under ``--force``): whatever the folder holds is removed first.

``RUN_DIR/index.json`` names the current folder of every stage (``report`` reads it), and a relative
symlink ``RUN_DIR/LABEL -> LABEL-KEY8`` gives the stable paths of the design (``runs/NAME/large/teacher.pt``).
Folders of older keys stay on disk, so switching a setting back is a cache hit; delete them by hand.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.table import Table

from . import __version__
from .advice import advise
from .config import (PIPELINE_KEYS, SECTIONS, CompareConfig, DistillConfig, PrecomputeConfig,
                     TrainLargeConfig, apply_overrides, data_over, merge_data, merged, nearest, parse_override,
                     read_yaml, short_repr, stage_config, to_dict)
from .errors import ConfigError, DataError, UserError
from .files import write_json
from .run_index import INDEX_FILE

KINDS = ("train_large", "precompute", "distill")
STAGE_FILE = "stage.json"
NOT_IN_KEY = frozenset({"num_workers", "start_method", "memory_budget_mb"})  # speed only: never change a result
STATUS_STYLE = {"cached": "green", "resume": "yellow", "run": "bold"}


# ---------------------------------------------------------------------------------------------- the file
@dataclass
class DistillRun:
    """One distillation of the pipeline: a compare run (or the plain distill section) with one seed."""

    name: str
    seed: int
    config: DistillConfig

    @property
    def label(self) -> str:
        """Folder label ``distill-MODE[-NAME]-SEED`` (the name is left out when it is the mode)."""
        variant = "" if self.name == self.config.mode else f"-{self.name}"
        return f"distill-{self.config.mode}{variant}-{self.seed}"


@dataclass
class Pipeline:
    """A resolved, validated pipeline file."""

    name: str
    path: Path
    train_large: TrainLargeConfig
    precompute: PrecomputeConfig
    distills: list[DistillRun]
    baseline: str | None = None  # run whose per-seed differences the comparison reports


def load_pipeline(path: str | Path | dict, overrides: Sequence[str] = ()) -> Pipeline:
    """Read ``path`` (or take a dict with the file's sections), apply ``--set`` overrides (pipeline namespace:
    ``distill.steps=50``) and validate."""
    if isinstance(path, dict):
        if not isinstance(path.get("name"), str):
            raise ConfigError("a pipeline given as a dict needs a 'name'", "add e.g. 'name': 'digits'")
        doc, path = path, Path(f"<pipeline {path['name']}>")
    else:
        path = Path(path)
        doc = read_yaml(path)
    valid = PIPELINE_KEYS | set(SECTIONS)
    for key in doc:
        if key not in valid:
            raise ConfigError(f"unknown section {key!r} in {path}", nearest(str(key), valid))
    for item in overrides:
        keys, _ = parse_override(item)
        if keys[0] not in valid:
            raise ConfigError(f"--set {item!r}: unknown section {keys[0]!r}", nearest(keys[0], valid))
    doc = {k: ({} if v is None and k != "name" else v) for k, v in copy.deepcopy(doc).items()}
    apply_overrides(doc, overrides)

    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"pipeline name {short_repr(name)} in {path} is not a folder name",
                          "use letters, digits, '-', '_' or '.', e.g. name: digits")
    data = _section(doc, "data", path)
    tl_raw = _section(doc, "train_large", path)
    tl = stage_config("train_large", base={**tl_raw, "data": data_over(data, tl_raw.get("data"))})

    # precompute runs over the data the teacher records: train_large's resolved data, its own data over it
    pc_raw = _section(doc, "precompute", path)
    pc = stage_config("precompute", base={**pc_raw, "data": data_over(to_dict(tl.data), pc_raw.get("data"))})

    # each compare run is a set of distill overrides over the distill section; without compare, one run
    distill_raw = _section(doc, "distill", path)
    plain = stage_config("distill", base=distill_raw)
    compare = stage_config("compare", base=_section(doc, "compare", path)) if doc.get("compare") else None
    runs = [(r["name"], {k: v for k, v in r.items() if k != "name"}) for r in compare.runs] if compare \
        else [(plain.mode, {})]
    seeds = compare.seeds if compare is not None and compare.seeds is not None else [plain.seed]
    distills = []
    for run_name, run_overrides in runs:
        for seed in seeds:
            try:
                cfg = stage_config("distill", base=merged(distill_raw, {**run_overrides, "seed": seed}))
                # distill's data comes from the store (precompute's data); its own data settings go over it
                merge_data(to_dict(pc.data), cfg.data, "distill.data")
            except ConfigError as e:
                raise ConfigError(f"compare run {run_name!r}: {e}" if compare else str(e)) from None
            distills.append(DistillRun(run_name, seed, cfg))
    return Pipeline(name, path, tl, pc, distills, _baseline(compare, distills))


def _section(doc: dict, key: str, path: Path) -> dict:
    value = doc.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"section {key!r} in {path} must be a mapping", "write it as a YAML section")
    return value


def _baseline(compare: CompareConfig | None, distills: list[DistillRun]) -> str | None:
    if compare is None:
        return None
    if compare.baseline is not None:
        return compare.baseline
    names = [d.name for d in distills]
    if "kd" in names:
        return "kd"
    return next((d.name for d in distills if d.config.mode == "kd"), None)


# ---------------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    """One step of the plan: what runs, under which key, in which folder, and whether it must run."""

    kind: str  # train_large | precompute | distill
    label: str  # large | targets | distill-MODE[-NAME]-SEED
    config: Any
    key: str
    folder: Path
    upstream: Stage | None = None
    run: DistillRun | None = None
    status: str = "run"  # cached | resume | run
    result: dict = field(default_factory=dict)

    @property
    def artifact(self) -> Path:
        return self.folder / {"train_large": "teacher.pt", "precompute": "targets.h5",
                              "distill": "student.pt"}[self.kind]


def stage_key(kind: str, config: Any, upstream: Stage | None) -> str:
    """sha256 of the resolved config, the upstream stage's key and the tool version; for the stages that train,
    also the number of processes under torchrun (BatchNorm statistics and augmentation are per rank, so 1 and N
    processes train different networks). A targets store is the same for any number of processes."""
    payload = {"stage": kind, "config": _without(to_dict(config), NOT_IN_KEY),
               "upstream": upstream.key if upstream is not None else None, "tool_version": __version__}
    from .distributed import env_world_size

    processes = env_world_size()
    if kind != "precompute" and processes > 1:  # one process keeps the keys it always had
        payload["processes"] = processes
    payload.update(_weights_key(config))
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _weights_key(config: Any) -> dict:
    """Where a training stage's starting weights come from, so a changed file changes the key: a checkpoint by
    size and modification time (``init_file``), hub weights by hub id, revision and sha256 (``weights``)."""
    name = getattr(config, "model", None) or getattr(config, "student", None)
    init = getattr(config, "init", None) or getattr(config, "student_init", "scratch")
    if name is None or init == "scratch":
        return {}
    if init.startswith("checkpoint:"):
        ckpt = Path(init.split(":", 1)[1])
        return {"init_file": [ckpt.stat().st_size, ckpt.stat().st_mtime_ns] if ckpt.is_file() else None}
    from .models import model_source

    try:
        return {"weights": model_source(name, init).record()}
    except UserError as e:  # not resolvable now: the stage runs, and says why
        return {"weights": {"error": str(e)}}


def _without(obj: Any, names: frozenset[str]) -> Any:
    if isinstance(obj, dict):
        return {k: _without(v, names) for k, v in obj.items() if k not in names}
    return obj


def plan(pipe: Pipeline, out_root: str | Path = "runs", force: Sequence[str] = ()) -> list[Stage]:
    """The stages of ``pipe`` in order, with keys, folders and statuses (nothing is written)."""
    run_dir = Path(out_root) / pipe.name

    def make(kind: str, label: str, config: Any, upstream: Stage | None, run: DistillRun | None = None) -> Stage:
        key = stage_key(kind, config, upstream)
        return Stage(kind, label, config, key, run_dir / f"{label}-{key[:8]}", upstream, run)

    large = make("train_large", "large", pipe.train_large, None)
    targets = make("precompute", "targets", pipe.precompute, large)
    stages = [large, targets] + [make("distill", d.label, d.config, targets, d) for d in pipe.distills]
    forced = _forced(stages, force)
    for stage in stages:
        fresh_input = stage.upstream is not None and stage.upstream.status != "cached"
        if stage.label in forced or fresh_input:
            stage.status = "run"
        elif _is_complete(stage):
            stage.status = "cached"
        elif _is_resumable(stage):
            stage.status = "resume"
        else:
            stage.status = "run"
    return stages


def _forced(stages: list[Stage], force: Sequence[str]) -> set[str]:
    """Labels forced by ``--force``: a stage name (and every stage after it) or one distill label."""
    aliases = {"train_large": "train_large", "large": "train_large", "precompute": "precompute",
               "targets": "precompute", "distill": "distill"}
    labels = [s.label for s in stages]
    forced: set[str] = set()
    for name in force:
        if name in aliases:
            first = KINDS.index(aliases[name])
            forced |= {s.label for s in stages if KINDS.index(s.kind) >= first}
        elif name in labels:
            forced.add(name)
        else:
            raise ConfigError(f"--force {name!r} names no stage of this pipeline",
                              nearest(name, [*aliases, *labels]))
    return forced


def _stage_record(stage: Stage) -> dict | None:
    try:
        return json.loads((stage.folder / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(stage: Stage) -> bool:
    record = _stage_record(stage)
    if record is None or record.get("key") != stage.key or not stage.artifact.exists():
        return False
    if stage.kind == "precompute":
        return True  # the master is written last, once every shard is complete
    done = not (stage.folder / "last.pt").exists()
    return done and (stage.kind != "distill" or (stage.folder / "result.json").exists())


def _is_resumable(stage: Stage) -> bool:
    record = _stage_record(stage)
    if record is None or record.get("key") != stage.key:
        return False
    if stage.kind == "precompute":
        from .targets import store_files

        return any(not p.name.startswith(".") for p in store_files(stage.artifact))
    return (stage.folder / "last.pt").exists()


def preflight(stages: list[Stage]) -> None:
    """Fail fast, before computing anything, when a stage that must run names an unknown timm model, or a data
    path or checkpoint that does not exist (only existence is checked: nothing is loaded). Cached stages are
    not checked, so a fully cached run needs neither its data nor timm."""
    from .models import check_model_name

    for stage in stages:
        if stage.status == "cached":
            continue
        if stage.kind != "precompute":
            check_model_name(stage.config.model if stage.kind == "train_large" else stage.config.student)
        if stage.kind == "train_large":
            _check_source(stage.config.data.source, "train_large.data.source")
            init = stage.config.init
            if init.startswith("checkpoint:") and not Path(init.split(":", 1)[1]).is_file():
                raise DataError(f"train_large.init checkpoint {init.split(':', 1)[1]} does not exist",
                                "check the path, or pass --set train_large.init=scratch")
        elif stage.kind == "precompute":
            _check_source(stage.config.data.source, "precompute.data.source")
        else:  # distill reads the store's data unless its own data section names another source
            source = (stage.config.data or {}).get("source", stage.upstream.config.data.source)
            _check_source(source, "distill.data.source")


def _check_source(spec: str, where: str) -> None:
    from .data.sources import spec_problem

    problem = spec_problem(spec)
    if problem:
        kind = spec.partition(":")[0]
        raise DataError(f"{where} {spec!r}: {problem}",
                        f"point it at your data, e.g. --set data.source={kind}:/path/to/data")


# ---------------------------------------------------------------------------------------------- running
def print_plan(stages: list[Stage], console: Console) -> None:
    table = Table(title="plan", title_justify="left")
    for column in ("stage", "key", "status", "output"):
        table.add_column(column, overflow="fold")
    for s in stages:
        table.add_row(s.label, s.key[:8], f"[{STATUS_STYLE[s.status]}]{s.status}[/]", str(s.folder))
    console.print(table)


def execute(pipe: Pipeline, stages: list[Stage], console: Console, stage_console: Console,
            quiet: bool = False) -> bool:
    """Run every stage that is not cached, in order; False when nothing changed (every stage cached, same index).

    Under torchrun every rank runs the stages; rank 0 alone prepares their folders and writes the index."""
    from . import distributed

    dist = distributed.current()
    if not dist.is_main:
        for stage in stages:
            if stage.status == "cached":
                stage.result = _cached_result(stage)
            else:
                dist.barrier()  # rank 0 has prepared the stage's folder
                stage.result = RUNNERS[stage.kind](stage, stage_console, quiet)
        return False
    run_dir = stages[0].folder.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    changed = _write_index(pipe, stages, run_dir)
    for i, stage in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {stage.label} (key {stage.key[:8]})"
        if stage.status == "cached":
            console.print(f"{head}: skipped, up to date in {stage.folder}", highlight=False)
            stage.result = _cached_result(stage)
            _link(run_dir / stage.label, stage.folder)
            continue
        verb = "resuming" if stage.status == "resume" else "running"
        console.print(f"{head}: {verb} -> {stage.folder}", highlight=False)
        if stage.status == "run" and stage.folder.exists():
            shutil.rmtree(stage.folder)
        stage.folder.mkdir(parents=True, exist_ok=True)
        record = {"stage": stage.kind, "label": stage.label, "key": stage.key,
                  "upstream": stage.upstream.key if stage.upstream else None, "tool_version": __version__,
                  "config": to_dict(stage.config)}
        write_json(stage.folder / STAGE_FILE, record, indent=1)
        dist.barrier()  # the other ranks wait for the folder
        t0 = time.perf_counter()
        stage.result = RUNNERS[stage.kind](stage, stage_console, quiet)
        console.print(f"{head}: {_summary(stage)} in {time.perf_counter() - t0:.1f} s", highlight=False)
        _link(run_dir / stage.label, stage.folder)
        changed = True
    return changed


def _run_train_large(stage: Stage, console: Console, quiet: bool) -> dict:
    from .stages import train_large

    return train_large.run(stage.config, stage.folder, resume=stage.status == "resume", console=console,
                           quiet=quiet)


def _run_precompute(stage: Stage, console: Console, quiet: bool) -> dict:
    from .engine.interrupt import graceful_stop
    from .stages import precompute

    teacher = precompute.open_teacher(stage.upstream.artifact)
    with graceful_stop(notice=precompute.STOP_NOTICE):  # Ctrl-C between batches
        return precompute.run(stage.config, teacher, stage.artifact, console=console, quiet=quiet)


def _run_distill(stage: Stage, console: Console, quiet: bool) -> dict:
    import dataclasses

    from .stages import distill

    cfg = stage.config
    if cfg.mode == "online-kd" and cfg.large_teacher is None:  # the pipeline's own teacher
        cfg = dataclasses.replace(cfg, large_teacher=str(stage.upstream.upstream.artifact))
    return distill.run(cfg, stage.upstream.artifact, stage.folder, resume=stage.status == "resume",
                       console=console, quiet=quiet)


RUNNERS: dict[str, Callable[[Stage, Console, bool], dict]] = {
    "train_large": _run_train_large, "precompute": _run_precompute, "distill": _run_distill}


def _cached_result(stage: Stage) -> dict:
    """What a finished stage reported: result.json (distill), else the final row of metrics.jsonl."""
    from .engine.runs import read_jsonl

    if stage.kind == "distill":
        return json.loads((stage.folder / "result.json").read_text())
    metrics = stage.folder / "metrics.jsonl"
    rows = read_jsonl(metrics) if metrics.exists() else []
    return next((r for r in reversed(rows) if r.get("final")), {})


def _summary(stage: Stage) -> str:
    r = stage.result
    if stage.kind == "precompute":
        acc = r.get("accuracy", {})
        return f"{r.get('rows', '?')} rows, teacher acc " + ", ".join(f"{k} {_pct(v)}" for k, v in acc.items())
    return f"val acc {_pct(r.get('val_acc'))}, test acc {_pct(r.get('test_acc'))}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _write_index(pipe: Pipeline, stages: list[Stage], run_dir: Path) -> bool:
    """Write ``index.json``; False (and the file left alone) when it already says the same."""
    entries = []
    for s in stages:
        entry = {"label": s.label, "stage": s.kind, "key": s.key, "folder": s.folder.name}
        if s.run is not None:
            entry.update(run=s.run.name, mode=s.run.config.mode, seed=s.run.seed)
        entries.append(entry)
    runs = list(dict.fromkeys(d.name for d in pipe.distills))
    index = {"name": pipe.name, "pipeline": str(pipe.path), "tool_version": __version__, "runs": runs,
             "baseline": pipe.baseline, "stages": entries}
    try:
        if json.loads((run_dir / INDEX_FILE).read_text()) == index:
            return False
    except (OSError, ValueError):
        pass
    write_json(run_dir / INDEX_FILE, index, indent=1)
    return True


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """One ``run`` at a time per run folder (an OS lock on ``RUN_DIR/.lock``, released when the process ends)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    with open(run_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another `reducedmpl run` is working in {run_dir}",
                            "wait for it to finish (or use another --out-root)") from None
        yield


def _link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` (relative symlink, replaced atomically); a real folder there is left alone."""
    if link.exists() and not link.is_symlink():
        return
    tmp = link.with_name(f".{link.name}.link")
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # a file system without symlinks: index.json still names the folder
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- entry point
def run_pipeline(path: str | Path | dict, overrides: Sequence[str] = (), *, force: Sequence[str] = (),
                 dry_run: bool = False, out_root: str | Path = "runs", console: Console | None = None,
                 stage_console: Console | None = None, quiet: bool = False) -> dict:
    """Plan and (unless ``dry_run``) run a pipeline, then compare the distill runs and write the report.

    Returns ``{"run_dir", "stages": [(label, status, folder)], "summaries"}``.
    """
    from . import distributed
    from .engine.device import resolve_device

    console = console or Console()
    stage_console = stage_console or Console(stderr=True)
    pipe = load_pipeline(path, overrides)
    stages = plan(pipe, out_root, force)
    preflight(stages)
    dist = distributed.setup(resolve_device(stages[0].config.device)) if not dry_run else distributed.current()
    if dist.enabled:  # rank 0's view of what is cached is the one every rank follows
        for stage, status in zip(stages, dist.broadcast([s.status for s in stages])):
            stage.status = status
        if not dist.is_main:
            console, stage_console, quiet = Console(quiet=True), Console(quiet=True), True
    overview = [(s.label, s.status, str(s.folder)) for s in stages]
    run_dir = Path(out_root) / pipe.name
    if dry_run:
        print_plan(stages, console)
        todo = sum(s.status != "cached" for s in stages)
        console.print(f"dry run: {todo} of {len(stages)} stages would be computed; nothing was run", highlight=False)
        return {"run_dir": run_dir, "stages": overview, "summaries": []}

    from . import report

    with contextlib.ExitStack() as held:
        dist.on_main(lambda: held.enter_context(_run_lock(run_dir)) and None)
        changed = execute(pipe, stages, console, stage_console, quiet)
        if not dist.is_main:
            return {"run_dir": run_dir, "stages": overview, "summaries": []}
        report_md = run_dir / "report" / "report.md"
        if changed or not report_md.exists():
            written = report.write_report(run_dir, console=stage_console)
            summaries, teacher, status = written.summaries, written.teacher, ""
        else:  # same stages, same results: the report on disk is this one (`reducedmpl report` redraws it)
            summaries = report.aggregate(report.collect_results(run_dir), pipe.baseline)
            teacher, status = report.teacher_summary(run_dir), " (up to date)"
    console.print(report.comparison_table(summaries, pipe.baseline, teacher))
    tip = advise(teacher.val if teacher is not None else None, summaries)
    if tip:
        console.print(tip, highlight=False)
    console.print(f"comparison: {run_dir / 'comparison.md'}, {run_dir / 'comparison.csv'}; "
                  f"report{status}: {report_md}", highlight=False)
    return {"run_dir": run_dir, "stages": overview, "summaries": summaries, "teacher": teacher}
