"""What a model costs to run, measured: parameters, FLOPs per image, size on disk and latency.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (one multiply-add counts as 2 FLOPs; no layer is
counted by hand). Latency is the median wall time of ``runs`` forward passes in eval mode under
``torch.inference_mode``, after ``warmup`` passes, on one batch of zeros at the model's input size; the number
of torch threads and the device are recorded with it, since latency means nothing without them.

``artifact_cost`` measures a ``teacher.pt`` / ``student.pt``; ``cached_cost`` keeps the figures in
``cost.json`` beside the artifact and measures again only when the artifact, the thread count or the device
changed. ``cost_cells`` / ``COST_COLUMNS`` format them for the comparison tables, with student / teacher ratios.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

COST_FILE = "cost.json"
BATCHES = (1, 64)
DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3
BUDGET_S = 10.0  # per batch size: a large model on a CPU stops after this many seconds (at least 3 runs)


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (learned weights; buffers such as BatchNorm statistics are not parameters)."""
    return int(sum(p.numel() for p in model.parameters()))


def flops_per_image(model: nn.Module, input_shape: Sequence[int], batch: int = 2) -> int:
    """FLOPs of one forward pass per image, counted by ``FlopCounterMode`` on a batch of ``batch`` zeros."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(iter(model.parameters()), torch.empty(0)).device
    x = torch.zeros(batch, *input_shape, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // batch


def measure_latency(model: nn.Module, input_shape: Sequence[int], batch: int, *, runs: int = DEFAULT_RUNS,
                    warmup: int = DEFAULT_WARMUP, budget_s: float = BUDGET_S) -> dict[str, Any]:
    """Median (and min/max) milliseconds of one forward pass of ``batch`` images, after ``warmup`` passes.

    Stops early after ``budget_s`` seconds of timed runs (never before 3 runs); ``runs`` in the result says how
    many were timed."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    x = torch.zeros(batch, *input_shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            sync()
            start = time.perf_counter()
            for _ in range(max(1, runs)):
                t0 = time.perf_counter()
                model(x)
                sync()
                times.append(time.perf_counter() - t0)
                if len(times) >= 3 and time.perf_counter() - start > budget_s:
                    break
    finally:
        model.train(was_training)
    median = statistics.median(times) * 1e3
    return {"batch": batch, "median_ms": median, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
            "per_image_ms": median / batch, "runs": len(times), "warmup": warmup}


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where latency was measured: device, torch threads and torch version."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def model_cost(model: nn.Module, input_shape: Sequence[int], *, batches: Sequence[int] = BATCHES,
               runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP, latency: bool = True,
               budget_s: float = BUDGET_S) -> dict[str, Any]:
    """Parameters, FLOPs per image and (unless ``latency`` is False) latency at each batch size."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    out: dict[str, Any] = {"params": parameter_count(model), "flops_per_image": flops_per_image(model, input_shape),
                           "input_shape": list(input_shape)}
    if latency:
        out["latency"] = {str(b): measure_latency(model, input_shape, b, runs=runs, warmup=warmup, budget_s=budget_s)
                          for b in batches}
        out.update(environment(device))
    return out


def artifact_model(art: dict) -> tuple[nn.Module, list[int]]:
    """The timm model of a teacher/student artifact and its input shape (C, H, W)."""
    from .models import model_from_artifact

    prep = art["preprocess"]
    return model_from_artifact(art), [int(prep["in_chans"]), int(prep["input_size"]), int(prep["input_size"])]


def artifact_cost(path: str | Path, *, device: str = "cpu", runs: int = DEFAULT_RUNS, latency: bool = True,
                  art: dict | None = None) -> dict[str, Any]:
    """:func:`model_cost` of a ``teacher.pt`` / ``student.pt``, plus its size on disk and architecture."""
    from .models import safe_load

    path = Path(path)
    art = art if art is not None else safe_load(path, what="artifact")
    model, shape = artifact_model(art)
    model = model.to(device)
    cost = model_cost(model, shape, runs=runs, latency=latency)
    return {"arch": art.get("arch"), "kind": art.get("kind"), "size_bytes": path.stat().st_size, **cost}


def _stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "threads": torch.get_num_threads()}


def cached_cost(path: str | Path, *, runs: int = DEFAULT_RUNS) -> dict[str, Any] | None:
    """:func:`artifact_cost` of ``path`` on the CPU, kept in ``cost.json`` beside it; None when ``path`` is
    missing. Measured again when the artifact or the torch thread count changed since the file was written."""
    path = Path(path)
    if not path.is_file():
        return None
    cache = path.with_name(COST_FILE)
    stamp = _stamp(path)
    try:
        saved = json.loads(cache.read_text())
        if saved.get("stamp") == stamp and saved.get("runs") == runs:
            return saved["cost"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    cost = artifact_cost(path, runs=runs)
    try:
        from .files import write_json

        write_json(cache, {"stamp": stamp, "runs": runs, "cost": cost}, indent=1)
    except OSError:  # a read-only run folder: the figures are still returned
        pass
    return cost


# ---------------------------------------------------------------------------------------------- tables
COST_COLUMNS = ("params", "FLOPs/img", "ms b1", "ms/img b64")


def mean_cost(costs: Sequence[dict | None]) -> dict[str, Any] | None:
    """One run's cost over its seeds: parameters and FLOPs of the first, each latency the mean over the seeds
    (``per_seed_ms`` keeps the single figures)."""
    costs = [c for c in costs if c]
    if not costs:
        return None
    out = {**costs[0], "latency": {}}
    for key, first in (costs[0].get("latency") or {}).items():
        values = [c["latency"][key]["median_ms"] for c in costs if key in (c.get("latency") or {})]
        mean = sum(values) / len(values)
        out["latency"][key] = {**first, "median_ms": mean, "per_image_ms": mean / first["batch"],
                               "per_seed_ms": values}
    if not out["latency"]:
        del out["latency"]
    return out


def latency_ms(cost: dict | None, batch: int = 1, per_image: bool = False) -> float | None:
    lat = ((cost or {}).get("latency") or {}).get(str(batch))
    if not lat:
        return None
    return float(lat["per_image_ms"] if per_image else lat["median_ms"])


def cost_values(cost: dict | None) -> list[float | None]:
    """The figures behind :data:`COST_COLUMNS`: parameters, FLOPs per image, ms at batch 1, ms per image at 64."""
    if not cost:
        return [None] * len(COST_COLUMNS)
    return [float(cost["params"]), float(cost["flops_per_image"]), latency_ms(cost, 1),
            latency_ms(cost, 64, per_image=True)]


def ratios(cost: dict | None, teacher: dict | None) -> list[float | None]:
    """Each of :func:`cost_values` divided by the teacher's."""
    return [None if a is None or not b else a / b for a, b in zip(cost_values(cost), cost_values(teacher))]


