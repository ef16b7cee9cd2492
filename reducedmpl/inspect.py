"""``reducedmpl inspect``: what an artifact holds, and whether it is sound.

Pure functions return plain dicts (usable from Python and notebooks); :func:`render` prints one as tables.
Every report has ``kind`` and ``problems``: an empty list means the artifact is sound.

* targets store (``targets.h5`` or its folder): :func:`reducedmpl.targets.verify_store` - rows per split, the
  teacher's accuracy / entropy / calibration (and, for a store of views, accuracy and entropy per view), NaN/Inf,
  shard completeness and provenance.
* ``teacher.pt`` / ``student.pt``: what the artifact records, and a soundness check - its state dict loads
  strictly into the timm model it names and every weight is finite.
* ``reduced_teacher.pt``: its shape and provenance; it loads strictly into a ``ReducedTeacher`` of that shape.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from .errors import UserError
from .files import HDF5_SIGNATURE, ZIP_SIGNATURE, file_head
from .targets import MASTER_NAME, TargetStore, class_names_problem, verify_store

ARTIFACT_KINDS = ("teacher", "student")


# ---------------------------------------------------------------------------------------------- detection
def inspect_path(path: str | Path, *, latency: bool = True, runs: int | None = None) -> dict[str, Any]:
    """Inspect a targets store, teacher.pt or student.pt; anything else is a UserError.

    For a teacher or student the report's ``cost`` holds parameters, FLOPs per image, size on disk and (unless
    ``latency`` is False) the latency measured here, ``runs`` timed passes per batch size
    (:mod:`reducedmpl.cost`)."""
    path = Path(path)
    if path.is_dir():
        path = path / MASTER_NAME
    if path.suffix in (".h5", ".hdf5") or file_head(path) == HDF5_SIGNATURE:
        return inspect_store(path)
    if not path.exists():
        raise UserError(f"{path} does not exist", "pass a targets.h5, teacher.pt or student.pt")
    if path.suffix not in (".pt", ".pth") and not file_head(path).startswith(ZIP_SIGNATURE):
        raise UserError(f"{path} is neither a targets store nor a reducedmpl teacher/student artifact",
                        "pass a targets.h5, teacher.pt or student.pt")
    return inspect_artifact(path, latency=latency, runs=runs)



# ---------------------------------------------------------------------------------------------- targets
def inspect_store(path: str | Path) -> dict[str, Any]:
    """:func:`verify_store` plus the parsed provenance; a missing master with shards beside it is reported."""
    path = Path(path)
    if not path.exists():
        from .targets import store_files

        leftovers = store_files(path) if path.parent.is_dir() else []
        if not leftovers:
            raise UserError(f"{path} does not exist", "pass a targets.h5, teacher.pt or student.pt")
        temps = sum(p.name.endswith(".tmp") for p in leftovers)
        return {"kind": "targets", "path": str(path), "leftovers": [p.name for p in leftovers],
                "problems": [f"{path} does not exist: {len(leftovers) - temps} shard(s) and {temps} temporary "
                             f"file(s) of an interrupted precompute are there; run the same precompute command "
                             f"again to finish it"]}
    report = {"kind": "targets", **verify_store(path)}
    prov = report.get("provenance", {})
    for key in ("fingerprints", "config"):
        if isinstance(prov.get(key), str):
            try:
                prov[key] = json.loads(prov[key])
            except json.JSONDecodeError:
                pass
    if not report["problems"]:
        _check_store_classes(path, report)
    return report


def _check_store_classes(path: Path, report: dict[str, Any]) -> None:
    """The store's class names against those of the data it records, when that data can be listed here."""
    from .data.sources import load_source

    spec = report.get("provenance", {}).get("data_spec")
    try:
        with TargetStore.open(path, memory_budget_bytes=0) as store:
            names = list(store.meta.class_names)
            recorded = store.meta.config.get("data") if isinstance(store.meta.config, dict) else None
        source = load_source(str(spec), _data_settings(recorded, str(spec)))
    except UserError:
        report["data_checked"] = False  # the data is not here: its class names cannot be compared
        return
    report["data_checked"] = True
    problem = class_names_problem(names, source.class_names, f"the store (data {spec})")
    if problem:
        report["problems"].append(problem)


def _data_settings(recorded: Any, spec: str) -> Any:
    """The data settings a store records (an ``hf:`` source's columns and splits), when they are for ``spec``."""
    from .config import DataConfig, from_dict

    if not isinstance(recorded, dict) or recorded.get("source") != spec:
        return None
    return from_dict(DataConfig, recorded, "data")


# ---------------------------------------------------------------------------------------------- artifacts
def inspect_artifact(path: str | Path, *, latency: bool = True, runs: int | None = None) -> dict[str, Any]:
    """What a teacher.pt / student.pt records, whether its weights are sound, and what it costs to run."""
    import torch

    from .models import ARTIFACT_KEYS, safe_load

    path = Path(path)
    obj = safe_load(path, what="artifact")
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if kind == "reduced_teacher":
        return inspect_reduced_teacher(path, obj)
    if kind not in ARTIFACT_KINDS:
        found = f"kind {kind!r}" if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path} is neither a targets store nor a reducedmpl teacher/student artifact ({found})",
                        "pass a targets.h5, teacher.pt or student.pt")
    problems: list[str] = []
    missing = [k for k in ARTIFACT_KEYS if k not in obj]
    if missing:
        problems.append(f"lacks {', '.join(missing)}")
    prep = obj.get("preprocess") if isinstance(obj.get("preprocess"), dict) else {}
    data = obj.get("data") if isinstance(obj.get("data"), dict) else {}
    report: dict[str, Any] = {
        "kind": kind, "path": str(path), "arch": obj.get("arch"), "model_name": obj.get("model_name"),
        "model_args": obj.get("model_args") or {}, "weights": obj.get("weights") or {},
        "crop_pct": prep.get("crop_pct"), "interpolation": prep.get("interpolation"),
        "num_classes": obj.get("num_classes"),
        "class_names": list(obj.get("class_names") or []), "in_chans": obj.get("in_chans"),
        "input_size": obj.get("input_size") or ([prep.get("in_chans"), prep.get("input_size"),
                                                 prep.get("input_size")] if prep else None),
        "mean": prep.get("mean"), "std": prep.get("std"), "data_source": data.get("source"),
        "split_seed": data.get("split_seed"), "fingerprints": obj.get("data_fingerprints") or {},
        "split_sizes": obj.get("split_sizes") or {}, "metrics": obj.get("metrics") or {},
        "tool_version": obj.get("tool_version"), "parameters": None, "nonfinite_values": None, "cost": None,
        "problems": problems,
    }
    sd = obj.get("state_dict")
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        problems.append("state_dict is missing or is not a mapping of tensors")
        return report
    report["parameters"] = int(sum(v.numel() for v in sd.values() if v.is_floating_point()))
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in sd.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    report["nonfinite_values"] = sum(bad.values())
    if bad:
        problems.append(f"{sum(bad.values())} NaN/Inf weight values in {len(bad)} tensor(s), e.g. "
                        f"{next(iter(bad))}")
    if isinstance(report["num_classes"], int) and report["class_names"] \
            and len(report["class_names"]) != report["num_classes"]:
        problems.append(f"num_classes is {report['num_classes']} but {len(report['class_names'])} class names")
    problem, model = _strict_load_problem(sd, report, prep)
    if problem:
        problems.append(problem)
    elif not bad:
        from . import cost

        shape = [int(report["in_chans"]), int(prep.get("input_size") or 0), int(prep.get("input_size") or 0)]
        figures = cost.model_cost(model, shape, latency=latency, runs=runs or cost.DEFAULT_RUNS)
        report["cost"] = {"size_bytes": path.stat().st_size, **figures}
    return report