def human(x: float | None, unit: str = "") -> str:
    """1234567 -> '1.23 M'; None -> 'n/a'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g}{' ' + unit if unit else ''}"


def cost_cells(cost: dict | None, teacher: dict | None = None) -> list[str]:
    """Cells for :data:`COST_COLUMNS`; with ``teacher``, each followed by the student / teacher ratio."""
    values = cost_values(cost)
    cells = [human(values[0]), human(values[1]),
             "n/a" if values[2] is None else f"{values[2]:.3g}", "n/a" if values[3] is None else f"{values[3]:.3g}"]
    if teacher is not None and cost is not teacher:
        cells = [c if r is None else f"{c} ({r:.2f}×)" for c, r in zip(cells, ratios(cost, teacher))]
    return cells


def cost_note(cost: dict | None) -> str:
    """How the latency columns were measured, for a table's caption."""
    if not cost or "latency" not in cost:
        return ""
    lat = cost["latency"].get("1", {})
    return (f"params: parameters; FLOPs/img: FLOPs of one forward pass per image (FlopCounterMode); ms b1: median "
            f"latency of a batch of 1, ms/img b64: of a batch of 64 divided by 64 ({lat.get('runs', '?')} runs after "
            f"{lat.get('warmup', '?')} warm-up, {cost.get('device_name', cost.get('device'))}, "
            f"{cost.get('threads')} torch thread(s)); (×): student / teacher")