REDUCED_TEACHER_KEYS = ("kind", "state_dict", "num_classes", "config", "targets_run_key", "tool_version")


def inspect_reduced_teacher(path: Path, obj: dict) -> dict[str, Any]:
    """What a ``reduced_teacher.pt`` (written by ``distill --mode reducedmpl``) records, and whether its weights
    are finite and load strictly into :class:`reducedmpl.mpl.ReducedTeacher` of its recorded shape."""
    import torch

    from .mpl import ReducedTeacher

    problems: list[str] = []
    missing = [k for k in REDUCED_TEACHER_KEYS if k not in obj]
    if missing:
        problems.append(f"lacks {', '.join(missing)}")
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    report: dict[str, Any] = {
        "kind": "reduced_teacher", "path": str(path), "num_classes": obj.get("num_classes"), "config": config,
        "targets_run_key": obj.get("targets_run_key"), "tool_version": obj.get("tool_version"),
        "parameters": None, "nonfinite_values": None, "temperature": None, "problems": problems,
    }
    sd = obj.get("state_dict")
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        problems.append("state_dict is missing or is not a mapping of tensors")
        return report
    report["parameters"] = int(sum(v.numel() for v in sd.values() if v.is_floating_point()))
    report["nonfinite_values"] = int(sum(int((~torch.isfinite(v)).sum()) for v in sd.values()
                                         if v.is_floating_point()))
    if report["nonfinite_values"]:
        problems.append(f"{report['nonfinite_values']} NaN/Inf weight values")
    try:
        model = ReducedTeacher(int(obj["num_classes"]), **{k: config[k] for k in
                                                          ("hidden", "depth", "extra_features", "learn_temperature")
                                                          if k in config})
        model.load_state_dict(sd, strict=True)
        report["temperature"] = model.temperature
    except Exception as e:  # noqa: BLE001 - any failure is a finding, not a crash
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        problems.append(f"state_dict does not load strictly into a ReducedTeacher of the recorded shape: "
                        f"{first[:160]}")
    return report


def _reduced_teacher_rows(r: dict) -> list[tuple[str, str]]:
    config = r.get("config") or {}
    return [
        ("path", r["path"]), ("kind", "reduced teacher (MLP over the large teacher's log-probabilities)"),
        ("classes", str(r.get("num_classes"))),
        ("shape", ", ".join(f"{k} {v}" for k, v in config.items()) or "n/a"),
        ("temperature", "n/a" if r.get("temperature") is None else f"{r['temperature']:.4g}"),
        ("targets run key", str(r.get("targets_run_key"))[:12]),
        ("parameters", "n/a" if r.get("parameters") is None else f"{r['parameters']:,}"),
        ("NaN/Inf values", "n/a" if r.get("nonfinite_values") is None else f"{r['nonfinite_values']:,}"),
        ("tool version", str(r.get("tool_version"))),
    ]


def _strict_load_problem(sd: dict, report: dict, prep: dict) -> tuple[str | None, Any]:
    """(None, the model) when ``sd`` loads strictly into ``timm.create_model(arch, num_classes, in_chans)``,
    else (the problem, None)."""
    from .models import create_model

    arch, classes, chans = report["arch"], report["num_classes"], report["in_chans"]
    if not isinstance(arch, str) or not isinstance(classes, int) or not isinstance(chans, int):
        return "arch, num_classes or in_chans is missing, so the weights cannot be checked", None
    try:
        model = create_model(arch, classes, chans, input_size=prep.get("input_size"), **report["model_args"])
        model.load_state_dict(sd, strict=True)
    except Exception as e:  # noqa: BLE001 - any failure is a finding, not a crash
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        return f"state_dict does not load strictly into timm {arch!r} ({classes} classes, {chans} channels): " \
               f"{first[:160]}", None
    return None, model


# ---------------------------------------------------------------------------------------------- output
def jsonable(obj: Any) -> Any:
    """The report with numpy scalars and non-finite floats made JSON-safe."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _fingerprints(fps: Any) -> str:
    if not isinstance(fps, dict) or not fps:
        return "none"
    return "  ".join(f"{k} {str(v)[:12]}" for k, v in fps.items())


def _store_rows(r: dict) -> list[tuple[str, str]]:
    p = r.get("provenance", {})
    rows = [("path", r["path"]), ("kind", "targets store")]
    if "leftovers" in r:
        return rows + [("files", ", ".join(r["leftovers"]))]
    per_split = r.get("rows_per_split") or {}
    rows += [
        ("rows", f"{r['rows']:,}  (" + ", ".join(f"{k} {v:,}" for k, v in per_split.items()) + ")"
         if r.get("rows") is not None else "n/a"),
        ("teacher accuracy", f"{_pct(r.get('teacher_accuracy'))} on {r.get('labeled_rows', 0):,} rows with labels"),
        ("mean entropy", "n/a" if r.get("mean_entropy") is None else f"{r['mean_entropy']:.4f} nats"),
        ("ECE (15 bins)", "n/a" if r.get("ece") is None else f"{r['ece']:.4f}"),
        ("NaN/Inf values", "n/a" if r.get("nonfinite_values") is None else f"{r['nonfinite_values']:,}"),
        ("layout", f"{'top-' + str(p['topk']) if p.get('topk') else 'dense'} {p.get('dtype', '?')} logits, "
                   f"temperature {p.get('temperature', '?')}, {p.get('num_classes', '?')} classes"
                   + _views_text(p)),
    ]
    shards = r.get("shards") or []
    done = sum(1 for s in shards if s.get("complete") and s.get("exists") and s.get("same_run", True))
    rows += [
        ("complete", f"master {r.get('master_complete')}, shards {done}/{len(shards)} complete of this run"),
        ("teacher", f"{p.get('teacher_arch', '?')}  sha256 {str(p.get('teacher_sha256', ''))[:12]}"),
        ("data", f"{p.get('data_spec', '?')}  split_seed {p.get('split_seed', '?')}"),
        ("fingerprints", _fingerprints(p.get("fingerprints"))),
        ("tool version", f"{p.get('tool_version', '?')}  (schema {p.get('schema_version', '?')}, run key "
                         f"{str(p.get('run_key', ''))[:12]})"),
    ]
    return rows


def _arch(r: dict) -> str:
    name = r.get("model_name")
    return str(r.get("arch")) + (f"  (as {name})" if name and name != r.get("arch") else "")


def _weights(w: Any) -> str:
    """Where an artifact's starting weights came from."""
    if not isinstance(w, dict) or not w:
        return "not recorded"
    if w.get("source") == "hf-hub":
        return f"pretrained: {w.get('hub_id')} @ {str(w.get('revision'))[:12]}  {w.get('file')}  sha256 " \
               f"{str(w.get('sha256'))[:12]}"
    if w.get("source") == "checkpoint":
        return f"checkpoint {w.get('file')}  sha256 {str(w.get('sha256'))[:12]}"
    return str(w.get("source"))


def _artifact_rows(r: dict) -> list[tuple[str, str]]:
    names = r.get("class_names") or []
    shown = ", ".join(map(str, names[:10])) + (", ..." if len(names) > 10 else "")
    metrics = r.get("metrics") or {}
    return [
        ("path", r["path"]), ("kind", f"{r['kind']} artifact"), ("arch", _arch(r)),
        ("weights", _weights(r.get("weights"))),
        ("classes", f"{r.get('num_classes')}  ({shown})"),
        ("input size", f"{r.get('input_size')}  mean {r.get('mean')}  std {r.get('std')}  crop_pct "
                       f"{r.get('crop_pct') if r.get('crop_pct') is not None else 'default'}  "
                       f"{r.get('interpolation') or 'bilinear'}"),
        ("data", f"{r.get('data_source')}  split_seed {r.get('split_seed')}"),
        ("fingerprints", _fingerprints(r.get("fingerprints"))),
        ("metrics", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
         or "none"),
        ("state dict", "n/a" if r.get("parameters") is None else f"{r['parameters']:,} values (parameters and "
                                                                   f"buffers)"),
        ("NaN/Inf values", "n/a" if r.get("nonfinite_values") is None else f"{r['nonfinite_values']:,}"),
        *_cost_rows(r.get("cost")),
        ("tool version", str(r.get("tool_version"))),
    ]


def _cost_rows(c: dict | None) -> list[tuple[str, str]]:
    from .cost import human

    if not c:
        return []
    rows = [("cost", f"{c['params']:,} parameters, {human(c['flops_per_image'], 'FLOPs')} per image "
                     f"(FlopCounterMode), {human(c['size_bytes'], 'B')} on disk")]
    for batch, lat in (c.get("latency") or {}).items():
        rows.append((f"latency, batch {batch}",
                     f"{lat['median_ms']:.3g} ms median ({lat['per_image_ms']:.3g} ms per image; min {lat['min_ms']:.3g}, "
                     f"max {lat['max_ms']:.3g}; {lat['runs']} runs after {lat['warmup']} warm-up) on "
                     f"{c.get('device_name')}, {c.get('threads')} torch thread(s)"))
    return rows


def render(report: dict, console: Console) -> None:
    """Print ``report`` as a table, then the problems (or 'sound')."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = _store_rows(report) if report["kind"] == "targets" else \
        _reduced_teacher_rows(report) if report["kind"] == "reduced_teacher" else _artifact_rows(report)
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    views = report.get("views") or []
    if len(views) > 1:
        console.print(_views_table(views))
    shards = report.get("shards") or []
    if len(shards) > 1:
        st = Table("shard", "rows", "complete", "same run")
        for s in shards:
            st.add_row(s["file"], str(s.get("rows", "?")), str(s.get("complete")), str(s.get("same_run", "?")))
        console.print(st)
    if report["problems"]:
        for problem in report["problems"]:
            console.print(f"problem: {problem}", style="red", highlight=False, soft_wrap=True)
    else:
        console.print("sound", style="green")


def _views_table(views: list[dict]) -> Table:
    """The teacher on each stored view (0: the clean input), and the augmented views together."""
    table = Table("view", "teacher accuracy", "mean entropy", title="the teacher on each stored view")
    for v in views:
        table.add_row(str(v["view"]), f"{_pct(v['teacher_accuracy'])} on {v['labeled_rows']:,} rows",
                      "n/a" if v["mean_entropy"] is None else f"{v['mean_entropy']:.4f} nats")
    acc = [v["teacher_accuracy"] for v in views[1:] if v["teacher_accuracy"] is not None]
    ent = [v["mean_entropy"] for v in views[1:] if v["mean_entropy"] is not None]
    if acc and ent:
        table.add_row(f"1..{len(views) - 1}", f"{_pct(sum(acc) / len(acc))} ({_pct(min(acc))}-{_pct(max(acc))})",
                      f"{sum(ent) / len(ent):.4f} nats")
    return table


def _views_text(provenance: dict) -> str:
    """``, 8 views (crop 2, flip, rand-m9-n2, mixup alpha 1; seed 0)`` for a store with augmented views, else
    nothing."""
    views = int(provenance.get("views", 1) or 1)
    if views <= 1:
        return ""
    try:
        policy = json.loads(provenance.get("view_policy") or "{}")
    except ValueError:
        policy = {}
    aug = [f"crop {policy['crop_padding']}" if policy.get("crop_padding") else "",
           "flip" if policy.get("hflip") else "", policy.get("randaugment") or "",
           f"mixup alpha {policy.get('mix_alpha', 1.0):g}" if policy.get("view_mix") == "mixup" else ""]
    return f", {views} views ({', '.join(a for a in aug if a) or 'no augmentation'}; seed {policy.get('seed', '?')})"
